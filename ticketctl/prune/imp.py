"""`find`: dense training, then iterative magnitude pruning with late rewinding, driven by the
extreme-ticket search (or fixed-rate IMP), checkpointed so a killed run resumes exactly.

One Trainer (and on CUDA one captured graph) serves the whole search: each round copies the
rewind weights, BatchNorm statistics and momentum back into the same tensors."""

from __future__ import annotations

import math
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ticketctl.artifacts import Mask, Ticket
from ticketctl.data import DATASETS, load_dataset
from ticketctl.device import resolve_device
from ticketctl.distributed import DistContext, check_same
from ticketctl.errors import TicketctlError
from ticketctl.models import ARCHS, build_model, prunable_names
from ticketctl.prune.magnitude import magnitude_prune
from ticketctl.prune.rundir import RunDir, settings_hash
from ticketctl.prune.search import SearchConfig, SearchState, current_rate, record_round
from ticketctl.train import EpochStats, TrainConfig, Trainer, TrainResult, summarize
from ticketctl.train.packed import PackedTrainer, default_pack

CHECKPOINT = "checkpoint.safetensors"


@dataclass
class FindSettings:
    arch: str = "digits_cnn"
    dataset: str = "digits"
    data_dir: str | None = None
    val_size: int | None = None
    split_seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "dataset": self.dataset, "data_dir": self.data_dir,
                "val_size": self.val_size, "split_seed": self.split_seed,
                "train": self.train.to_dict(), "search": self.search.to_dict()}

    def validate(self) -> None:
        if self.arch not in ARCHS:
            raise TicketctlError(f"unknown architecture {self.arch!r}; known: "
                                 f"{', '.join(sorted(ARCHS))}")
        if self.dataset not in DATASETS:
            raise TicketctlError(f"unknown dataset {self.dataset!r}; known: "
                                 f"{', '.join(DATASETS)}")
        self.train.validate()
        self.search.validate(self.train.epochs)


class Events:
    """Progress callbacks; the CLI overrides them to draw its progress bar."""

    def training(self, label: str, first_epoch: int, last_epoch: int) -> None: ...

    def epoch(self, stats: EpochStats) -> None: ...

    def round(self, record: dict[str, Any]) -> None: ...


@dataclass
class FindResult:
    dense_accuracy: float
    ticket_accuracy: float
    density: float
    rounds: list[dict[str, Any]]
    spec: dict[str, int]
    ticket: Ticket
    trained: Ticket
    run_dir: str
    seconds: float
    dense: dict[str, Any] = field(default_factory=dict)
    distributed: dict[str, Any] | None = None  # world size and per-round mask checks

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ticket")
        d.pop("trained")
        return d


def _seed_for(base: int, round_no: int, trial: int) -> int:
    return base + 1000 * round_no + trial


