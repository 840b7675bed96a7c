"""`find`: dense training, then iterative magnitude pruning with late rewinding, driven by the
extreme-ticket search (or fixed-rate IMP), checkpointed so a killed run resumes exactly.

One Trainer (and on CUDA one captured graph) serves the whole search: each round copies the
rewind weights, BatchNorm statistics and momentum back into the same tensors. `Search` holds
the steps, each short and rerunnable from the run folder: the dense training, one round (its
candidate mask, then its trials), and the result."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticketctl.artifacts import Kind, Mask, Ticket
from ticketctl.data import (
    DATASETS,
    Dataset,
    StreamedDataset,
    load_dataset,
    load_recorded_dataset,
)
from ticketctl.device import resolve_device
from ticketctl.distributed import DistContext, check_same
from ticketctl.errors import TicketctlError
from ticketctl.models import ARCHS, build_model
from ticketctl.models.registry import required_prunable
from ticketctl.models.sources import (
    FACTORY,
    NetworkInfo,
    current_factory,
    fingerprint,
    source_of,
)
from ticketctl.prune.magnitude import magnitude_prune
from ticketctl.prune.rundir import (
    BEST_CANDIDATE,
    BEST_CURRENT,
    DATASET,
    RESULT,
    TRAINED_CANDIDATE,
    TRAINED_CURRENT,
    Checkpoint,
    Dense,
    RunDir,
    settings_hash,
    without_resumable,
)
from ticketctl.prune.search import (
    Round,
    SearchConfig,
    SearchState,
    TrialResult,
    current_rate,
    record_round,
)
from ticketctl.train import EpochStats, TrainConfig, Trainer, TrainResult
from ticketctl.train.config import raise_all
from ticketctl.train.engine import Hooks
from ticketctl.train.packed import PackedTrainer, default_pack, param_count


@dataclass
class FindSettings:
    arch: str = "digits_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    val_size: int | None = None
    split_seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    arch_args: dict[str, Any] = field(default_factory=dict)  # a torchvision/timm/factory's
    prunable: str | None = None  # --prunable: which weights are pruned, by name
    fingerprint: str | None = None  # of a network from outside, once built
    stream: bool | None = None  # image folders: --stream / --no-stream (None: as they fit)
    image_size: int | None = None  # image folders: --image-size

    def to_dict(self) -> dict[str, Any]:
        # the newer fields only when set, so run folders of built-ins keep their settings
        return {"arch": self.arch, "dataset": self.dataset, "data_dir": self.data_dir,
                "val_size": self.val_size, "split_seed": self.split_seed,
                "train": self.train.to_dict(), "search": self.search.to_dict(),
                **({"arch_args": self.arch_args} if self.arch_args else {}),
                **({"prunable": self.prunable} if self.prunable is not None else {}),
                **({"fingerprint": self.fingerprint} if self.fingerprint else {}),
                **({"stream": self.stream} if self.stream is not None else {}),
                **({"image_size": self.image_size} if self.image_size is not None else {})}

    def validate(self) -> None:
        """Every problem at once, so one rerun fixes them all."""
        out = []
        if self.arch not in ARCHS and source_of(self.arch) not in ("torchvision", "timm",
                                                                     FACTORY):
            out.append(f"unknown architecture {self.arch!r}; known: {', '.join(sorted(ARCHS))}, "
                       "torchvision:NAME, timm:NAME, or --model-factory FILE.py:FUNCTION")
        if self.dataset not in DATASETS:
            out.append(f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if self.image_size is not None and self.image_size < 1:
            out.append(f"--image-size must be at least 1, got {self.image_size}")
        raise_all(out + self.train.problems() + self.search.problems(self.train.epochs))


class Events:
    """Progress callbacks; the CLI overrides them to draw its progress bar."""

    def training(self, label: str, first_epoch: int, last_epoch: int) -> None: ...

    def epoch(self, stats: EpochStats) -> None: ...

    def round(self, record: Round) -> None: ...

    def stage(self, what: str) -> None:
        """A longer pipeline (the demo) starts another stage."""


@dataclass
class FindResult:
    dense_accuracy: float
    ticket_accuracy: float
    density: float
    rounds: list[Round]
    spec: dict[str, int]
    ticket: Ticket
    trained: Ticket
    run_dir: str
    seconds: float
    dense: Dense | None = None
    distributed: dict[str, Any] | None = None  # world size and per-round mask checks

    @property
    def search_seconds(self) -> float | None:
        """The dense training and every round, summed over all the processes that worked on
        the run (`seconds` is this process's own); None for a run folder from before rounds
        kept their time. A round resumed before 2026-11-30 (session 7) kept only its last
        process's part, so a folder with one counts short."""
        if self.dense is None or any(r.seconds is None for r in self.rounds):
            return None
        return self.dense.seconds + sum(r.seconds or 0.0 for r in self.rounds)

    def summary(self) -> dict[str, Any]:
        """The JSON document `find --json` prints (without the tickets)."""
        return {"dense_accuracy": self.dense_accuracy, "ticket_accuracy": self.ticket_accuracy,
                "density": self.density, "rounds": [r.to_dict() for r in self.rounds],
                "spec": self.spec, "run_dir": self.run_dir, "seconds": self.seconds,
                "search_seconds": self.search_seconds,
                "dense": asdict(self.dense) if self.dense else {},
                "distributed": self.distributed}


def _prunable(model: torch.nn.Module, settings: FindSettings) -> list[str]:
    return required_prunable(model, settings.search.prune_linear, settings.prunable)


def _network_info(settings: FindSettings) -> NetworkInfo | None:
    if source_of(settings.arch) == "builtin":
        return None
    factory = current_factory()
    return NetworkInfo(source_of(settings.arch), settings.fingerprint,
                       factory.spec if settings.arch == FACTORY and factory else None,
                       settings.prunable)


def _seed_for(base: int, round_no: int, trial: int) -> int:
    return base + 1000 * round_no + trial


@dataclass
class TrialJob:
    """Trials of one round for a worker on another device (`find --devices`): everything it
    needs besides the dataset, the rest read from the run folder (rewind point, mask)."""

    run_dir: str
    round: int
    trials: list[int]  # consecutive; more than one: trained packed together
    seeds: list[int]
    start_epoch: int
    arch: str
    arch_args: dict[str, Any]
    num_classes: int
    in_channels: int


def train_trials(job: TrialJob, data: Dataset, cfg: TrainConfig, trainers: dict[int, Any],
                 on_epoch: Callable[[str, EpochStats], None] | None = None
                 ) -> list[TrialResult]:
    """Train `job`'s trials exactly as `Search` does on its own device (the same trainer,
    seeds and packing); trial 0 leaves its weights in the run folder for the round's verdict.
    `trainers`: a worker's trainers by pack width, reused across rounds (one compilation)."""
    run = RunDir(Path(job.run_dir))
    rewind = run.read_rewind()
    cand = run.read_mask(job.round)
    if rewind is None or cand is None:
        raise TicketctlError(f"the run folder {job.run_dir} has no rewind point or no round-"
                             f"{job.round} mask")
    width = len(job.trials)
    if width not in trainers:
        model = build_model(job.arch, job.num_classes, seed=cfg.seed,
                            in_channels=job.in_channels, **job.arch_args)
        trainers[width] = PackedTrainer(model, data, cfg, [cand] * width, job.seeds) \
            if width > 1 else Trainer(model, data, cfg, mask=Mask.ones(model, list(cand)))
    trainer = trainers[width]
    labels = [f"round-{job.round}-trial-{t}" for t in job.trials]
    if width > 1:
        trainer.restart([rewind[0]] * width, job.seeds, masks=[cand] * width,
                        optimizers=[rewind[1]] * width)
        results = trainer.fit(start_epoch=job.start_epoch, on_epoch=(
            lambda stats: [on_epoch(lab, st) for lab, st in zip(labels, stats, strict=True)])
            if on_epoch else None)
        states = (trainer.model_states()[0], trainer.best_model_states()[0])
    else:
        trainer.restart(rewind[0], mask=cand, optimizer=rewind[1], seeds=job.seeds[0])
        results = [trainer.fit(start_epoch=job.start_epoch, on_epoch=(
            lambda st: on_epoch(labels[0], st)) if on_epoch else None)]
        states = (trainer.model_state(), trainer.best_state())
    if job.trials[0] == 0:
        run.write_tensors(TRAINED_CANDIDATE, states[0])
        run.write_tensors(BEST_CANDIDATE, states[1])
    return [TrialResult(res.test_accuracy, res.val_accuracy, res.best_epoch, res.seconds,
                        packed=width if width > 1 else None) for res in results]


class Search:
    """One run of `find` in its run folder."""

    def __init__(self, settings: FindSettings, run: RunDir, data: Dataset | StreamedDataset,
                 model: torch.nn.Module,
                 device: torch.device, events: Events, pack: int | None,
                 dist: DistContext | None, checkpoint_seconds: float = 60.0,
                 devices: list[torch.device] | None = None) -> None:
        """devices: two or more spread each round's trials over one worker each."""
        self.settings, self.run, self.data, self.model = settings, run, data, model
        self.devices = devices if devices is not None and len(devices) > 1 else None
        self.pool: Any = None  # its workers, started by the first round with trials to spread
        self._shown = ""  # the spread trial whose epochs the progress bar shows
        self.checkpoint_seconds = checkpoint_seconds
        self.tcfg, self.scfg = settings.train, settings.search
        self.device, self.events, self.dist = device, events, dist
        # ranks split every batch; packing would multiply the work per rank; a streamed
        # dataset would be decoded once per packed model
        self.pack = 1 if dist is not None or data.streamed else \
            default_pack(device, pack, param_count(model))
        self.full = Mask.ones(model, _prunable(model, settings))
        self.trainer = Trainer(model, data, self.tcfg, mask=self.full, dist=dist)
        self.packed: dict[int, PackedTrainer] = {}
        self.mask_checks = 0
        self.seq = 0  # the last row of the epoch log
        self.started = time.perf_counter()
        # the round in progress: when this process started it, and the wall time earlier
        # processes spent on it (see `_round_seconds`)
        self._round_t0, self._round_carried = self.started, 0.0

    @classmethod
    def open(cls, settings: FindSettings, path: Path, *, resume: bool, force: bool,
             device: torch.device, events: Events, pack: int | None,
             dist: DistContext | None, checkpoint_seconds: float = 60.0,
             devices: str | None = None) -> Search:
        """Load the data and build the network before touching the run folder, so bad input
        leaves no folder behind. A resumed run loads its data as it was loaded first
        (streamed or in memory, and a streamed one's statistics). devices: `--devices`."""
        from ticketctl.attacks.spread import parse_devices

        if devices is not None and dist is not None:
            raise TicketctlError("--devices spreads a round's trials over devices from one "
                                 "process; it cannot be combined with --nproc")
        spread = parse_devices(devices, device) if dist is None else None
        recorded = RunDir(path).read_json(DATASET) if resume else None
        if recorded:
            data = load_recorded_dataset(
                recorded, settings.dataset, settings.data_dir, device=device,
                val_size=settings.val_size, split_seed=settings.split_seed,
                stream=settings.stream, image_size=settings.image_size)
        else:
            data = load_dataset(settings.dataset, settings.data_dir, device=device,
                                val_size=settings.val_size, split_seed=settings.split_seed,
                                stream=settings.stream, image_size=settings.image_size)
        model = build_model(settings.arch, data.num_classes, seed=settings.train.seed,
                            in_channels=data.input_shape[0], **settings.arch_args)
        if source_of(settings.arch) != "builtin":  # resuming needs the same network
            settings.fingerprint = fingerprint(model)
        _prunable(model, settings)  # bad input leaves no run folder behind
        if pack is not None and pack > 1:
            data.require_resident("--pack")
        if data.streamed and spread and len(spread) > 1:
            if devices is not None:  # asked for; by default a streamed run keeps one device
                data.require_resident("--devices")
            spread = None
        run = RunDir.open(path, settings.to_dict(), resume=resume, force=force)
        if not recorded:
            run.write_json(DATASET, data.info())
        return cls(settings, run, data, model, device, events, pack, dist, checkpoint_seconds,
                   spread)

    # ---- dense training; its weights after epoch `rewind_epoch` are the rewind point ---------
    def train_dense(self) -> None:
        self.dense = self.run.read_dense()
        if self.dense is None:
            rewind_at = self.scfg.rewind_epoch
            if rewind_at == 0 and self.run.read_rewind() is None:
                self._save_rewind()
            res = self._train(self.trainer, "dense", 0,
                              trained=lambda e: self._save_rewind() if e == rewind_at else None)
            self.run.write_tensors(TRAINED_CURRENT, self.trainer.model_state())
            self.run.write_tensors(BEST_CURRENT, self.trainer.best_state())
            self.run.write_mask(0, self.full, {"round": 0, "rate": None})
            self.dense = Dense(res.test_accuracy, res.val_accuracy, res.best_epoch, res.seconds,
                               self.seq)
            self.run.write_dense(self.dense)
        rewind = self.run.read_rewind()
        assert rewind is not None  # written during the dense training
        self.rewind_model, self.rewind_opt = rewind
        saved = self.run.read_state()
        self.state, self.seq = saved if saved else (SearchState(), self.dense.seq)
        if self.scfg.max_rounds == 0:  # dense training only
            self.state.done = True

    def _save_rewind(self) -> None:
        self.run.write_rewind(self.trainer.model_state(), self.trainer.optimizer_state())

    # ---- one round: prune the last accepted mask, retrain its trials, accept or revert --------
    def run_round(self) -> None:
        r = len(self.state.rounds) + 1
        self._round_t0, self._round_carried = time.perf_counter(), 0.0
        cand = self._candidate(r, current_rate(self.state, self.scfg))
        prune_seconds = time.perf_counter() - self._round_t0
        trials = self._trials(r, cand)
        accepted_before = self.state.accepted_rounds
        record_round(self.state, self.scfg, self.dense.accuracy, trials=trials,
                     density=cand.density, kept=cand.num_kept, prune_seconds=prune_seconds,
                     seconds=self._round_seconds())
        if self.state.accepted_rounds > accepted_before:
            self.run.copy_file(TRAINED_CANDIDATE, TRAINED_CURRENT)
            self.run.copy_file(BEST_CANDIDATE, BEST_CURRENT)
        self.run.write_state(self.state, self.seq)
        self.run.write_tables(self.state.rounds)
        self.events.round(self.state.rounds[-1])

    def _round_seconds(self) -> float:
        """The round's wall time so far: this process's part, and what earlier processes
        spent on it up to what they saved (its finished trials, the checkpoint of the one in
        progress); work a kill lost after the last save is not counted."""
        return time.perf_counter() - self._round_t0 + self._round_carried

    def _candidate(self, r: int, rate: float | None) -> Mask:
        cand = self.run.read_mask(r)
        if cand is None:
            trained_now, _ = self.run.read_tensors(TRAINED_CURRENT)
            cand = magnitude_prune(trained_now, self._accepted_mask() or self.full, rate,
                                   scope=self.scfg.scope)
            self.run.write_mask(r, cand, {"round": r, "rate": rate})
        if self.dist is not None:  # the global threshold must have picked the same weights
            check_same(self.dist, cand.sha256(), f"the round-{r} mask")
            self.mask_checks += 1
        return cand

    def _trials(self, r: int, cand: Mask) -> list[TrialResult]:
        trials, seq, spent = self.run.read_pending(r)
        if seq is not None:
            self.seq = seq
            self._round_carried += spent
        width = min(self.pack, self.scfg.trials - len(trials))
        # spread when there is more than one trial left: a pack for every device
        if self.devices is not None and self.scfg.trials - len(trials) > 1:
            return self._spread_trials(r, trials)
        if width > 1:
            trials = self._packed_trials(r, cand, trials, width)
        for trial in range(len(trials), self.scfg.trials):
            self.trainer.restart(self.rewind_model, mask=cand, optimizer=self.rewind_opt,
                                 seeds=_seed_for(self.tcfg.seed, r, trial))
            res = self._train(self.trainer, f"round-{r}-trial-{trial}", self.scfg.rewind_epoch)
            if trial == 0:
                self.run.write_tensors(TRAINED_CANDIDATE, self.trainer.model_state())
                self.run.write_tensors(BEST_CANDIDATE, self.trainer.best_state())
            trials.append(TrialResult(res.test_accuracy, res.val_accuracy, res.best_epoch,
                                      res.seconds))
            self.run.write_pending(r, trials, self.seq, self._round_seconds())
        return trials

    def _spread_trials(self, r: int, trials: list[TrialResult]) -> list[TrialResult]:
        """The round's remaining trials on the workers, in packs of at most `pack` and enough
        packs for every device (`spread_width`); a trial's seed is its own wherever it
        trains. Recorded when all are back (a kill redoes the unrecorded ones)."""
        from ticketctl.attacks.spread import DataSpec, Job, SpreadPool, spread_width

        first = len(trials)
        left = self.scfg.trials - first
        width = spread_width(min(self.pack, left), left, len(self.devices))
        groups = [list(range(t, min(t + width, self.scfg.trials)))
                  for t in range(first, self.scfg.trials, width)]
        if self.pool is None:
            def on_epoch(label: str, stats: EpochStats) -> None:
                self.seq += 1
                self.run.append_epoch(self.seq, label, stats)
                if label == self._shown:  # the progress bar follows one trial, as packed
                    self.events.epoch(stats)

            self.pool = SpreadPool(self.devices, DataSpec.of(self.data), self.tcfg.to_dict(),
                                   None, None, on_epoch)
        self._shown = f"round-{r}-trial-{first}"
        self.events.training(f"round-{r}-trials-{first}-{self.scfg.trials - 1} on "
                             f"{len(self.devices)} devices", self.scfg.rewind_epoch + 1,
                             self.tcfg.epochs)
        self.run.truncate_epochs(self.seq)
        jobs = [Job("trials", [], [], payload=TrialJob(
            str(self.run.path), r, g, [_seed_for(self.tcfg.seed, r, t) for t in g],
            self.scfg.rewind_epoch, self.settings.arch,
            self.settings.arch_args, self.data.num_classes, self.data.input_shape[0]))
            for g in groups]
        results = self.pool.run(jobs)
        trials = trials + [t for i in range(len(jobs)) for t in results[i]]
        self.run.write_pending(r, trials, self.seq, self._round_seconds())
        return trials

    def close(self) -> None:
        """Stop the trial workers, if any were started."""
        if self.pool is not None:
            self.pool.close()

    def _packed_trials(self, r: int, cand: Mask, trials: list[TrialResult],
                       width: int) -> list[TrialResult]:
        """The next `width` trials of round r in one packed network; recorded together
        (packed trials checkpoint per round, not per epoch)."""
        first = len(trials)
        seeds = [_seed_for(self.tcfg.seed, r, first + i) for i in range(width)]
        if width not in self.packed:
            self.packed[width] = PackedTrainer(self.model, self.data, self.tcfg, [cand] * width,
                                               seeds)
        ptr = self.packed[width]
        ptr.restart([self.rewind_model] * width, seeds, masks=[cand] * width,
                    optimizers=[self.rewind_opt] * width)
        self.events.training(f"round-{r}-trials-{first}-{first + width - 1}",
                             self.scfg.rewind_epoch + 1, self.tcfg.epochs)

        def on_epoch(stats: list[EpochStats]) -> None:
            for i, st in enumerate(stats):
                self.seq += 1
                self.run.append_epoch(self.seq, f"round-{r}-trial-{first + i}", st)
            self.events.epoch(stats[0])

        self.run.truncate_epochs(self.seq)
        results = ptr.fit(start_epoch=self.scfg.rewind_epoch, on_epoch=on_epoch)
        if first == 0:
            self.run.write_tensors(TRAINED_CANDIDATE, ptr.model_states()[0])
            self.run.write_tensors(BEST_CANDIDATE, ptr.best_model_states()[0])
        trials = trials + [TrialResult(res.test_accuracy, res.val_accuracy, res.best_epoch,
                                       res.seconds, packed=width) for res in results]
        self.run.write_pending(r, trials, self.seq, self._round_seconds())
        return trials

    def _train(self, trainer: Trainer, key: str, start_epoch: int,
               trained: Callable[[int], Any] | None = None) -> TrainResult:
        """Train epochs start_epoch+1..E. Every epoch is logged; the training in progress is
        checkpointed after its last epoch and whenever `checkpoint_seconds` have passed since
        its last checkpoint (0: after every epoch), so a kill loses at most that much work.
        (A ResNet-18 checkpoint is 135 MB: written every epoch it cost a fifth of a round.)"""
        history: list[EpochStats] = []
        best = None
        epoch = start_epoch
        before = 0.0  # the wall time earlier processes spent on this training, up to its save
        ck = self.run.read_checkpoint(key)
        if ck is not None:
            trainer.load_model_state(ck.model)
            trainer.load_optimizer_state(ck.optimizer)
            trainer.load_rng_state(ck.rng)
            history, epoch, self.seq, best = ck.history, ck.epoch, ck.seq, ck.best
            before = ck.seconds
            self._round_carried += before
        self.run.truncate_epochs(self.seq)
        self.events.training(key, epoch + 1, trainer.cfg.epochs)

        started = last = time.perf_counter()

        def checkpoint(e: int, histories: list[list[EpochStats]]) -> None:
            nonlocal last
            self.seq += 1
            # the log first: a kill before the checkpoint below leaves rows past the last
            # checkpoint, which a resumed run drops and trains again
            self.run.append_epoch(self.seq, key, histories[0][-1])
            if e == trainer.cfg.epochs or \
                    time.perf_counter() - last >= self.checkpoint_seconds:
                self.run.write_checkpoint(Checkpoint(
                    key, e, self.seq, histories[0], trainer.model_state(),
                    trainer.optimizer_state(), trainer.rng_state(), trainer.best_states[0],
                    before + time.perf_counter() - started))
                last = time.perf_counter()

        hooks = Hooks(trained=trained, checkpoint=checkpoint,
                      evaluated=lambda _e, stats: self.events.epoch(stats[0]))
        res = trainer.run(epoch, trainer.cfg.epochs, [history], hooks, best=[best])[0]
        res.seconds += before
        return res

    def _accepted_mask(self) -> Mask | None:
        last = self.state.last_accepted
        return self.run.read_mask(last.round) if last else None

    # ---- the result ---------------------------------------------------------------------------
    def result(self) -> FindResult:
        self.run.write_tables(self.state.rounds)
        final = self._accepted_mask() or self.full
        last = self.state.last_accepted
        ticket_acc = last.accuracy if last else self.dense.accuracy
        # the model whose accuracy is reported: trial 0 at its best-validation epoch (a run
        # folder from before these were kept has the final weights only)
        saved = self.run.read_tensors(BEST_CURRENT) or self.run.read_tensors(TRAINED_CURRENT)
        trained_accuracy = last.accuracies[0] if last and last.accuracies else \
            (last.accuracy if last else self.dense.accuracy)
        spec = dict(zip([str(r) for r in self.scfg.rates], self.state.spec(self.scfg),
                        strict=True))
        extra = {"spec": spec, "dense_accuracy": self.dense.accuracy,
                 "ticket_accuracy": ticket_acc, "search": self.scfg.mode,
                 "settings_hash": settings_hash(self.settings.to_dict())}
        ticket = Ticket(state=self.rewind_model, mask=final, kind=Kind.TICKET,
                        arch=self.settings.arch,
                        arch_args={**self.settings.arch_args,
                                   "in_channels": self.data.input_shape[0]},
                        network=_network_info(self.settings),
                        num_classes=self.data.num_classes, class_names=self.data.class_names,
                        dataset=self.data.info(), rewind_epoch=self.scfg.rewind_epoch,
                        seed=self.tcfg.seed, extra=extra)
        result = FindResult(
            dense_accuracy=self.dense.accuracy, ticket_accuracy=ticket_acc,
            density=final.density, rounds=self.state.rounds, spec=spec, ticket=ticket,
            trained=ticket.derive(state=saved[0], kind=Kind.TRAINED,
                                  extra={**extra, "test_accuracy": trained_accuracy}),
            run_dir=str(self.run.path), seconds=time.perf_counter() - self.started,
            dense=self.dense,
            distributed=None if self.dist is None else {
                "world_size": self.dist.world,
                "backend": "nccl" if self.device.type == "cuda" else "gloo",
                "global_batch": self.tcfg.batch_size, "mask_checks": self.mask_checks},
        )
        self.run.write_json(RESULT, result.summary())
        return result


def find_ticket(
    settings: FindSettings,
    run_path: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    device: str = "auto",
    events: Events | None = None,
    pack: int | None = None,
    dist: DistContext | None = None,
    checkpoint_seconds: float = 60.0,
    devices: str | None = None,
) -> FindResult:
    """pack: train `--trials` of a round together in one packed network (default 8 on
    CUDA, 1 on CPU); packed trials checkpoint per round, not per epoch.
    devices: `--devices` (`parse_devices`; by default every GPU of a multi-GPU host when the
    data are on one): each round's trials spread over one worker process per device.
    checkpoint_seconds: how often a training in progress is saved (0: every epoch).
    dist: one rank of a data-parallel run; rank 0 keeps the run folder, the other ranks a
    private scratch copy, and every round's mask is checked to be the same on all ranks."""
    if checkpoint_seconds < 0:
        raise TicketctlError(f"--checkpoint-every must be 0 or more seconds, got "
                             f"{checkpoint_seconds:g}")
    if dist is not None and not dist.is_main and not dist.scratch:
        return _on_scratch_copy(settings, Path(run_path), resume, device, dist)
    settings.validate()
    search = Search.open(settings, Path(run_path), resume=resume, force=force,
                         device=resolve_device(device), events=events or Events(), pack=pack,
                         dist=dist, checkpoint_seconds=checkpoint_seconds, devices=devices)
    try:
        search.train_dense()
        while not search.state.done:
            search.run_round()
        return search.result()
    finally:
        search.close()
        search.run.unlock()


def _on_scratch_copy(settings: FindSettings, run_path: Path, resume: bool, device: str,
                     dist: DistContext) -> FindResult:
    """A rank other than 0 runs the same search in a private copy of the run folder."""
    scratch = Path(tempfile.mkdtemp(prefix=f"ticketctl-rank{dist.rank}-"))
    try:
        if resume and run_path.exists():
            shutil.copytree(run_path, scratch / "run")
        return find_ticket(settings, scratch / "run", resume=resume, force=True, device=device,
                           events=Events(), pack=1,
                           dist=DistContext(dist.rank, dist.world, dist.local_rank,
                                            scratch=True))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def default_run_dir(settings: FindSettings, root: str | Path = "runs") -> Path:
    """Named by a hash of the settings, so rerunning a command finds its own folder (those a
    resume may change, such as --combo-kernels, left out: the same folder either way)."""
    return Path(root) / f"find-{settings.arch}-{settings.dataset}-" \
                        f"{settings_hash(without_resumable(settings.to_dict()))}"


def ticket_at_round(run_path: str | Path, result: FindResult, round_no: int) -> Ticket:
    """The ticket an earlier round of a finished search would have given: the rewind weights
    under that round's mask (a denser ticket than the extreme one, from the same search)."""
    run = RunDir(Path(run_path))
    mask = run.read_mask(round_no)
    rewind = run.read_rewind()
    if mask is None or rewind is None:
        raise TicketctlError(f"run folder {run_path} has no mask for round {round_no}")
    t = result.ticket
    return t.derive(state=rewind[0], mask=mask, extra={**t.extra, "round": round_no})
