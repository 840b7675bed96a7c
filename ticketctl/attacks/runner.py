"""The attack runner: each row of a sweep is an independent job whose result is cached as a
small JSON file in the sweep's folder, so a sweep reuses what it already trained and an
interrupted sweep resumes. Retraining reuses one Trainer (and on CUDA one captured graph)
for every ticket of the same architecture, copying weights and masks in place."""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ticketctl.artifacts import Mask, Ticket
from ticketctl.artifacts.io import atomic_path, write_text_atomic
from ticketctl.attacks.spread import DataSpec, Job, run_spread, spread_width
from ticketctl.data import Dataset
from ticketctl.protect.verdict import Verdict
from ticketctl.records import Record
from ticketctl.train import EpochStats, TrainConfig, Trainer, TrainResult
from ticketctl.train.packed import PackedTrainer, default_pack, param_count

MATCH_POINTS = 1.0  # the paper's criterion: within 1 accuracy point of the reference


@dataclass
class JobResult(Record):
    """What one training job of a sweep measured, cached as JSON in the sweep's folder."""

    accuracy: float  # test accuracy (at the best-validation epoch for a retraining)
    seconds: float
    val_accuracy: float | None = None
    best_epoch: int | None = None
    density: float | None = None  # of the retrained ticket
    nonzero: float | None = None  # share of masked positions nonzero after fine-tuning
    packed: int | None = None  # trained in a packed network of this many models
    agreement: float | None = None  # distillation: % of test answers shared with the teacher

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def retrained(cls, res: TrainResult, ticket: Ticket, packed: int | None = None
                  ) -> JobResult:
        return cls(res.test_accuracy, res.seconds, res.val_accuracy, res.best_epoch,
                   ticket.density, packed=packed)


@dataclass
class AttackRow:
    strength: Any
    accuracy: float | None  # None: not measured (no network or no dataset)
    delta: float | None = None  # accuracy minus the reference's
    matches: bool | None = None  # still within MATCH_POINTS of the reference
    verified: bool | None = None
    message: str | None = None
    p_value: float | None = None
    trigger_accuracy: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


def scored_row(strength: Any, accuracy: float | None, verdict: Verdict | None,
               **details: Any) -> AttackRow:
    """A sweep's row: the attacked model's accuracy and what the owner's checks found."""
    if verdict is None:
        return AttackRow(strength=strength, accuracy=accuracy, details=details)
    found: dict[str, Any] = {}
    if verdict.signature is not None:
        found.update(bit_match=verdict.bit_match, alignment=verdict.signature.alignment)
    if verdict.defended is not None:
        found.update(defended_message=verdict.defended.message,
                     defended_p_value=verdict.defended.p_value,
                     defended_verified=verdict.defended.passes(verdict.alpha))
    if verdict.trigger is not None:
        found.update(trigger_p_value=verdict.trigger_p_value)
    return AttackRow(strength=strength, accuracy=accuracy, verified=verdict.verified,
                     message=verdict.message, p_value=verdict.p_value,
                     trigger_accuracy=verdict.trigger_accuracy, details={**details, **found})


@dataclass
class AttackReport:
    attack: str
    reference_accuracy: float | None
    reference: str
    rows: list[AttackRow]
    settings: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)  # attack-specific findings, top-level

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "facts"}, **self.facts}


def compare(rows: list[AttackRow], reference: float | None) -> None:
    """Fill in the change against the reference and the matching verdict."""
    for row in rows:
        if reference is not None and row.accuracy is not None:
            row.delta = row.accuracy - reference
            row.matches = row.accuracy >= reference - MATCH_POINTS


def nonzero_fraction(state: dict[str, torch.Tensor], names: list[str]) -> float:
    """Share of the masked layers' positions holding a nonzero weight (revived ones too)."""
    kept = [state[n] != 0 for n in names]
    return float(sum(int(m.sum()) for m in kept) / sum(m.numel() for m in kept))


