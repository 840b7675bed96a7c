"""Null calibration for black-box verification: how often models that never saw a trigger set
agree with its labels. Out-of-distribution images are not answered at random, so 1/classes
can be too low a null; the upper 99% Clopper-Pearson bound of the measured agreement is a null
rate `verify --null-rate` can take."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ticketctl.artifacts import Mask
from ticketctl.artifacts.io import read_input
from ticketctl.data import Dataset
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model, prunable_names
from ticketctl.protect.blackbox_verify import predict
from ticketctl.protect.stats import clopper_pearson_upper
from ticketctl.protect.trigger import TriggerSet
from ticketctl.schema import HEX64, Field, Float, Obj, check, parse_json
from ticketctl.train import TrainConfig, Trainer
from ticketctl.train.packed import PackedTrainer, default_pack, param_count


def calibrate(arch: str, data: Dataset, ts: TriggerSet, cfg: TrainConfig, models: int = 10,
              seed: int = 1000, confidence: float = 0.99,
              on_model: Callable[[int, float], None] | None = None,
              pack: int | None = None, arch_args: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Train `models` independent dense models (own seeds and data orders, no triggers), in
    packs of `pack` per network (default 8 on CUDA), and measure their agreement with the
    trigger labels."""
    ts.check_classes(data.num_classes)
    if models < 1:
        raise TicketctlError(f"--models must be at least 1, got {models}")
    args = {**(arch_args or {}), "in_channels": data.input_shape[0]}
    x = ts.tensor(data.input_shape, data.mean, data.std, device=data.train_x.device)
    template = build_model(arch, data.num_classes, seed=seed, **args).to(data.train_x.device)
    width = min(default_pack(data.train_x.device, pack, param_count(template)), models)
    agreements: list[float] = []
    accuracies: list[float] = []
    # dense training: the mask only says which weights the trainer treats as prunable
    full = Mask.ones(template, prunable_names(template) or
                     prunable_names(template, prune_linear=True))
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


# What `verify --null-rate FILE` reads from the JSON `calibrate --out` writes (other keys are
# the measurement's record, kept as they are).
CALIBRATION = Obj({"null_rate": Field(Float(0, 1, lo_open=True, hi_open=True), required=True),
                   "trigger_sha256": Field(HEX64)})
MAX_CALIBRATION_BYTES = 16 << 20


def read_null_rate(value: str, trigger: TriggerSet | None = None) -> float:
    """`--null-rate`: a number in (0, 1), or the calibration JSON `calibrate --out` wrote
    (which must be for this trigger set)."""
    try:
        rate = float(value)
    except ValueError:
        pass
    else:
        if not 0.0 < rate < 1.0:
            raise TicketctlError(f"--null-rate must be in (0, 1), got {value}")
        return rate
    path = Path(value)
    if path.is_dir():
        raise TicketctlError(f"--null-rate: {path} is a folder, not a calibration file")
    if not path.is_file():
        raise TicketctlError(f"--null-rate must be a number or a calibration file; {value!r} "
                             "is neither")
    text = read_input(path, "calibration", MAX_CALIBRATION_BYTES)
    doc = parse_json(text, str(path), "calibration file", MAX_CALIBRATION_BYTES)
    if not isinstance(doc, dict):
        raise TicketctlError(f"{path} is not a calibration file from `ticketctl calibrate "
                             "--out` (not a JSON object)")
    check(CALIBRATION, doc, str(path), "calibration file")
    sha = doc.get("trigger_sha256")
    if trigger is not None and sha is not None and sha != trigger.sha256():
        raise TicketctlError(f"{path} calibrates another trigger set than --trigger "
                             f"(sha256 {sha[:12]}... vs {trigger.sha256()[:12]}...)")
    return float(doc["null_rate"])
