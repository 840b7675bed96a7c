"""Packing K models of one architecture into one network, so one forward and backward pass
trains all of them: convolutions become grouped convolutions over K x the channels (model k
owns channel block k), BatchNorm covers K x the channels (its statistics are per channel, so
per model), and linear layers become one batched matmul. The batch travels with the models
stacked on the channel axis: input N x (K*C) x H x W, where block k holds model k's own
images. Every packed tensor is the K models' tensors concatenated along dimension 0."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.errors import TicketctlError


class PackedLinear(nn.Module):
    """K linear layers applied to the K channel blocks of an N x (K*in) input."""

    def __init__(self, packs: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.packs, self.in_features, self.out_features = packs, in_features, out_features
        self.weight = nn.Parameter(torch.empty(packs * out_features, in_features))
        self.bias = nn.Parameter(torch.empty(packs * out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, o, i = self.packs, self.out_features, self.in_features
        out = torch.einsum("nki,koi->nko", x.view(x.shape[0], k, i), self.weight.view(k, o, i))
        if self.bias is not None:
            out = out + self.bias.view(k, o)
        return out.reshape(x.shape[0], k * o)


def _packed(module: nn.Module, packs: int) -> nn.Module:
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise TicketctlError("packing needs zero-padded convolutions")
        return nn.Conv2d(packs * module.in_channels, packs * module.out_channels,
                         module.kernel_size, module.stride, module.padding, module.dilation,
                         packs * module.groups, module.bias is not None)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(packs * module.num_features, module.eps, module.momentum,
                              module.affine, module.track_running_stats)
    if isinstance(module, nn.Linear):
        return PackedLinear(packs, module.in_features, module.out_features,
                            module.bias is not None)
    if any(True for _ in module.parameters(recurse=False)):
        raise TicketctlError(f"cannot pack a {type(module).__name__} layer")
    if hasattr(module, "packs"):  # parameter-free layers that mix channels know how to pack
        module.packs = packs
    return module


def pack_model(template: nn.Module, packs: int) -> nn.Module:
    """An untrained packed network of `packs` copies of `template`'s architecture."""
    if packs < 1:
        raise TicketctlError(f"--pack must be at least 1, got {packs}")
    packed = copy.deepcopy(template)

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            new = _packed(child, packs)
            if new is not child:
                setattr(parent, name, new)
            else:
                swap(child)

    swap(packed)
    return packed.to(next(template.parameters()).device)


def pack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-model tensors -> the packed one (a scalar counter is shared: the first model's)."""
    if tensors[0].dim() == 0:
        return tensors[0].clone()
    return torch.cat(tensors, 0)


def unpack_tensor(packed: torch.Tensor, k: int, packs: int) -> torch.Tensor:
    if packed.dim() == 0:
        return packed
    return packed.view(packs, -1, *packed.shape[1:])[k]


def pack_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: pack_tensors([s[name] for s in states]) for name in states[0]}


def unpack_state(packed: dict[str, torch.Tensor], k: int, packs: int
                 ) -> dict[str, torch.Tensor]:
    return {name: unpack_tensor(t, k, packs) for name, t in packed.items()}


def stack_inputs(x: torch.Tensor) -> torch.Tensor:
    """K x N x C x H x W (model k's batch in row k) -> N x (K*C) x H x W."""
    k, n, c, h, w = x.shape
    return x.permute(1, 0, 2, 3, 4).reshape(n, k * c, h, w)


def loss_logits(out: torch.Tensor) -> torch.Tensor:
    """Logits for the loss: bf16/fp16 autocast outputs widened to fp32; fp32 or fp64 as they
    are (a float64 run must not round its loss through fp32)."""
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def packed_loss(out: torch.Tensor, y: torch.Tensor, packs: int,
                label_smoothing: float = 0.0) -> torch.Tensor:
    """The sum of the K models' mean losses: each model gets exactly its own gradient.
    out: N x (K*classes); y: K x N."""
    n = out.shape[0]
    logits = loss_logits(out).view(n, packs, -1).permute(0, 2, 1)  # N x classes x K
    return F.cross_entropy(logits, y.t(), label_smoothing=label_smoothing) * packs