def job_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class JobStore:
    """A sweep folder's finished jobs. Each is a JSON record of the job's key, its result and
    the SHA-256 of the weights kept beside it (fine-tuning), sealed by a SHA-256 over all of
    them: a record that was edited, cut short, left from another job or paired with other
    weights is not believed, and the job runs again. (The seal keeps out accidents and naive
    edits; a forger who recomputes it can still lie, so a sweep folder is as trustworthy as
    whoever could write it.)"""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, key: str) -> tuple[Path, Path]:
        assert self.folder is not None
        return self.folder / f"{key}.json", self.folder / f"{key}.safetensors"

    def write(self, key: str, result: JobResult, state: dict[str, torch.Tensor] | None) -> None:
        if self.folder is None:
            return
        record_path, state_path = self._paths(key)
        state_sha = None
        if state is not None:  # the weights first: a record never names missing ones
            with atomic_path(state_path, force=True) as tmp:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            state_sha = _file_sha256(state_path)
        record = {"job": key, "result": result.to_dict(), "state_sha256": state_sha}
        record["sha256"] = _seal(record)
        write_text_atomic(record_path, json.dumps(record), force=True)

    def read(self, key: str, keeps_state: bool = False
             ) -> tuple[JobResult, dict[str, torch.Tensor] | None] | None:
        if self.folder is None:
            return None
        record_path, state_path = self._paths(key)
        try:
            record = json.loads(record_path.read_text())
            seal = record.pop("sha256")
            if record["job"] != key or seal != _seal(record):
                return None
            result = JobResult.from_dict(record["result"])
            if not keeps_state:
                return result, None
            if record["state_sha256"] is None or \
                    _file_sha256(state_path) != record["state_sha256"]:
                return None
            return result, load_file(str(state_path))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # missing, or not a record this version wrote: run the job


