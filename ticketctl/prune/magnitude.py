"""Magnitude pruning as a pure function: (weights, current mask, rate) -> new mask."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ticketctl.artifacts import Mask
from ticketctl.errors import TicketctlError
from ticketctl.records import Choice


class Scope(Choice):
    """Where magnitude pruning ranks weights: all prunable layers together, or per layer."""

    GLOBAL = "global"
    LAYER = "layer"


def _remove_smallest(scores: torch.Tensor, alive: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Drop exactly n_remove alive entries with the smallest score; ties go to the lower
    index (a stable sort), so the result is deterministic."""
    keep = alive.clone().reshape(-1)
    idx_alive = keep.nonzero().squeeze(1)
    if n_remove <= 0:
        return keep.reshape(alive.shape)
    order = torch.argsort(scores.reshape(-1)[idx_alive], stable=True)
    keep[idx_alive[order[:n_remove]]] = False
    return keep.reshape(alive.shape)


def magnitude_prune(
    weights: Mapping[str, torch.Tensor], mask: Mask, rate: float, scope: str = "global"
) -> Mask:
    """Remove round(rate x kept) of the weights still alive, smallest |w| first.

    `global` ranks all prunable weights together (the paper); `layer` removes the same
    fraction from each layer."""
    if not 0.0 < rate < 1.0:
        raise TicketctlError(f"pruning rate must be in (0, 1), got {rate}")
    names = list(mask)
    w = {n: weights[n].detach().to("cpu", torch.float32).abs() for n in names}
    scope = Scope.parse(str(scope), "pruning scope")
    if scope == Scope.LAYER:
        return Mask({n: _remove_smallest(w[n], mask[n], round(rate * int(mask[n].sum())))
                     for n in names})
    flat_scores = torch.cat([w[n].reshape(-1) for n in names])
    flat_alive = torch.cat([mask[n].reshape(-1) for n in names])
    keep = _remove_smallest(flat_scores, flat_alive, round(rate * int(flat_alive.sum())))
    out, start = {}, 0
    for n in names:
        k = mask[n].numel()
        out[n] = keep[start:start + k].reshape(mask[n].shape)
        start += k
    return Mask(out)
