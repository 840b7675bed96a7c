"""One-call training for simple uses (the demo, retrain): build a Trainer and fit."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import EpochStats, Trainer, TrainResult


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    mask: Mask | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    return Trainer(model, data, cfg, mask).fit(on_epoch=on_epoch)
