"""Scheme V3 verification: how many trigger labels a suspect model reproduces, and how
unlikely that is for a model that never saw the set (binomial, against a null agreement
rate: 1/classes by default, or a rate calibrated on independently trained models)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ticketctl.data import Dataset
from ticketctl.protect.blackbox import plan_queries, run_predict_cmd, split_answers
from ticketctl.protect.stats import binomial_tail
from ticketctl.protect.trigger import TriggerSet
from ticketctl.protect.verdict import TriggerReading


def score(predicted: np.ndarray, labels: np.ndarray, null_rate: float) -> TriggerReading:
    k = int((np.asarray(predicted) == np.asarray(labels)).sum())
    n = len(labels)
    return TriggerReading(100.0 * k / n, binomial_tail(k, n, null_rate), k, n, null_rate)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    model.eval()
    out = [model(x[i:i + batch_size]).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def to_uint8(data: Dataset, x: torch.Tensor) -> np.ndarray:
    """Normalised N x C x H x W back to the uint8 N x H x W x C a service would be sent."""
    m = torch.tensor(data.mean).view(1, -1, 1, 1).to(x.device)
    s = torch.tensor(data.std).view(1, -1, 1, 1).to(x.device)
    pixels = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def verify_model_triggers(model: nn.Module, ts: TriggerSet, data: Dataset,
                          null_rate: float) -> TriggerReading:
    x = ts.tensor(data.input_shape, data.mean, data.std, device=next(model.parameters()).device)
    return score(predict(model, x), ts.labels, null_rate)


def verify_command_triggers(cmd: str, ts: TriggerSet, data: Dataset, null_rate: float,
                            seed: int = 0, timeout: float = 300.0) -> TriggerReading:
    """Query a model behind a command: the triggers (at the data's image size) shuffled among
    as many test images, so the service cannot tell them apart by position."""
    triggers = to_uint8(data, ts.tensor(data.input_shape, data.mean, data.std))
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(data.test_y), generator=gen)[: len(ts.labels)]
    decoys = to_uint8(data, data.test_x[pick.to(data.test_x.device)])
    plan = plan_queries(triggers, decoys, seed)
    answers = run_predict_cmd(cmd, plan.images, timeout=timeout)
    on_triggers, on_decoys = split_answers(answers, plan)
    verdict = score(on_triggers, ts.labels, null_rate)
    verdict.decoy_accuracy = 100.0 * float(
        (on_decoys == data.test_y[pick.to(data.test_y.device)].cpu().numpy()).mean())
    return verdict
