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


def job_id(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class AttackRunner:
    def __init__(
        self,
        data: Dataset,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        on_epoch: Callable[[str, EpochStats], None] | None = None,
    ) -> None:
        self.data = data
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
        if path is not None and path.exists():
            self.jobs_cached += 1
            return json.loads(path.read_text())
        result = fn()
        self.jobs_run += 1
        if path is not None:
            write_text_atomic(path, json.dumps(result), force=True)
        return result

    def retrain(self, ticket: Ticket, label: str = "") -> dict[str, Any]:
        """Train a ticket from its (rewind) weights under its mask; cached by content."""
        key = job_id("retrain", ticket.tensors_sha256(), self.cfg.to_dict(),
                     self.data.info())
        return self.cached(key, lambda: self._retrain(ticket, label))

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
            kept = [state[k] != 0 for k in ticket.mask]
            return {"accuracy": result.test_accuracy, "seconds": result.seconds,
                    "nonzero": float(sum(int(m.sum()) for m in kept)
                                     / sum(m.numel() for m in kept))}

        if state_path is not None and not state_path.exists():
            (self.out_dir / "jobs" / f"{key}.json").unlink(missing_ok=True)
        res = self.cached(key, run)
        state = states.get("state") or load_file(str(state_path))
        return res, state

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
