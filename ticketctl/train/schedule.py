"""Learning-rate schedules, as a pure function of the step."""

from __future__ import annotations

import math

from ticketctl.train.config import TrainConfig


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over `warmup_epochs`, then multi-step drops or cosine decay to zero."""
    epoch = step / steps_per_epoch
    if cfg.warmup_epochs and epoch < cfg.warmup_epochs:
        return cfg.lr * (step + 1) / (cfg.warmup_epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        start = cfg.warmup_epochs * steps_per_epoch
        frac = (step - start) / max(1, total - start)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    drops = sum(1 for m in cfg.milestones if int(epoch) >= m)
    return cfg.lr * cfg.gamma**drops
