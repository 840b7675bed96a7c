"""Null calibration for black-box verification: how often models that never saw a trigger set
agree with its labels. Out-of-distribution images are not answered at random, so 1/classes
can be too low a null; the upper 99% Clopper-Pearson bound of the measured agreement is a null
rate `verify --null-rate` can take."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model, prunable_names
from ticketctl.protect.blackbox_verify import predict
from ticketctl.protect.stats import clopper_pearson_upper
from ticketctl.protect.trigger import TriggerSet
from ticketctl.train import TrainConfig, Trainer
from ticketctl.train.packed import PackedTrainer, default_pack


def calibrate(arch: str, data: Dataset, ts: TriggerSet, cfg: TrainConfig, models: int = 10,
              seed: int = 1000, confidence: float = 0.99,
              on_model: Callable[[int, float], None] | None = None,
              pack: int | None = None) -> dict[str, Any]:
    """Train `models` independent dense models (own seeds and data orders, no triggers), in
    packs of `pack` per network (default 8 on CUDA), and measure their agreement with the
    trigger labels."""
    ts.check_classes(data.num_classes)
    if models < 1:
        raise TicketctlError(f"--models must be at least 1, got {models}")
    args = {"in_channels": data.input_shape[0]}
    x = ts.tensor(data.input_shape, data.mean, data.std, device=data.train_x.device)
    width = min(default_pack(data.train_x.device, pack), models)
    agreements: list[float] = []
    accuracies: list[float] = []
    template = build_model(arch, data.num_classes, seed=seed, **args).to(data.train_x.device)
    full = Mask.ones(template, prunable_names(template))
    trainers: dict[int, Trainer | PackedTrainer] = {}
    i = 0
    while i < models:
        k = min(width, models - i)
        seeds = [seed + i + j for j in range(k)]
        fresh = [build_model(arch, data.num_classes, seed=s, **args).state_dict() for s in seeds]
        if k not in trainers:
            trainers[k] = (PackedTrainer(template, data, cfg, [full] * k, seeds) if k > 1
                           else Trainer(template, data, cfg, mask=full))
        trainer = trainers[k]
        if isinstance(trainer, PackedTrainer):
            trainer.restart(fresh, seeds)
            results = trainer.fit()
            states = trainer.model_states()
        else:
            trainer.restart(fresh[0], seeds=seeds[0])
            results = [trainer.fit()]
            states = [trainer.model_state()]
        for res, state in zip(results, states, strict=True):
            template.load_state_dict(state)
            agree = float((predict(template, x) == ts.labels).mean())
            agreements.append(agree)
            accuracies.append(res.test_accuracy)
            if on_model:
                on_model(len(agreements) - 1, agree)
        i += k
    k = int(round(sum(agreements) * len(ts.labels)))
    n = models * len(ts.labels)
    return {"null_rate": clopper_pearson_upper(k, n, confidence), "confidence": confidence,
            "mean_agreement": float(np.mean(agreements)), "max_agreement": max(agreements),
            "agreements": agreements, "test_accuracies": accuracies, "models": models,
            "trigger_sha256": ts.sha256(), "arch": arch, "dataset": data.name,
            "train": cfg.to_dict(), "pack": width}


def read_null_rate(value: str, trigger: TriggerSet | None = None) -> float:
    """`--null-rate`: a number, or the calibration JSON `calibrate --out` wrote (which must be
    for this trigger set)."""
    try:
        return float(value)
    except ValueError:
        pass
    path = Path(value)
    if not path.is_file():
        raise TicketctlError(f"--null-rate must be a number or a calibration file; {value!r} "
                             "is neither")
    try:
        doc = json.loads(path.read_text())
        rate, sha = float(doc["null_rate"]), doc.get("trigger_sha256")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
        raise TicketctlError(f"{path} is not a calibration file from `ticketctl calibrate "
                             "--out` (no null_rate)") from None
    if trigger is not None and sha is not None and sha != trigger.sha256():
        raise TicketctlError(f"{path} calibrates another trigger set than --trigger "
                             f"(sha256 {sha[:12]}... vs {trigger.sha256()[:12]}...)")
    return rate
