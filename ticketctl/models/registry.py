"""Architecture registry and the one definition of which parameters are prunable."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ticketctl.errors import TicketctlError
from ticketctl.models.digits_cnn import digits_cnn
from ticketctl.models.resnet_cifar import _SKIP_INIT, resnet18, resnet20, resnet50
from ticketctl.models.vgg import vgg16
from ticketctl.schema import brief

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "digits_cnn": digits_cnn,
}

# Arguments each builder accepts beyond num_classes; anything else in a file is refused.
ARCH_ARGS: dict[str, set[str]] = {
    "resnet20": {"in_channels"},
    "resnet18": {"in_channels"},
    "resnet50": {"in_channels"},
    "vgg16": {"in_channels"},
    "digits_cnn": {"in_channels", "width"},
}

# The largest value each argument may take, and the most classes: a file that claims more
# (a width of 10^9) is refused before any network is built, even on the meta device.
ARG_MAX: dict[str, int] = {"in_channels": 64, "width": 1024}
MAX_CLASSES = 100_000


def build_model(
    arch: str, num_classes: int = 10, seed: int | None = None, **arch_args: Any
) -> nn.Module:
    """Build a freshly initialised model; raises TicketctlError for unknown archs or args.

    With a seed the initialisation is reproducible and leaves the global RNG untouched."""
    if not isinstance(arch, str) or arch not in ARCHS:
        raise TicketctlError(
            f"unknown architecture {brief(arch)}; known: {', '.join(sorted(ARCHS))}"
        )
    bad = set(arch_args) - ARCH_ARGS[arch]
    if bad:
        raise TicketctlError(
            f"architecture {arch!r} takes no argument(s) {', '.join(sorted(bad))}; "
            f"allowed: {', '.join(sorted(ARCH_ARGS[arch])) or 'none'}"
        )
    for name, value in arch_args.items():
        if not _whole(value) or not 1 <= value <= ARG_MAX[name]:
            raise TicketctlError(f"architecture argument {name} must be an integer from 1 to "
                                 f"{ARG_MAX[name]}, got {brief(value)}")
    if not _whole(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise TicketctlError(f"number of classes must be an integer from 1 to {MAX_CLASSES:,}, "
                             f"got {brief(num_classes)}")
    if seed is None:
        return ARCHS[arch](num_classes=num_classes, **arch_args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHS[arch](num_classes=num_classes, **arch_args)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def skeleton(arch: str, num_classes: int = 10, **arch_args: Any) -> nn.Module:
    """The architecture on the meta device, uninitialised: names, shapes and structure for
    validation and graph building, at no cost."""
    token = _SKIP_INIT.set(True)
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes, **arch_args)
    finally:
        _SKIP_INIT.reset(token)


def prunable_names(model: nn.Module, prune_linear: bool = False) -> list[str]:
    """Names of the weights IMP may prune: every conv but the first (the paper's choice),
    plus linear weights only when asked. Order is the model's registration order."""
    convs = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names = convs[1:]
    if prune_linear:
        names += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names
