"""Architecture registry and the one definition of which parameters are prunable."""

from __future__ import annotations

import numbers
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ticketctl.errors import TicketctlError
from ticketctl.models.digits_cnn import DigitsCNN, digits_cnn
from ticketctl.models.resnet_cifar import _SKIP_INIT, CifarResNet, resnet18, resnet20, resnet50
from ticketctl.models.sources import (
    FACTORY,
    NO_NETWORK,
    build_external,
    current_factory,
    source_of,
)
from ticketctl.models.vgg import VGG, vgg16
from ticketctl.schema import brief

ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "vgg16": vgg16,
    "digits_cnn": digits_cnn,
}

_BUILTIN_TYPES = (DigitsCNN, CifarResNet, VGG)

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
    `arch` is a built-in's name, `torchvision:NAME`, `timm:NAME`, or `factory`/`none` (the
    network of the --model-factory the user named).

    With a seed the initialisation is reproducible and leaves the global RNG untouched."""
    if not _whole(num_classes) or not 1 <= num_classes <= MAX_CLASSES:
        raise TicketctlError(f"number of classes must be an integer from 1 to {MAX_CLASSES:,}, "
                             f"got {brief(num_classes)}")
    build = _builder(arch, num_classes, arch_args)
    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _builder(arch: Any, num_classes: int, arch_args: dict[str, Any]) -> Callable[[], nn.Module]:
    if not isinstance(arch, str):
        raise TicketctlError(f"unknown architecture {brief(arch)}")
    source = source_of(arch)
    if source in ("torchvision", "timm"):
        args = dict(arch_args)
        in_channels = args.pop("in_channels", None)
        return lambda: build_external(arch, num_classes, in_channels, **args)
    if source in (FACTORY, NO_NETWORK):
        factory = current_factory()
        if factory is None:
            raise TicketctlError(
                ("this ticket's network comes from the owner's own model factory"
                 if source == FACTORY else "this ticket was imported without its network")
                + ": pass --model-factory FILE.py:FUNCTION to build it")
        args = dict(arch_args)
        in_channels = args.pop("in_channels", None)
        return lambda: factory.build(num_classes, in_channels, **args)
    if arch not in ARCHS:
        raise TicketctlError(
            f"unknown architecture {brief(arch)}; known: {', '.join(sorted(ARCHS))}, "
            "torchvision:NAME, timm:NAME, or your own with --model-factory FILE.py:FUNCTION"
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
    return lambda: ARCHS[arch](num_classes=num_classes, **arch_args)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def skeleton(arch: str, num_classes: int = 10, **arch_args: Any) -> nn.Module:
    """The architecture on the meta device, uninitialised: names, shapes and structure for
    validation and graph building, at no cost. A network from outside whose code cannot run
    on the meta device is built on the CPU instead."""
    token = _SKIP_INIT.set(True)
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes, **arch_args)
    except TicketctlError:
        if source_of(arch) == "builtin":
            raise
        return build_model(arch, num_classes, **arch_args)
    finally:
        _SKIP_INIT.reset(token)


def prunable_names(model: nn.Module, prune_linear: bool = False,
                   pattern: str | None = None) -> list[str]:
    """Names of the weights IMP may prune. By default every convolution but the first (the
    paper's choice; first in the order the forward pass calls them, where it can be traced),
    plus linear weights with `prune_linear`; with `pattern`, every weight (2 or more
    dimensions) whose name the regular expression matches (re.search)."""
    if pattern is not None:
        return matching(pattern, [n for n, p in model.named_parameters() if p.dim() >= 2])
    order = _call_order(model)
    convs = [f"{n}.weight" for n in order if isinstance(_module(model, n), nn.modules.conv._ConvNd)]
    names = convs[1:]
    if prune_linear:
        names += [f"{n}.weight" for n in order if isinstance(_module(model, n), nn.Linear)]
    return names


def required_prunable(model: nn.Module, prune_linear: bool = False,
                      pattern: str | None = None) -> list[str]:
    """`prunable_names`, refusing a network the default rule leaves nothing to prune in (a
    transformer has no convolution but its stem)."""
    names = prunable_names(model, prune_linear=prune_linear, pattern=pattern)
    if not names:
        raise TicketctlError("the network has no prunable weight by the default rule (every "
                             "convolution but the first); pass --prune-linear or --prunable "
                             "REGEX")
    return names


def matching(pattern: str, weights: list[str]) -> list[str]:
    """The weights whose names `--prunable`'s regular expression matches (re.search); one
    line naming the weights when none does."""
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise TicketctlError(f"--prunable {pattern!r} is not a regular expression ({e})") \
            from None
    names = [n for n in weights if rx.search(n)]
    if not names:
        shown = ", ".join(weights[:6]) + (" ..." if len(weights) > 6 else "")
        raise TicketctlError(f"--prunable {pattern!r} matches no weight; the weights are "
                             f"{shown or 'none'}")
    return names


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _call_order(model: nn.Module) -> list[str]:
    """Names of the modules that own weights, in the order the forward pass calls them when
    torch.fx can trace it, else in registration order (the built-ins register in call
    order)."""
    registered = [n for n, m in model.named_modules()
                  if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if isinstance(model, _BUILTIN_TYPES):
        return registered
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable user code: registration order
        return registered
    called = []
    for node in graph.nodes:
        if node.op == "call_module" and node.target in registered and node.target not in called:
            called.append(str(node.target))
    return called + [n for n in registered if n not in called]
