"""Null calibration for black-box verification: how often models that never saw a trigger set
agree with its labels. Out-of-distribution images are not answered at random, so 1/classes
can be too low a null; the upper 99% Clopper-Pearson bound of the measured agreement is a null
rate `verify --null-rate` can take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.models import build_model, prunable_names
from ticketctl.protect.blackbox_verify import predict
from ticketctl.protect.stats import clopper_pearson_upper
from ticketctl.protect.trigger import TriggerSet
from ticketctl.train import TrainConfig, Trainer


def calibrate(arch: str, data: Dataset, ts: TriggerSet, cfg: TrainConfig, models: int = 10,
              seed: int = 1000, confidence: float = 0.99,
              on_model: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train `models` independent dense models (own seeds and data orders, no triggers) with
    one reused trainer, and measure their agreement with the trigger labels."""
    ts.check_classes(data.num_classes)
    args = {"in_channels": data.input_shape[0]}
    model = build_model(arch, data.num_classes, seed=seed, **args)
    full = Mask.ones(model, prunable_names(model))
    trainer = Trainer(model, data, cfg, mask=full)
    x = ts.tensor(data.input_shape, data.mean, data.std, device=data.train_x.device)
    agreements, accuracies = [], []
    for i in range(models):
        fresh = build_model(arch, data.num_classes, seed=seed + i, **args)
        trainer.load_model_state(fresh.state_dict())
        trainer.load_optimizer_state(None)
        trainer.reseed(seed + i)
        res = trainer.fit()
        agree = float((predict(trainer.model, x) == ts.labels).mean())
        agreements.append(agree)
        accuracies.append(res.test_accuracy)
        if on_model:
            on_model(i, agree)
    k = int(round(sum(agreements) * len(ts.labels)))
    n = models * len(ts.labels)
    return {"null_rate": clopper_pearson_upper(k, n, confidence), "confidence": confidence,
            "mean_agreement": float(np.mean(agreements)), "max_agreement": max(agreements),
            "agreements": agreements, "test_accuracies": accuracies, "models": models,
            "trigger_sha256": ts.sha256(), "arch": arch, "dataset": data.name,
            "train": cfg.to_dict()}