def _seal(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AttackRunner:
    def __init__(
        self,
        data: Dataset,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        on_epoch: Callable[[str, EpochStats], None] | None = None,
        pack: int | None = None,
        devices: list[torch.device] | None = None,
    ) -> None:
        """pack: retrainings of one architecture run this many to a packed network
        (`retrain_many`; default 8 on CUDA for small models, 1 on CPU). devices: two or more
        spread the packs of `retrain_many` and `finetune_many` over one worker process each
        (`attacks.spread`), through the job store (a temporary one without `out_dir`)."""
        self.devices = devices if devices is not None and len(devices) > 1 else None
        self._tmp = None
        if self.devices is not None and out_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="ticketctl-sweep-")
            out_dir = self._tmp.name
        self.data = data
        self.pack = default_pack(data.train_x.device, pack)
        self._pack_requested = pack
        self._packed: dict[tuple, PackedTrainer] = {}
        self._memo: dict[str, dict[str, Any]] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.store = JobStore(self.out_dir / "jobs" if self.out_dir is not None else None)
        self.on_epoch = on_epoch
        self._trainer: Trainer | None = None
        self._trainer_key: tuple | None = None
        self.jobs_run = 0
        self.jobs_cached = 0

    def _lookup(self, key: str, keeps_state: bool = False) -> JobResult | None:
        """A finished job: from this process, else from the sweep folder if its record holds
        (then counted as cached, and its kept weights loaded when it has them)."""
        if key in self._memo:  # asked again in this process: not counted twice
            return self._memo[key]
        got = self.store.read(key, keeps_state)
        if got is None:
            return None
        self.jobs_cached += 1
        self._memo[key], state = got
        if state is not None:
            self._states[key] = state
        return self._memo[key]

    def cached(self, key: str,
               fn: Callable[[], tuple[JobResult, dict[str, torch.Tensor] | None]],
               keeps_state: bool = False) -> JobResult:
        """Run fn once per key (it returns the result and, for jobs that keep them, the
        trained weights); with an out_dir both survive the process."""
        found = self._lookup(key, keeps_state)
        if found is not None:
            return found
        result, state = fn()
        self.jobs_run += 1
        self.store.write(key, result, state)
        self._memo[key] = result
        if state is not None:
            self._states[key] = state
        return result

    def _spread(self, jobs: list[Job]) -> None:
        assert self.devices is not None and self.out_dir is not None
        run_spread(jobs, self.devices, DataSpec.of(self.data), self.cfg.to_dict(),
                   self.out_dir, self._pack_requested, self.on_epoch)

    def kept_state(self, key: str) -> dict[str, torch.Tensor]:
        """The weights a finished job that keeps them (`cached(..., keeps_state=True)`) left."""
        return self._states[key]

    def _retrain_key(self, ticket: Ticket) -> str:
        return job_id("retrain", ticket.tensors_sha256(), self.cfg.to_dict(), self.data.info())

    def retrain(self, ticket: Ticket, label: str = "") -> JobResult:
        """Train a ticket from its (rewind) weights under its mask; cached by content."""
        return self.cached(self._retrain_key(ticket), lambda: (self._retrain(ticket, label), None))

    def retrain_many(self, tickets: list[Ticket], labels: list[str] | None = None
                     ) -> list[JobResult]:
        """`retrain` for several tickets of one architecture, the uncached ones trained
        `self.pack` at a time in one packed network; each result is cached on its own."""
        labels = labels or [""] * len(tickets)
        keys = [self._retrain_key(t) for t in tickets]
        todo = [i for i, k in enumerate(keys) if not self._is_cached(k)]
        todo = [i for n, i in enumerate(todo) if keys[i] not in {keys[j] for j in todo[:n]}]
        width = self._width(tickets[0]) if len(todo) > 1 else 1
        if self.devices is not None and len(todo) > 1:  # the workers fill the job store
            width = spread_width(width, len(todo), len(self.devices))
            self._spread([Job("retrain", [tickets[i] for i in todo[s:s + width]],
                              [labels[i] for i in todo[s:s + width]])
                          for s in range(0, len(todo), width)])
            todo = []
        for start in range(0, len(todo), width):
            chunk = todo[start:start + width]
            if len(chunk) == 1:
                continue  # trained alone below, by retrain
            results = self._retrain_packed([tickets[i] for i in chunk],
                                           [labels[i] for i in chunk])
            for i, res in zip(chunk, results, strict=True):
                self.cached(keys[i], lambda res=res: (res, None))
        return [self.retrain(t, lab) for t, lab in zip(tickets, labels, strict=True)]

    def _width(self, ticket: Ticket) -> int:
        """How many of this ticket's retrainings share one packed network."""
        return default_pack(self.data.train_x.device, self._pack_requested,
                            param_count(ticket.state))

    def _is_cached(self, key: str) -> bool:
        return self._lookup(key) is not None

    def _retrain_packed(self, tickets: list[Ticket], labels: list[str]) -> list[JobResult]:
        first = tickets[0]
        starts = {t.rewind_epoch or 0 for t in tickets}
        if len(starts) > 1 or any((t.arch, t.num_classes, t.arch_args, list(t.mask)) !=
                                  (first.arch, first.num_classes, first.arch_args,
                                   list(first.mask)) for t in tickets):
            raise ValueError("packed retraining needs tickets of one architecture and start")
        tkey = (first.arch, first.num_classes, tuple(sorted(first.arch_args.items())),
                tuple(first.mask), len(tickets))
        seeds = [self.cfg.seed] * len(tickets)  # each job trains as it would alone
        if tkey not in self._packed:
            self._packed[tkey] = PackedTrainer(first.build_model(), self.data, self.cfg,
                                               [t.mask for t in tickets], seeds)
        ptr = self._packed[tkey]
        ptr.set_schedule(self.cfg)
        ptr.restart([t.state for t in tickets], seeds, masks=[t.mask for t in tickets])
        name = ", ".join(labels)
        cb = (lambda st: self.on_epoch(name, st[0])) if self.on_epoch else None
        results = ptr.fit(start_epoch=_start_epoch(starts.pop(), self.cfg), on_epoch=cb)
        return [JobResult.retrained(r, t, packed=len(tickets))
                for r, t in zip(results, tickets, strict=True)]

    def _finetune_key(self, ticket: Ticket, cfg: TrainConfig, dense: bool) -> str:
        return job_id("finetune", ticket.tensors_sha256(), cfg.to_dict(), self.data.info(), dense)

    def finetune(self, ticket: Ticket, cfg: TrainConfig, dense: bool, label: str = ""
                 ) -> tuple[JobResult, dict[str, torch.Tensor]]:
        """Train a released model further from its current weights (momentum from zero),
        under its mask or, `dense`, under none; the trained state is kept beside the job's
        result so a rerun reuses it."""
        key = self._finetune_key(ticket, cfg, dense)

        def run() -> tuple[JobResult, dict[str, torch.Tensor]]:
            trainer = self._trainer_for(ticket, cfg)
            trainer.restart(ticket.state, mask=_finetune_mask(ticket, dense), seeds=cfg.seed)
            cb = (lambda s: self.on_epoch(label, s)) if self.on_epoch else None
            result = trainer.fit(start_epoch=0, on_epoch=cb)
            state = trainer.best_state()  # the epoch whose accuracy the row reports
            return JobResult(result.test_accuracy, result.seconds,
                             nonzero=nonzero_fraction(state, list(ticket.mask))), state

        res = self.cached(key, run, keeps_state=True)
        return res, self._states[key]

    def finetune_many(self, ticket: Ticket, cfgs: list[TrainConfig], dense: bool,
                      labels: list[str]) -> list[tuple[JobResult, dict[str, torch.Tensor]]]:
        """`finetune` for several schedules of one model (a sweep over epochs), the uncached
        ones trained together in packed networks, each with its own learning-rate schedule."""
        keys = [self._finetune_key(ticket, c, dense) for c in cfgs]
        todo = [i for i, k in enumerate(keys) if not self._finetune_done(k)]
        width = self._width(ticket) if len(todo) > 1 else 1
        if self.devices is not None and len(todo) > 1:  # the workers fill the job store
            width = spread_width(width, len(todo), len(self.devices))
            self._spread([Job("finetune", [ticket], [labels[i] for i in todo[s:s + width]],
                              [cfgs[i].to_dict() for i in todo[s:s + width]], dense)
                          for s in range(0, len(todo), width)])
            todo = []
        for start in range(0, len(todo), width):
            chunk = todo[start:start + width]
            if len(chunk) < 2:
                continue
            results = self._finetune_packed(ticket, [cfgs[i] for i in chunk], dense,
                                            ", ".join(labels[i] for i in chunk))
            for i, (res, state) in zip(chunk, results, strict=True):
                self.cached(keys[i], lambda res=res, state=state: (res, state),
                            keeps_state=True)
        return [self.finetune(ticket, c, dense, lab) for c, lab in zip(cfgs, labels,
                                                                        strict=True)]

    def _finetune_done(self, key: str) -> bool:
        return key in self._states or self._lookup(key, keeps_state=True) is not None

    def _finetune_packed(self, ticket: Ticket, cfgs: list[TrainConfig], dense: bool,
                         label: str) -> list[tuple[JobResult, dict[str, torch.Tensor]]]:
        mask = _finetune_mask(ticket, dense)
        longest = max(cfgs, key=lambda c: c.epochs)
        k = len(cfgs)
        tkey = ("finetune", ticket.arch, ticket.num_classes,
                tuple(sorted(ticket.arch_args.items())), tuple(ticket.mask), k)
        seeds = [c.seed for c in cfgs]
        if tkey not in self._packed:
            self._packed[tkey] = PackedTrainer(ticket.build_model(), self.data, longest,
                                               [mask] * k, seeds)
        ptr = self._packed[tkey]
        ptr.set_schedules(cfgs)
        ptr.restart([ticket.state] * k, seeds, masks=[mask] * k)
        cb = (lambda st: self.on_epoch(label, st[0])) if self.on_epoch else None
        results = ptr.fit(start_epoch=0, on_epoch=cb)
        return [(JobResult(res.test_accuracy, res.seconds, packed=k,
                           nonzero=nonzero_fraction(state, list(ticket.mask))), state)
                for res, state in zip(results, ptr.best_model_states(), strict=True)]

    def _trainer_for(self, ticket: Ticket, cfg: TrainConfig) -> Trainer:
        """One trainer (one captured graph) per architecture and mask layout, reused."""
        tkey = (ticket.arch, ticket.num_classes, tuple(sorted(ticket.arch_args.items())),
                tuple(ticket.mask))
        if self._trainer is None or self._trainer_key != tkey:
            self._trainer = Trainer(ticket.build_model(), self.data, cfg, mask=ticket.mask)
            self._trainer_key = tkey
        self._trainer.set_schedule(cfg)
        return self._trainer

    def _retrain(self, ticket: Ticket, label: str) -> JobResult:
        trainer = self._trainer_for(ticket, self.cfg)
        trainer.restart(ticket.state, mask=ticket.mask, seeds=self.cfg.seed)
        cb = (lambda s: self.on_epoch(label, s)) if self.on_epoch else None
        result = trainer.fit(start_epoch=_start_epoch(ticket.rewind_epoch, self.cfg),
                             on_epoch=cb)
        return JobResult.retrained(result, ticket)


def _start_epoch(rewind_epoch: int | None, cfg: TrainConfig) -> int:
    """Retraining resumes after the ticket's rewind epoch (from 0 if the schedule is shorter)."""
    start = rewind_epoch or 0
    return 0 if start >= cfg.epochs else start


def _finetune_mask(ticket: Ticket, dense: bool) -> Mask:
    """Fine-tuning keeps the released mask; `dense` lets every pruned weight grow back."""
    return Mask({k: torch.ones_like(m) for k, m in ticket.mask.items()}) if dense \
        else ticket.mask