def _train_with_checkpoints(
    run: RunDir, trainer: Trainer, key: str, start_epoch: int, seq0: int, events: Events,
    after_epoch: Any = None,
) -> tuple[TrainResult, int]:
    """Train epochs start_epoch+1..E, checkpointing after each so a kill loses one epoch."""
    history: list[EpochStats] = []
    epoch, seq = start_epoch, seq0
    got = run.read_tensors(CHECKPOINT)
    if got is not None and got[1].get("key") == key:
        tensors, meta = got
        trainer.load_model_state({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        trainer.load_optimizer_state({k[4:]: v for k, v in tensors.items()
                                      if k.startswith("opt.")})
        trainer.load_rng_state({k: v for k, v in tensors.items() if k.startswith("rng.")})
        history = [EpochStats(**h) for h in meta["history"]]
        epoch, seq = meta["epoch"], meta["seq"]
    run.truncate_epochs(seq)
    events.training(key, epoch + 1, trainer.cfg.epochs)
    t0 = time.perf_counter()
    for e in range(epoch + 1, trainer.cfg.epochs + 1):
        te = time.perf_counter()
        loss = trainer.train_epoch(e)
        val, test = trainer.evaluate("val"), trainer.evaluate("test")
        stats = EpochStats(e, trainer.last_lr, loss, None if math.isnan(val) else val, test,
                           time.perf_counter() - te)
        history.append(stats)
        seq += 1
        if after_epoch is not None:
            after_epoch(e)
        tensors = {**{f"model.{k}": v for k, v in trainer.model_state().items()},
                   **{f"opt.{k}": v for k, v in trainer.optimizer_state().items()},
                   **trainer.rng_state()}
        run.write_tensors(CHECKPOINT, tensors, {"key": key, "epoch": e, "seq": seq,
                                                "history": [h.to_dict() for h in history]})
        run.append_epoch({"seq": seq, "training": key, **stats.to_dict()})
        events.epoch(stats)
    return summarize(history, time.perf_counter() - t0), seq


def _packed_trials(run: RunDir, cache: dict[int, PackedTrainer], template: Any, data: Any,
                   tcfg: Any, cand: Mask, rewind_model: dict, rewind_opt: dict, r: int,
                   trials: list[dict[str, Any]], width: int, rewind_epoch: int, seq: int,
                   events: Events) -> tuple[list[dict[str, Any]], int]:
    """The next `width` trials of round r in one packed network; recorded together."""
    first = len(trials)
    seeds = [_seed_for(tcfg.seed, r, first + i) for i in range(width)]
    if width not in cache:
        cache[width] = PackedTrainer(template, data, tcfg, [cand] * width, seeds)
    ptr = cache[width]
    ptr.set_masks([cand] * width)
    ptr.load_model_states([rewind_model] * width)
    ptr.load_optimizer_states([rewind_opt] * width)
    ptr.reseed(seeds)
    events.training(f"round-{r}-trials-{first}-{first + width - 1}", rewind_epoch + 1,
                    tcfg.epochs)
    counter = [seq]

    def on_epoch(stats: list[EpochStats]) -> None:
        for i, st in enumerate(stats):
            counter[0] += 1
            run.append_epoch({"seq": counter[0], "training": f"round-{r}-trial-{first + i}",
                              **st.to_dict()})
        events.epoch(stats[0])

    run.truncate_epochs(seq)
    results = ptr.fit(start_epoch=rewind_epoch, on_epoch=on_epoch)
    seq = counter[0]
    if first == 0:
        run.write_tensors("trained-candidate.safetensors", ptr.model_states()[0])
    trials = trials + [{"accuracy": res.test_accuracy, "val_accuracy": res.val_accuracy,
                        "best_epoch": res.best_epoch, "seconds": res.seconds,
                        "packed": width} for res in results]
    run.write_json("pending.json", {"round": r, "trials": trials, "seq": seq})
    return trials, seq


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
) -> FindResult:
    """pack: train `--trials` of a round together in one packed network (default 8 on
    CUDA, 1 on CPU); packed trials checkpoint per round, not per epoch.
    dist: one rank of a data-parallel run; rank 0 keeps the run folder, the other ranks a
    private scratch copy, and every round's mask is checked to be the same on all ranks."""
    if dist is not None and not dist.is_main and not dist.scratch:
        scratch = Path(tempfile.mkdtemp(prefix=f"ticketctl-rank{dist.rank}-"))
        try:
            if resume and Path(run_path).exists():
                shutil.copytree(run_path, scratch / "run")
            return find_ticket(settings, scratch / "run", resume=resume, force=True,
                               device=device, events=Events(), pack=1,
                               dist=DistContext(dist.rank, dist.world, dist.local_rank,
                                                scratch=True))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    settings.validate()
    events = events or Events()
    t_start = time.perf_counter()
    dev = resolve_device(device)
    if dist is not None:
        pack = 1  # ranks split every batch; packing would multiply the work per rank
    data = load_dataset(settings.dataset, settings.data_dir, device=dev,
                        val_size=settings.val_size, split_seed=settings.split_seed)
    tcfg, scfg = settings.train, settings.search
    arch_args = {"in_channels": data.input_shape[0]}
    model = build_model(settings.arch, data.num_classes, seed=tcfg.seed, **arch_args)
    run = RunDir.open(Path(run_path), settings.to_dict(), resume=resume, force=force)
    full = Mask.ones(model, prunable_names(model, prune_linear=scfg.prune_linear))
    trainer = Trainer(model, data, tcfg, mask=full, dist=dist)
    mask_checks = 0
    packed_trainers: dict[int, PackedTrainer] = {}

    # ---- dense training; its weights after epoch `rewind_epoch` are the rewind point -----
    dense = run.read_json("dense.json")
    if dense is None:
        if scfg.rewind_epoch == 0 and run.read_tensors("rewind.safetensors") is None:
            _save_rewind(run, trainer)

        def after_epoch(e: int) -> None:
            if e == scfg.rewind_epoch:
                _save_rewind(run, trainer)

        res, seq = _train_with_checkpoints(run, trainer, "dense", 0, 0, events, after_epoch)
        run.write_tensors("trained-current.safetensors", trainer.model_state())
        run.write_mask(0, full, {"round": 0, "rate": None})
        dense = {"accuracy": res.test_accuracy, "val_accuracy": res.val_accuracy,
                 "best_epoch": res.best_epoch, "seconds": res.seconds, "seq": seq}
        run.write_json("dense.json", dense)
    rewind_t, _ = run.read_tensors("rewind.safetensors")
    rewind_model = {k[6:]: v for k, v in rewind_t.items() if k.startswith("model.")}
    rewind_opt = {k[4:]: v for k, v in rewind_t.items() if k.startswith("opt.")}

    # ---- the search -------------------------------------------------------------------------
    state_d = run.read_json("state.json")
    state = SearchState.from_dict(state_d) if state_d else SearchState()
    seq = state_d["seq"] if state_d else dense["seq"]
    if scfg.max_rounds == 0:  # dense training only
        state.done = True
    while not state.done:
        r = len(state.rounds) + 1
        rate = current_rate(state, scfg)
        t_round = time.perf_counter()
        cand = run.read_mask(r)
        if cand is None:
            prev = _accepted_mask(run, state) or full
            trained_now, _ = run.read_tensors("trained-current.safetensors")
            cand = magnitude_prune(trained_now, prev, rate, scope=scfg.scope)
            run.write_mask(r, cand, {"round": r, "rate": rate})
        if dist is not None:  # the global threshold must have picked the same weights
            check_same(dist, cand.sha256(), f"the round-{r} mask")
            mask_checks += 1
        prune_seconds = time.perf_counter() - t_round
        pending = run.read_json("pending.json") or {}
        trials = pending.get("trials", []) if pending.get("round") == r else []
        if trials:
            seq = pending["seq"]
        width = min(default_pack(dev, pack), scfg.trials - len(trials))
        if width > 1:
            trials, seq = _packed_trials(run, packed_trainers, model, data, tcfg, cand,
                                         rewind_model, rewind_opt, r, trials, width,
                                         scfg.rewind_epoch, seq, events)
        for trial in range(len(trials), scfg.trials):
            key = f"round-{r}-trial-{trial}"
            trainer.set_mask(cand)
            trainer.load_model_state(rewind_model)
            trainer.load_optimizer_state(rewind_opt)
            trainer.reseed(_seed_for(tcfg.seed, r, trial))
            res, seq = _train_with_checkpoints(run, trainer, key, scfg.rewind_epoch, seq, events)
            if trial == 0:
                run.write_tensors("trained-candidate.safetensors", trainer.model_state())
            trials.append({"accuracy": res.test_accuracy, "val_accuracy": res.val_accuracy,
                           "best_epoch": res.best_epoch, "seconds": res.seconds})
            run.write_json("pending.json", {"round": r, "trials": trials, "seq": seq})
        accs = [t["accuracy"] for t in trials]
        accepted_before = state.accepted_rounds
        record_round(
            state, scfg, dense["accuracy"], statistics.fmean(accs),
            density=cand.density, kept=cand.num_kept, accuracies=accs,
            val_accuracy=trials[0]["val_accuracy"], best_epoch=trials[0]["best_epoch"],
            prune_seconds=prune_seconds, seconds=time.perf_counter() - t_round,
        )
        if state.accepted_rounds > accepted_before:
            cand_t, _ = run.read_tensors("trained-candidate.safetensors")
            run.write_tensors("trained-current.safetensors", cand_t)
        run.write_json("state.json", {**state.to_dict(), "seq": seq})
        run.write_tables(state.rounds)
        events.round(state.rounds[-1])

    run.write_tables(state.rounds)

    # ---- results --------------------------------------------------------------------------------
    final = _accepted_mask(run, state) or full
    accepted = [rd for rd in state.rounds if rd["accepted"]]
    ticket_acc = accepted[-1]["accuracy"] if accepted else dense["accuracy"]
    trained_state, _ = run.read_tensors("trained-current.safetensors")
    shash = settings_hash(settings.to_dict())
    spec = dict(zip([str(r) for r in scfg.rates], state.spec(scfg), strict=True))
    common = dict(arch=settings.arch, arch_args=arch_args, num_classes=data.num_classes,
                  class_names=data.class_names, dataset=data.info(), seed=tcfg.seed)
    extra = {"spec": spec, "dense_accuracy": dense["accuracy"], "ticket_accuracy": ticket_acc,
             "search": scfg.mode, "settings_hash": shash}
    ticket = Ticket(state=final.apply_state(rewind_model), mask=final, kind="ticket",
                    rewind_epoch=scfg.rewind_epoch, extra=extra, **common)
    trained = Ticket(state=final.apply_state(trained_state), mask=final, kind="trained",
                     rewind_epoch=scfg.rewind_epoch, extra=extra, **common)
    result = FindResult(
        dense_accuracy=dense["accuracy"], ticket_accuracy=ticket_acc, density=final.density,
        rounds=state.rounds, spec=spec, ticket=ticket, trained=trained, run_dir=str(run.path),
        seconds=time.perf_counter() - t_start, dense=dense,
        distributed=None if dist is None else {
            "world_size": dist.world, "backend": "nccl" if dev.type == "cuda" else "gloo",
            "global_batch": tcfg.batch_size, "mask_checks": mask_checks},
    )
    run.write_json("result.json", result.summary())
    return result


def _save_rewind(run: RunDir, trainer: Trainer) -> None:
    run.write_tensors("rewind.safetensors",
                      {**{f"model.{k}": v for k, v in trainer.model_state().items()},
                       **{f"opt.{k}": v for k, v in trainer.optimizer_state().items()}})


def _accepted_mask(run: RunDir, state: SearchState) -> Mask | None:
    accepted = [rd["round"] for rd in state.rounds if rd["accepted"]]
    return run.read_mask(accepted[-1]) if accepted else None


def default_run_dir(settings: FindSettings, root: str | Path = "runs") -> Path:
    """Named by a hash of the settings, so rerunning a command finds its own folder."""
    return Path(root) / f"find-{settings.arch}-{settings.dataset}-" \
                        f"{settings_hash(settings.to_dict())}"


def ticket_at_round(run_path: str | Path, result: FindResult, round_no: int) -> Ticket:
    """The ticket an earlier round of a finished search would have given: the rewind weights
    under that round's mask (a denser ticket than the extreme one, from the same search)."""
    run = RunDir(Path(run_path))
    mask = run.read_mask(round_no)
    rewind = run.read_tensors("rewind.safetensors")
    if mask is None or rewind is None:
        raise TicketctlError(f"run folder {run_path} has no mask for round {round_no}")
    state = {k[6:]: v for k, v in rewind[0].items() if k.startswith("model.")}
    t = result.ticket
    return Ticket(state=state, mask=mask, kind="ticket", arch=t.arch, arch_args=t.arch_args,
                  num_classes=t.num_classes, class_names=t.class_names, dataset=t.dataset,
                  rewind_epoch=t.rewind_epoch, seed=t.seed,
                  extra={**t.extra, "round": round_no})
