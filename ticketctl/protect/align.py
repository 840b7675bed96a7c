"""Re-aligning a layer whose channels were permuted (a function-preserving attack), so the
code is read where the receipt put it. Each row and column of the signed layer has a
fingerprint that does not depend on the order of the other axis: its largest |w| and the
sorted kept-weight counts of its kernels. The receipt stores them; verification matches the
suspect's channels to them by minimum-cost assignment (scipy)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

TOP = 8


def _counts(mask: torch.Tensor) -> np.ndarray:
    m = mask.reshape(mask.shape[0], mask.shape[1], -1) if mask.dim() > 2 else mask[..., None]
    return m.sum(-1).numpy().astype(np.float64)


def fingerprints(weight: torch.Tensor, mask: torch.Tensor) -> dict[str, list[list[float]]]:
    """Per output channel (row) and input channel (column)."""
    w = (weight.detach().abs() * mask).to(torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w[..., None]
    counts = _counts(mask)

    def one(axis: int) -> list[list[float]]:
        vals = w.transpose(0, 1) if axis == 1 else w
        flat = vals.reshape(vals.shape[0], -1)
        top = torch.topk(flat, min(TOP, flat.shape[1]), dim=1).values.numpy()
        c = np.sort(counts.T if axis == 1 else counts, axis=1)
        return np.concatenate([top, c], axis=1).round(6).tolist()

    return {"rows": one(0), "cols": one(1)}


def _match(reference: list[list[float]], suspect: list[list[float]]) -> np.ndarray:
    """For each reference channel, the suspect channel that best matches it."""
    a, b = np.asarray(reference), np.asarray(suspect)
    top = slice(0, TOP)
    scale = max(float(np.abs(a[:, top]).max()), 1e-12)
    cost = np.abs(a[:, None, top] - b[None, :, top]).sum(-1) / scale + \
        np.abs(a[:, None, TOP:] - b[None, :, TOP:]).sum(-1) / max(1.0, a.shape[1] - TOP)
    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(a), dtype=np.int64)
    order[rows] = cols
    return order


def align(weight: torch.Tensor, mask: torch.Tensor,
          reference: dict[str, list[list[float]]]) -> torch.Tensor:
    """The suspect's mask with rows and columns put back in the receipt's order."""
    if len(reference["rows"]) != mask.shape[0] or len(reference["cols"]) != mask.shape[1]:
        return mask
    fp = fingerprints(weight, mask)
    r = torch.from_numpy(_match(reference["rows"], fp["rows"]))
    c = torch.from_numpy(_match(reference["cols"], fp["cols"]))
    return mask[r][:, c]
