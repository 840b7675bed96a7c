"""Structured (channel) pruning, the attack a thief runs to make a stolen network smaller and
faster: remove a fraction of each layer's output channels, those of smallest L1 norm (Li et
al., "Pruning Filters for Efficient ConvNets"), with the inputs that read them.

The channels that can go are the permutation attack's (`permutable_groups`): units that only
feed other layers' weights. Removing one deletes its producer row, its bias and norm entries,
and its columns in every consumer. The released model is that smaller state dict; the same
function in the original shapes is the state with those consumer columns (and producer rows)
zero, which is how the attacked model is scored. Verification finds the code again by matching
the suspect's channels to the receipt's fingerprints, removed ones left empty
(`protect.align`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ticketctl.artifacts import Ticket
from ticketctl.attacks.permute import permutable_groups
from ticketctl.errors import TicketctlError


@dataclass
class ChannelPruned:
    """One structured-pruning attack: the released (smaller) state, the same function in the
    original shapes, and which output channels of each producer were removed."""

    released: dict[str, torch.Tensor]
    scored: dict[str, torch.Tensor]
    removed: dict[str, list[int]]


def check_ratios(ratios: list[float]) -> None:
    """Fractions of each layer's channels: strictly between 0 and 1."""
    if not ratios:
        raise TicketctlError("--ratios needs at least one value")
    for r in ratios:
        if not 0.0 < r < 1.0:
            raise TicketctlError(f"--ratios must be in (0, 1), got {r:g}")


def channel_pruned(ticket: Ticket, ratio: float,
                   model: nn.Module | None = None) -> ChannelPruned:
    """Remove `ratio` of every removable layer's output channels (at least one is kept), the
    smallest by the L1 norm of their weights in the released model."""
    check_ratios([ratio])
    groups = permutable_groups(ticket, model)
    if not groups:
        raise TicketctlError(
            "no channel of this network can be removed: channel pruning needs hidden units "
            "that feed only other layers' weights (a chain CNN's convs, a ResNet block's inner "
            "convs, an MLP's hidden units)")
    released = dict(ticket.state)
    scored = dict(ticket.state)
    removed: dict[str, list[int]] = {}
    for g in groups:
        w = ticket.state[g.producer]
        norms = w.detach().abs().to(torch.float64).reshape(g.size, -1).sum(1)
        n_drop = min(int(ratio * g.size), g.size - 1)
        if n_drop == 0:
            continue
        drop = torch.sort(torch.argsort(norms, stable=True)[:n_drop]).values
        keep = torch.ones(g.size, dtype=torch.bool)
        keep[drop] = False
        removed[g.producer] = drop.tolist()
        for name in [g.producer, *g.follow]:
            released[name] = released[name][keep]
        scored[g.producer] = _zero(scored[g.producer], drop, 0, 1)
        for name, fold in g.consumers:
            cols = keep.repeat_interleave(fold)
            released[name] = released[name][:, cols]
            scored[name] = _zero(scored[name], drop, 1, fold)
    return ChannelPruned(released, scored, removed)


def _zero(t: torch.Tensor, channels: torch.Tensor, axis: int, fold: int) -> torch.Tensor:
    """`t` with the slices of `channels` along `axis` (each `fold` wide) set to +0.0."""
    out = t.clone()
    idx = (channels[:, None] * fold + torch.arange(fold)).reshape(-1)
    out.index_fill_(axis, idx, 0.0)
    return out


def _record_shape(module: nn.Module, t: torch.Tensor) -> None:
    """What a layer records of its weight's shape besides the tensor (LayerNorm's forward
    uses it; the others only describe themselves with it)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = t.shape[0], t.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = t.shape[0], t.shape[1]
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        module.num_features = t.shape[0]
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = tuple(t.shape)


def shrink_model(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """`model` resized, tensor by tensor, to the shapes of `state` (a channel-pruned release of
    its architecture), then loaded with it: the smaller network a thief would ship."""
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + \
            list(module.named_buffers(recurse=False))
        for name, t in own:
            key = f"{prefix}.{name}" if prefix else name
            if t is None or key not in state or state[key].shape == t.shape:
                continue
            fresh = torch.empty(state[key].shape, dtype=t.dtype, device=t.device)
            if isinstance(t, nn.Parameter):
                setattr(module, name, nn.Parameter(fresh, requires_grad=t.requires_grad))
            else:
                module.register_buffer(name, fresh)
            if name in ("weight", "running_mean"):
                _record_shape(module, fresh)
    model.load_state_dict(state)
    return model
