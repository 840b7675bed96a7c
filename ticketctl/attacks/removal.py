"""Removal attacks on a released model, no training involved: pruning a further fraction of
its weights (by magnitude or at random, every conv layer included, the first too, as the
paper) and reviving a fraction of its pruned positions with small random weights (add-on).
Each attacked model is scored: test accuracy, and every check the owner has (receipt,
trigger set)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ticketctl.artifacts import Mask, Ticket
from ticketctl.attacks.checks import Checker
from ticketctl.attacks.runner import AttackReport, compare, scored_row
from ticketctl.data import Dataset
from ticketctl.errors import TicketctlError
from ticketctl.prune import Scope, magnitude_prune
from ticketctl.records import Choice
from ticketctl.train import evaluate


class Method(Choice):
    """How `attack prune` picks the weights it removes."""

    OMP = "omp"  # the smallest magnitudes
    RANDOM = "random"


def attack_mask(ticket: Ticket) -> Mask:
    """The attacker's view: every conv and linear weight, kept where it is nonzero."""
    return Mask({k: (ticket.mask[k] if k in ticket.mask else v != 0)
                 for k, v in ticket.state.items() if v.dim() >= 2 and v.is_floating_point()})


def random_prune(mask: Mask, rate: float, seed: int) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    names = list(mask)
    flat = torch.cat([mask[k].reshape(-1) for k in names])
    alive = torch.nonzero(flat).squeeze(1)
    drop = alive[torch.randperm(len(alive), generator=gen)[: round(rate * len(alive))]]
    flat[drop] = False
    out, start = {}, 0
    for k in names:
        out[k] = flat[start:start + mask[k].numel()].reshape(mask[k].shape)
        start += mask[k].numel()
    return Mask(out)


def pruned(ticket: Ticket, method: str, rate: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state after removing `rate` of the remaining weights."""
    full = attack_mask(ticket)
    if Method.parse(str(method), "--method") == Method.OMP:
        mask = magnitude_prune(ticket.state, full, rate, scope=Scope.GLOBAL)
    else:
        mask = random_prune(full, rate, seed)
    return mask.apply_state(ticket.state)


def added(ticket: Ticket, rate: float, seed: int = 0, scale: float = 0.1
          ) -> dict[str, torch.Tensor]:
    """Revive `rate` of each masked layer's pruned positions with weights of `scale` x the
    layer's median kept |w| (small enough to keep accuracy, as the attack intends)."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in ticket.state.items()}
    for k, m in ticket.mask.items():
        free = torch.nonzero(~m.reshape(-1)).squeeze(1)
        pick = free[torch.randperm(len(free), generator=gen)[: round(rate * len(free))]]
        kept = ticket.state[k][m].abs()
        size = float(kept.median()) * scale if kept.numel() else 1e-3
        flat = state[k].reshape(-1).clone()
        flat[pick] = (torch.randn(len(pick), generator=gen) * size).to(flat.dtype)
        state[k] = flat.reshape(state[k].shape)
    return state


def _check_strengths(values: list[float], what: str) -> None:
    if not values:
        raise TicketctlError(f"{what} needs at least one value")
    for v in values:
        if not 0.0 <= v < 1.0:
            raise TicketctlError(f"{what} must be in [0, 1), got {v}")


def sweep(ticket: Ticket, data: Dataset | None, attack: str, strengths: list[Any],
          make: Callable[[Any], Any], checks: Checker | None,
          rates: bool = True) -> AttackReport:
    """Score the unattacked model (the reference) and every attacked one; without a dataset
    (a ticket whose network cannot be built) the accuracies are not measured and only the
    marks are checked. `rates`: the strengths are fractions in [0, 1) (checked here);
    otherwise the attack checked its own."""
    if rates:
        _check_strengths(strengths, "--rates")
    elif not strengths:
        raise TicketctlError(f"attack {attack} needs at least one strength")
    model = ticket.build_model(data.train_x.device) if data is not None else None

    def accuracy(state: dict[str, torch.Tensor]) -> float | None:
        if model is None or data is None:
            return None
        model.load_state_dict(state)
        return evaluate(model, data.test_x, data.test_y)

    ref_acc = accuracy(ticket.state)
    rows = []
    for s in strengths:
        made = make(s)
        # an attack that changes shapes gives (released state, the same function in the
        # ticket's shapes): scored on the second, checked on the first
        released, runs_as = made if isinstance(made, tuple) else (made, None)
        state = released if runs_as is None else runs_as
        rows.append(scored_row(s, accuracy(state),
                               checks(released, runs_as) if checks else None))
    compare(rows, ref_acc)
    return AttackReport(attack, ref_acc, "the unattacked model", rows)


def mark_removed(report: AttackReport) -> bool:
    """Did some attack leave a model that still matches the original but fails every check?"""
    return any(r.matches and r.verified is False for r in report.rows)
