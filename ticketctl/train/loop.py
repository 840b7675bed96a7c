"""A plain eager trainer: SGD under a mask, test accuracy reported at the best-validation
epoch (the paper's rule). Masked weights stay exactly zero: gradients are masked before the
step (so momentum never accumulates for them) and weights re-masked after it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.artifacts import Mask
from ticketctl.data import Dataset, augment_batch
from ticketctl.train.config import TrainConfig


@dataclass
class EpochStats:
    epoch: int
    lr: float
    train_loss: float
    val_accuracy: float | None
    test_accuracy: float


@dataclass
class TrainResult:
    best_epoch: int
    val_accuracy: float | None
    test_accuracy: float  # at the best-validation epoch (last epoch when there is no val split)
    history: list[EpochStats] = field(default_factory=list)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy in percent."""
    if len(y) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    model.train(was_training)
    return 100.0 * correct / len(y)


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate for a step: linear warm-up, then multi-step drops or cosine decay."""
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def train(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    mask: Mask | None = None,
    on_epoch: Callable[[EpochStats], None] | None = None,
) -> TrainResult:
    device = data.train_x.device
    model.to(device).train()
    params = dict(model.named_parameters())
    masks = {n: m.to(device=device, dtype=params[n].dtype) for n, m in (mask or {}).items()}
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    n = len(data.train_y)
    steps_per_epoch = max(1, n // cfg.batch_size)  # drop the last partial batch
    history: list[EpochStats] = []
    best = (-1.0, 0, float("nan"))  # (val, epoch, test)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=gen).to(device)
        total_loss = torch.zeros((), device=device)
        for b in range(steps_per_epoch):
            lr = lr_at(cfg, step, steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            x = augment_batch(data.train_x[idx], data.augment, aug_gen)
            loss = F.cross_entropy(model(x), data.train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for name, m in masks.items():
                params[name].grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for name, m in masks.items():
                    params[name].mul_(m)
            total_loss += loss.detach()
            step += 1
        val = evaluate(model, data.val_x, data.val_y, cfg.eval_batch_size)
        test = evaluate(model, data.test_x, data.test_y, cfg.eval_batch_size)
        stats = EpochStats(epoch, lr, float(total_loss) / steps_per_epoch,
                           None if math.isnan(val) else val, test)
        history.append(stats)
        score = val if not math.isnan(val) else float(epoch)
        if score > best[0]:
            best = (score, epoch, test)
        if on_epoch:
            on_epoch(stats)
    best_val = history[best[1] - 1].val_accuracy if history else None
    return TrainResult(best_epoch=best[1], val_accuracy=best_val, test_accuracy=best[2],
                       history=history)
