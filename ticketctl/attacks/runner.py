"""The attack runner: each row of a sweep is an independent job whose result is cached as a
small JSON file in the sweep's folder, so a sweep reuses what it already trained and an
interrupted sweep resumes. Retraining reuses one Trainer (and on CUDA one captured graph)
for every ticket of the same architecture, copying weights and masks in place."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ticketctl.artifacts import Mask, Ticket
from ticketctl.artifacts.io import atomic_path, write_text_atomic
from ticketctl.data import Dataset
from ticketctl.train import EpochStats, TrainConfig, Trainer
from ticketctl.train.packed import PackedTrainer, default_pack

MATCH_POINTS = 1.0  # the paper's criterion: within 1 accuracy point of the reference


@dataclass
class AttackRow:
    strength: Any
    accuracy: float
    delta: float | None = None  # accuracy minus the reference's
    matches: bool | None = None  # still within MATCH_POINTS of the reference
    verified: bool | None = None
    message: str | None = None
    p_value: float | None = None
    trigger_accuracy: float | None = None
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class AttackReport:
    attack: str
    reference_accuracy: float | None
    reference: str
    rows: list[AttackRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare(rows: list[AttackRow], reference: float | None) -> None:
    """Fill in the change against the reference and the matching verdict."""
    for row in rows:
        if reference is not None:
            row.delta = row.accuracy - reference
            row.matches = row.accuracy >= reference - MATCH_POINTS


def nonzero_fraction(state: dict[str, torch.Tensor], names: list[str]) -> float:
    """Share of the masked layers' positions holding a nonzero weight (revived ones too)."""
    kept = [state[n] != 0 for n in names]
    return float(sum(int(m.sum()) for m in kept) / sum(m.numel() for m in kept))


