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


class NullModels:
    """Trains dense models that never saw the trigger set, a chunk of seeds at a time (packed
    on CUDA), and measures each one's agreement with the trigger labels and its test
    accuracy. One per process: a spread calibration gives each worker its own."""

    def __init__(self, arch: str, data: Dataset, ts: TriggerSet, cfg: TrainConfig, seed: int,
                 arch_args: dict[str, Any] | None = None) -> None:
        self.arch, self.data, self.ts, self.cfg = arch, data, ts, cfg
        self.args = {**(arch_args or {}), "in_channels": data.input_shape[0]}
        self.x = ts.tensor(data.input_shape, data.mean, data.std, device=data.train_x.device)
        self.template = build_model(arch, data.num_classes, seed=seed,
                                    **self.args).to(data.train_x.device)
        # dense training: the mask only says which weights the trainer treats as prunable
        self.full = Mask.ones(self.template, prunable_names(self.template) or
                              prunable_names(self.template, prune_linear=True))
        self.trainers: dict[int, Trainer | PackedTrainer] = {}

    def width(self, pack: int | None, models: int) -> int:
        return min(default_pack(self.data.train_x.device, pack, param_count(self.template)),
                   models)

    def chunk(self, seeds: list[int]) -> list[tuple[float, float]]:
        """(agreement, test accuracy) of one model per seed, trained together."""
        k = len(seeds)
        fresh = [build_model(self.arch, self.data.num_classes, seed=s, **self.args).state_dict()
                 for s in seeds]
        if k not in self.trainers:
            self.trainers[k] = (PackedTrainer(self.template, self.data, self.cfg,
                                              [self.full] * k, seeds) if k > 1
                                else Trainer(self.template, self.data, self.cfg, mask=self.full))
        trainer = self.trainers[k]
        if isinstance(trainer, PackedTrainer):
            trainer.restart(fresh, seeds)
            results = trainer.fit()
            states = trainer.model_states()
        else:
            trainer.restart(fresh[0], seeds=seeds[0])
            results = [trainer.fit()]
            states = [trainer.model_state()]
        out = []
        for res, state in zip(results, states, strict=True):
            self.template.load_state_dict(state)
            agree = float((predict(self.template, self.x) == self.ts.labels).mean())
            out.append((agree, res.test_accuracy))
        return out


def calibrate(arch: str, data: Dataset, ts: TriggerSet, cfg: TrainConfig, models: int = 10,
              seed: int = 1000, confidence: float = 0.99,
              on_model: Callable[[int, float], None] | None = None,
              pack: int | None = None, arch_args: dict[str, Any] | None = None,
              devices: list[Any] | None = None) -> dict[str, Any]:
    """Train `models` independent dense models (own seeds and data orders, no triggers), in
    packs of `pack` per network (default 8 on CUDA for small models), and measure their
    agreement with the trigger labels. `devices` (two or more): the packs are spread over one
    worker process each (`attacks.spread`), cut so every device gets one; each model keeps
    its seed, so the results are one device's (equal on CPU; on a GPU packing changes only
    float rounding)."""
    ts.check_classes(data.num_classes)
    if models < 1:
        raise TicketctlError(f"--models must be at least 1, got {models}")
    null = NullModels(arch, data, ts, cfg, seed, arch_args)
    width = null.width(pack, models)
    if devices is not None and len(devices) > 1:  # a pack for every device
        from ticketctl.attacks.spread import spread_width

        width = spread_width(width, models, len(devices))
    chunks = [[seed + i + j for j in range(min(width, models - i))]
              for i in range(0, models, width)]
    agreements: list[float] = []
    accuracies: list[float] = []
    if devices is not None and len(devices) > 1 and len(chunks) > 1:
        from ticketctl.attacks.spread import DataSpec, Job, run_spread

        jobs = [Job("calibrate", [], [], payload={
            "index": n, "arch": arch, "seeds": c, "trigger": ts, "seed": seed,
            "arch_args": arch_args}) for n, c in enumerate(chunks)]
        done = run_spread(jobs, devices, DataSpec.of(data), cfg.to_dict(), None, pack)
        measured = [pair for n in range(len(chunks)) for pair in done[n]]
    else:
        measured = [pair for c in chunks for pair in null.chunk(c)]
    for agree, acc in measured:
        agreements.append(agree)
        accuracies.append(acc)
        if on_model:
            on_model(len(agreements) - 1, agree)
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
