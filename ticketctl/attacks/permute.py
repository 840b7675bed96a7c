"""The permutation attack (not in the paper's tables): relabel the channels of hidden layers,
with the matching input channels of the next layer and the BatchNorm between them, so every
output is unchanged but the pattern of the mask moves. Permutable: a conv's output channels
that feed only other weights (a chain CNN's every conv, a ResNet block's inner convs); the
residual stream of a ResNet is left in place."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ticketctl.artifacts import Mask, Ticket
from ticketctl.models.topology import topology


@dataclass
class Group:
    producer: str  # conv weight whose output channels are permuted
    norm: str | None  # its BatchNorm module name
    consumers: list[str]  # weights whose input channels follow
    size: int


def permutable_groups(ticket: Ticket) -> list[Group]:
    model = ticket.skeleton()
    topo = topology(model)
    modules = list(model.named_modules())
    norms = {}
    for (name, m), (next_name, nxt) in zip(modules, modules[1:], strict=False):
        if isinstance(m, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d):
            norms[f"{name}.weight"] = next_name
    groups = []
    for node, size in topo.sizes.items():
        into = [lk for lk in topo.links if lk.dst == node]
        out = [lk for lk in topo.links if lk.src == node]
        if node in (topo.source, topo.sink) or len(into) != 1 or into[0].param is None:
            continue
        if not out or any(lk.param is None for lk in out):
            continue
        producer = into[0].param
        groups.append(Group(producer, norms.get(producer), [lk.param for lk in out], size))
    return groups


def permute(ticket: Ticket, seed: int = 0) -> tuple[Ticket, dict[str, list[int]]]:
    """A function-preserving relabelling; returns the new ticket and each group's permutation."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in ticket.state.items()}
    masks = {k: v.clone() for k, v in ticket.mask.items()}
    perms = {}
    for g in permutable_groups(ticket):
        p = torch.randperm(g.size, generator=gen)
        perms[g.producer] = p.tolist()
        state[g.producer] = state[g.producer][p]
        if g.producer in masks:
            masks[g.producer] = masks[g.producer][p]
        if g.norm:
            for field in ("weight", "bias", "running_mean", "running_var"):
                key = f"{g.norm}.{field}"
                state[key] = state[key][p]
        for c in g.consumers:
            state[c] = state[c][:, p]
            if c in masks:
                masks[c] = masks[c][:, p]
    return ticket.derive(state=state, mask=Mask(masks),
                         extra={**ticket.extra, "permuted": True}), perms