def job_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AttackRunner:
    def __init__(
        self,
        data: Dataset,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        on_epoch: Callable[[str, EpochStats], None] | None = None,
        pack: int | None = None,
    ) -> None:
        """pack: retrainings of one architecture run this many to a packed network
        (`retrain_many`; default 8 on CUDA, 1 on CPU)."""
        self.data = data
        self.pack = default_pack(data.train_x.device, pack)
        self._packed: dict[tuple, PackedTrainer] = {}
        self._memo: dict[str, dict[str, Any]] = {}
        self._states: dict[str, dict[str, torch.Tensor]] = {}
        self.cfg = cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            (self.out_dir / "jobs").mkdir(parents=True, exist_ok=True)
        self.on_epoch = on_epoch
        self._trainer: Trainer | None = None
        self._trainer_key: tuple | None = None
        self.jobs_run = 0
        self.jobs_cached = 0

    def cached(self, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run fn once per key; with an out_dir its result survives the process."""
        path = self.out_dir / "jobs" / f"{key}.json" if self.out_dir else None
        if key in self._memo:  # asked again in this process: not counted twice
            return self._memo[key]
        if path is not None and path.exists():
            self.jobs_cached += 1
            self._memo[key] = json.loads(path.read_text())
            return self._memo[key]
        result = fn()
        self._memo[key] = result
        self.jobs_run += 1
        if path is not None:
            write_text_atomic(path, json.dumps(result), force=True)
        return result

    def _retrain_key(self, ticket: Ticket) -> str:
        return job_id("retrain", ticket.tensors_sha256(), self.cfg.to_dict(), self.data.info())

    def retrain(self, ticket: Ticket, label: str = "") -> dict[str, Any]:
        """Train a ticket from its (rewind) weights under its mask; cached by content."""
        return self.cached(self._retrain_key(ticket), lambda: self._retrain(ticket, label))

    def retrain_many(self, tickets: list[Ticket], labels: list[str] | None = None
                     ) -> list[dict[str, Any]]:
        """`retrain` for several tickets of one architecture, the uncached ones trained
        `self.pack` at a time in one packed network; each result is cached on its own."""
        labels = labels or [""] * len(tickets)
        keys = [self._retrain_key(t) for t in tickets]
        todo = [i for i, k in enumerate(keys) if not self._is_cached(k)]
        todo = [i for n, i in enumerate(todo) if keys[i] not in {keys[j] for j in todo[:n]}]
        width = self.pack if len(todo) > 1 else 1
        for start in range(0, len(todo), width):
            chunk = todo[start:start + width]
            if len(chunk) == 1:
                continue  # trained alone below, by retrain
            results = self._retrain_packed([tickets[i] for i in chunk],
                                           [labels[i] for i in chunk])
            for i, res in zip(chunk, results, strict=True):
                self.cached(keys[i], lambda res=res: res)
        return [self.retrain(t, lab) for t, lab in zip(tickets, labels, strict=True)]

    def _is_cached(self, key: str) -> bool:
        return key in self._memo or (self.out_dir is not None
                                     and (self.out_dir / "jobs" / f"{key}.json").exists())

    def _retrain_packed(self, tickets: list[Ticket], labels: list[str]
                        ) -> list[dict[str, Any]]:
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
        ptr.set_masks([t.mask for t in tickets])
        ptr.load_model_states([t.state for t in tickets])
        ptr.load_optimizer_state(None)
        ptr.reseed(seeds)
        start = starts.pop()
        if start >= self.cfg.epochs:
            start = 0
        name = ", ".join(labels)
        cb = (lambda st: self.on_epoch(name, st[0])) if self.on_epoch else None
        results = ptr.fit(start_epoch=start, on_epoch=cb)
        return [{"accuracy": r.test_accuracy, "val_accuracy": r.val_accuracy,
                 "best_epoch": r.best_epoch, "seconds": r.seconds, "density": t.density,
                 "packed": len(tickets)} for r, t in zip(results, tickets, strict=True)]

    def finetune(self, ticket: Ticket, cfg: TrainConfig, dense: bool, label: str = ""
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Train a released model further from its current weights (momentum from zero),
        under its mask or, `dense`, under none; the trained state is kept beside the job's
        result so a rerun reuses it."""
        key = job_id("finetune", ticket.tensors_sha256(), cfg.to_dict(), self.data.info(),
                     dense)
        states: dict[str, dict[str, torch.Tensor]] = {}
        state_path = self.out_dir / "jobs" / f"{key}.safetensors" if self.out_dir else None

        def run() -> dict[str, Any]:
            mask = Mask({k: torch.ones_like(m) for k, m in ticket.mask.items()}) if dense \
                else ticket.mask
            trainer = self._trainer_for(ticket, cfg)
            trainer.set_mask(mask)
            trainer.load_model_state(ticket.state)
            trainer.load_optimizer_state(None)
            trainer.reseed(cfg.seed)
            cb = (lambda s: self.on_epoch(label, s)) if self.on_epoch else None
            result = trainer.fit(start_epoch=0, on_epoch=cb)
            state = trainer.model_state()
            states["state"] = state
            if state_path is not None:
                with atomic_path(state_path, force=True) as tmp:
                    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            return {"accuracy": result.test_accuracy, "seconds": result.seconds,
                    "nonzero": nonzero_fraction(state, list(ticket.mask))}

        if state_path is not None and not state_path.exists():
            (self.out_dir / "jobs" / f"{key}.json").unlink(missing_ok=True)
        res = self.cached(key, run)
        if "state" in states:
            self._states[key] = states["state"]
        state = self._states.get(key) or load_file(str(state_path))
        return res, state

    def finetune_many(self, ticket: Ticket, cfgs: list[TrainConfig], dense: bool,
                      labels: list[str]) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        """`finetune` for several schedules of one model (a sweep over epochs), the uncached
        ones trained together in packed networks, each with its own learning-rate schedule."""
        keys = [job_id("finetune", ticket.tensors_sha256(), c.to_dict(), self.data.info(),
                       dense) for c in cfgs]
        todo = [i for i, k in enumerate(keys) if not self._finetune_done(k)]
        width = self.pack if len(todo) > 1 else 1
        for start in range(0, len(todo), width):
            chunk = todo[start:start + width]
            if len(chunk) < 2:
                continue
            results = self._finetune_packed(ticket, [cfgs[i] for i in chunk], dense,
                                            ", ".join(labels[i] for i in chunk))
            for i, (res, state) in zip(chunk, results, strict=True):
                self._states[keys[i]] = state
                if self.out_dir is not None:
                    with atomic_path(self.out_dir / "jobs" / f"{keys[i]}.safetensors",
                                     force=True) as tmp:
                        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
                self.cached(keys[i], lambda res=res: res)
        return [self.finetune(ticket, c, dense, lab) for c, lab in zip(cfgs, labels,
                                                                        strict=True)]

    def _finetune_done(self, key: str) -> bool:
        if key in self._states:
            return True
        return self.out_dir is not None and (self.out_dir / "jobs" / f"{key}.json").exists() \
            and (self.out_dir / "jobs" / f"{key}.safetensors").exists()

    def _finetune_packed(self, ticket: Ticket, cfgs: list[TrainConfig], dense: bool,
                         label: str) -> list[tuple[dict[str, Any], dict[str, torch.Tensor]]]:
        mask = Mask({k: torch.ones_like(m) for k, m in ticket.mask.items()}) if dense \
            else ticket.mask
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
        ptr.set_masks([mask] * k)
        ptr.load_model_states([ticket.state] * k)
        ptr.load_optimizer_state(None)
        ptr.reseed(seeds)
        cb = (lambda st: self.on_epoch(label, st[0])) if self.on_epoch else None
        results = ptr.fit(start_epoch=0, on_epoch=cb)
        states = ptr.final_model_states()
        out = []
        for res, state in zip(results, states, strict=True):
            out.append(({"accuracy": res.test_accuracy, "seconds": res.seconds, "packed": k,
                         "nonzero": nonzero_fraction(state, list(ticket.mask))}, state))
        return out

    def _trainer_for(self, ticket: Ticket, cfg: TrainConfig) -> Trainer:
        """One trainer (one captured graph) per architecture and mask layout, reused."""
        tkey = (ticket.arch, ticket.num_classes, tuple(sorted(ticket.arch_args.items())),
                tuple(ticket.mask))
        if self._trainer is None or self._trainer_key != tkey:
            self._trainer = Trainer(ticket.build_model(), self.data, cfg, mask=ticket.mask)
            self._trainer_key = tkey
        self._trainer.set_schedule(cfg)
        return self._trainer

    def _retrain(self, ticket: Ticket, label: str) -> dict[str, Any]:
        trainer = self._trainer_for(ticket, self.cfg)
        trainer.set_mask(ticket.mask)
        trainer.load_model_state(ticket.state)
        trainer.load_optimizer_state(None)
        trainer.reseed(self.cfg.seed)
        start = ticket.rewind_epoch or 0
        if start >= self.cfg.epochs:
            start = 0
        cb = (lambda s: self.on_epoch(label, s)) if self.on_epoch else None
        result = trainer.fit(start_epoch=start, on_epoch=cb)
        return {"accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
                "best_epoch": result.best_epoch, "seconds": result.seconds,
                "density": ticket.density}
