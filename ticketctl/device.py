"""Resolving `--device auto|cpu|cuda` once, with a clear error where CUDA is missing."""

from __future__ import annotations

import torch

from ticketctl.errors import TicketctlError


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TicketctlError("--device cuda was asked for but this machine has no usable "
                                 "CUDA GPU; use --device cpu or auto")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise TicketctlError(f"unknown device {name!r}; use auto, cpu or cuda")
