"""Data-parallel training's backward in pieces, so the gradients' all-reduce can overlap it.

A network compiled whole has one backward function: every gradient is ready only when all
of backward is done, and the all-reduce can only follow it. Compiled in pieces ("units":
blocks of the network, each its own compiled graph) the backward is one function per unit,
and autograd accumulates a unit's gradients as soon as its backward ran, while the units
before it still have theirs to run; `distributed.BucketReducer` starts each bucket's
all-reduce then. The network's own forward, between the units, runs as it is: under the
step's CUDA graph its few operations cost no launches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

# never called themselves (their parent calls their children): never a unit
_HOLDERS = (nn.ModuleList, nn.ModuleDict)
_MARK = "_ticketctl_unit"


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def overlap_units(model: nn.Module, cap_bytes: int) -> list[tuple[str, nn.Module]]:
    """The submodules to compile one by one, named: the model's children holding trainable
    parameters, with a child split into its own children where it is a container
    (`nn.Sequential`, `nn.ModuleList`, `nn.ModuleDict`) holding more than `cap_bytes`, or
    a wrapper (a module whose parameters all sit in one child). Any other module is kept
    whole, since its forward may do more than call its children in turn."""
    out: list[tuple[str, nn.Module]] = []

    def visit(name: str, module: nn.Module, split: bool) -> None:
        kids = [(n, c) for n, c in module.named_children() if _param_bytes(c)]
        split = split or isinstance(module, _HOLDERS) or (
            isinstance(module, nn.Sequential) and _param_bytes(module) > cap_bytes)
        if not split or not kids:
            out.append((name, module))
            return
        wrapper = len(kids) == 1 and not any(
            p.requires_grad for p in module.parameters(recurse=False))
        for n, child in kids:
            visit(f"{name}.{n}" if name else n, child, wrapper)

    if _param_bytes(model):
        visit("", model, True)
    return out


def compile_units(units: list[tuple[str, nn.Module]],
                  compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace each unit's forward by a compiled one (in place: the module, its parameters
    and its state dict stay the same objects). Each unit gets a code object of its own, so
    Dynamo keeps each one's compiled graphs apart: units of one class (a network's blocks)
    would otherwise share one cache and its limit of 8 entries. A unit compiled before (by
    another trainer of the same network) is left as it is."""
    for i, (name, module) in enumerate(units):
        if getattr(module.__dict__.get("forward"), _MARK, False):
            continue
        run = _calling(module.forward)
        run.__code__ = run.__code__.replace(co_name=f"unit{i}_{name or 'model'}".replace(".", "_"))
        compiled = compile_fn(run)
        setattr(compiled, _MARK, True)
        module.forward = compiled


def _calling(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)
    return run
