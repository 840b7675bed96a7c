"""Retraining a ticket: its rewind weights under its mask, with the same trainer as `find`."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ticketctl.artifacts import Kind, Ticket
from ticketctl.data import Dataset
from ticketctl.distributed import DistContext
from ticketctl.train.config import TrainConfig
from ticketctl.train.engine import EpochStats, Trainer, TrainResult


def retrain_ticket(
    ticket: Ticket,
    data: Dataset,
    cfg: TrainConfig,
    on_epoch: Callable[[EpochStats], None] | None = None,
    trigger: tuple[torch.Tensor, torch.Tensor] | None = None,
    trigger_per_batch: int = 1,
    trigger_sha256: str | None = None,
    dist: DistContext | None = None,
) -> tuple[TrainResult, Ticket]:
    """Train epochs rewind_epoch+1..epochs from the ticket's weights (momentum starts at
    zero: a ticket file holds weights, not optimizer state) and return the trained model: the
    weights of the best-validation epoch, whose test and trigger accuracy the result reports."""
    model = ticket.build_model()
    trainer = Trainer(model, data, cfg, mask=ticket.mask, trigger=trigger,
                      trigger_per_batch=trigger_per_batch, dist=dist)
    start = ticket.rewind_epoch or 0
    if start >= cfg.epochs:
        start = 0
    result = trainer.fit(start_epoch=start, on_epoch=on_epoch)
    trained = ticket.derive(
        state=trainer.best_state(), kind=Kind.TRAINED, dataset=data.info(), seed=cfg.seed,
        extra={**{k: v for k, v in ticket.extra.items() if k != "ticket_accuracy"},
               "retrained_from": ticket.tensors_sha256(), "test_accuracy": result.test_accuracy,
               **({"trigger_sha256": trigger_sha256,
                   "trigger_accuracy": result.trigger_accuracy} if trigger is not None else {})},
    )
    return result, trained


# How often each trigger image must be seen in training to be learnt: measured on ResNet-20 /
# CIFAR-10 (docs/SCHEME_V3.md), about 33 views gave 35% of the set, 130 gave 85-87%, 260 gave
# 99-100%. Digits learn with fewer.
TRIGGER_VIEWS = 260


def default_trigger_per_batch(n_triggers: int, train_size: int, cfg: TrainConfig,
                              start_epoch: int = 0) -> tuple[int, float]:
    """Trigger images per batch so that each is seen about TRIGGER_VIEWS times over the
    schedule (the paper's 1 per batch is far too few at batch 512 or on a small dataset), at
    most a quarter of the batch; returns it and the views it gives."""
    steps = max(1, train_size // cfg.batch_size) * max(1, cfg.epochs - start_epoch)
    k = min(max(1, math.ceil(TRIGGER_VIEWS * n_triggers / steps)), max(1, cfg.batch_size // 4))
    return k, steps * k / n_triggers
