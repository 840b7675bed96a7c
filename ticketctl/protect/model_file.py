"""Reading a suspect model of any common form: a ticket, a plain safetensors state dict, or a
torch state dict (weights_only loading). Masks come from the file where it has them, else
from `weight != 0`."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ticketctl.artifacts import load_ticket
from ticketctl.artifacts.convert import infer_arch, load_torch_checkpoint, split_pruned_state
from ticketctl.artifacts.ticket import parse_metadata, read_header
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model
from ticketctl.protect.signature import masks_of


def read_model_masks(path: str | Path) -> tuple[dict[str, torch.Tensor],
                                                dict[str, torch.Tensor]]:
    p = Path(path)
    if not p.is_file():
        raise TicketctlError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        obj = load_torch_checkpoint(p)
        if isinstance(obj, dict) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise TicketctlError(f"{p} holds no state dict")
        sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        state, masks = split_pruned_state(sd)
        masks = {k: v != 0 for k, v in masks.items()}
        return state, masks_of(state, masks)
    header = read_header(p)
    if header.get("format") == "ticketctl":
        parse_metadata(header, str(p))
        ticket = load_ticket(p)
        return ticket.state, masks_of(ticket.state, dict(ticket.mask))
    state = safetensors.torch.load_file(str(p))
    return state, masks_of(state)


def build_suspect(path: str | Path, state: dict[str, torch.Tensor]) -> tuple[nn.Module, dict]:
    """A runnable model from a suspect file: the ticket's own architecture, or the registered
    one whose names and shapes a plain state dict matches. Returns (model, recorded dataset)."""
    header = read_header(path) if _is_safetensors(path) else {}
    if header.get("format") == "ticketctl":
        ticket = load_ticket(path)
        return ticket.build_model().eval(), ticket.dataset or {}
    arch, args, classes = infer_arch(state)
    model = build_model(arch, classes, **args)
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()},
                          strict=False)
    return model.eval(), {}


def _is_safetensors(path: str | Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return not (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04")
