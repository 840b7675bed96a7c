"""The permutation attack (not in the paper's tables): relabel the hidden units of a network,
with everything indexed by them, so every output is unchanged but the pattern of the mask
moves.

Permutable, read from the traced channel graph (`ticketctl.models.trace`): the output units
of a conv or linear layer that reach only other layers' weights, through channel-wise
operations (activations, BatchNorm, LayerNorm over them, pooling, flatten): a chain CNN's
every conv, a ResNet block's inner convs, an MLP's hidden units. Their layer's weight rows and
bias, their norm's parameters and statistics, and the input columns of every layer that
reads them (blocks of H*W columns for a linear layer after a flatten) move together. Units
that are summed with others (the residual stream), mixed (attention heads), concatenated,
sliced, grouped or returned stay in place."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from ticketctl.artifacts import Mask, Ticket
from ticketctl.models.topology import topology


@dataclass
class Group:
    producer: str  # the weight whose output units (rows) are relabelled
    size: int
    follow: list[str]  # tensors whose first axis are the same units: bias, norm
    consumers: list[tuple[str, int]]  # weights reading them, and the columns each unit owns


def permutable_groups(ticket: Ticket, model: nn.Module | None = None) -> list[Group]:
    """The unit groups that can be relabelled without changing any output; `model` is the
    ticket's network (by default its architecture)."""
    topo = topology(model if model is not None else ticket.skeleton())
    uses = Counter(lk.param for lk in topo.links if lk.param is not None)
    groups = []
    for node, size in topo.sizes.items():
        if node in (topo.source, topo.sink) or node in topo.fixed:
            continue
        into, out = topo.into(node), topo.out_of(node)
        if len(into) != 1 or into[0].kind != "weight" or into[0].groups != 1:
            continue
        if not out or any(lk.kind != "weight" or lk.groups != 1 for lk in out):
            continue
        if any(uses[lk.param] != 1 for lk in into + out):
            continue  # a weight used twice would move for both uses
        follow = [t for t in topo.follow.get(node, [])
                  if t in ticket.state and ticket.state[t].dim() and
                  ticket.state[t].shape[0] == size]
        groups.append(Group(into[0].param, size, follow, [(lk.param, lk.fold) for lk in out]))
    return groups


def permute(ticket: Ticket, seed: int = 0,
            model: nn.Module | None = None) -> tuple[Ticket, dict[str, list[int]]]:
    """A function-preserving relabelling; returns the new ticket and each group's permutation."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in ticket.state.items()}
    masks = {k: v.clone() for k, v in ticket.mask.items()}
    perms = {}
    for g in permutable_groups(ticket, model):
        p = torch.randperm(g.size, generator=gen)
        perms[g.producer] = p.tolist()
        for name in [g.producer, *g.follow]:
            state[name] = state[name][p]
            if name in masks:
                masks[name] = masks[name][p]
        for name, fold in g.consumers:
            cols = (p[:, None] * fold + torch.arange(fold)).reshape(-1)
            state[name] = state[name][:, cols]
            if name in masks:
                masks[name] = masks[name][:, cols]
    return ticket.derive(state=state, mask=Mask(masks),
                         extra={**ticket.extra, "permuted": True}), perms


def permute_blind(ticket: Ticket, seed: int = 0) -> tuple[Ticket, dict[str, list[int]]]:
    """The permutation attack on a ticket whose network is unknown (imported from weights
    alone): each masked layer's output units and input units relabelled independently. Not
    function-preserving (which layers feed which is unknown), so no accuracy is measured; for
    the signature it is the harder case, since a thief's relabelling ties a layer's inputs to
    the previous layer's outputs and this one does not."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in ticket.state.items()}
    masks = {k: v.clone() for k, v in ticket.mask.items()}
    perms = {}
    for name, m in ticket.mask.items():
        if m.dim() < 2:
            continue
        rows = torch.randperm(m.shape[0], generator=gen)
        cols = torch.randperm(m.shape[1], generator=gen)
        perms[name] = rows.tolist()
        state[name] = state[name][rows][:, cols]
        masks[name] = masks[name][rows][:, cols]
    return ticket.derive(state=state, mask=Mask(masks),
                         extra={**ticket.extra, "permuted": True}), perms
