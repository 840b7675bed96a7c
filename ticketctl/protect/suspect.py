"""A suspect model, opened once: whatever file was released (a ticket, a plain safetensors
state dict, a torch state dict read with `weights_only`), as the weights and masks every check
reads, what its header claims, and how to build its network. Attacked copies made in memory
are suspects too (`Suspect.of`), so the owner's checks read one type either way.

A suspect file is untrusted by definition: its header may lie, be broken or be missing, and
its recorded hashes may not match (a thief edits one hex digit to dodge a check). None of that
stops the checks: the weights and masks are read as they are, and what does not hold is
reported as a finding beside the verdict. Only a file that holds no readable tensors at all
is refused."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ticketctl.artifacts import Ticket
from ticketctl.artifacts.convert import (
    infer_arch,
    load_torch_checkpoint,
    split_pruned_state,
    tensor_problems,
)
from ticketctl.artifacts.ticket import (
    FORMAT_NAME,
    MASK_SUFFIX,
    MAX_HEADER_BYTES,
    altered,
    file_format,
    header_size,
    parse_metadata,
    read_header,
    read_tensors,
    ticket_from,
)
from ticketctl.errors import TicketctlError
from ticketctl.models import build_model
from ticketctl.protect.signature import masks_of


@dataclass
class Suspect:
    """A model under suspicion. `masks` covers every weight with a channel grid: the file's
    own mask where it has one, else `weight != 0`."""

    state: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    source: str  # "ticket", "safetensors", "torch" (a pickled state dict) or "memory"
    where: str  # the file, or what made it
    ticket: Ticket | None = None  # the ticket its header describes, if that holds
    findings: list[str] = field(default_factory=list)  # what the file claims that is false

    @classmethod
    def of(cls, ticket: Ticket, state: dict[str, torch.Tensor] | None = None,
           where: str = "memory") -> Suspect:
        """A model in memory: `ticket` itself (its own mask), or `ticket`'s network with
        another `state`, masked by what is nonzero in it (what an attacked copy shows)."""
        if state is None:
            return cls(ticket.state, masks_of(ticket.state, dict(ticket.mask)), "memory", where,
                       ticket)
        return cls(state, masks_of(state), "memory", where, ticket)

    @property
    def recorded_dataset(self) -> dict[str, Any]:
        """The dataset the file says it was trained on ({} when it says nothing)."""
        return (self.ticket.dataset or {}) if self.ticket is not None else {}

    def network(self, device: str | torch.device = "cpu") -> nn.Module:
        """A runnable model in eval mode: the ticket's own architecture, or the registered one
        whose names and shapes a plain state dict matches."""
        if self.ticket is not None:
            model = build_model(self.ticket.arch, self.ticket.num_classes,
                                **self.ticket.arch_args)
        else:
            try:
                arch, args, classes = infer_arch(self.state)
            except TicketctlError:  # perhaps a channel-pruned copy of a registered network
                arch, args, classes = infer_arch(self.state, smaller=True)
            model = build_model(arch, classes, **args)
        own = model.state_dict()
        state = {k: v for k, v in self.state.items() if k in own}
        if any(v.shape != own[k].shape for k, v in state.items()):
            from ticketctl.attacks.channels import shrink_model

            try:  # the smaller network a channel-pruned release describes
                shrink_model(model, state)
            except RuntimeError as exc:
                raise TicketctlError(f"{self.where}: its tensors do not fit a smaller "
                                     f"{type(model).__name__} "
                                     f"({str(exc).splitlines()[0]})") from exc
        else:
            model.load_state_dict(self.state if self.ticket is not None else state,
                                  strict=self.ticket is not None)
        return model.to(device).eval()


def _plain(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                      dict[str, torch.Tensor]]:
    """A safetensors file read without trusting its header: the state, and the `.mask`
    tensors that fit a weight of the same name."""
    state = {k: v for k, v in tensors.items() if not k.endswith(MASK_SUFFIX)}
    masks = {}
    for k, v in tensors.items():
        name = k[: -len(MASK_SUFFIX)]
        if k.endswith(MASK_SUFFIX) and name in state and v.shape == state[name].shape:
            masks[name] = v != 0
    return state, masks


def open_suspect(path: str | Path) -> Suspect:
    """Read a suspect file once, whatever its header claims (see the module's docstring)."""
    p = Path(path)
    if p.is_dir():
        raise TicketctlError(f"{p} is a folder, not a model file")
    if not p.is_file():
        raise TicketctlError(f"{p}: no such file")
    if file_format(p) == "pickle":
        return _torch_suspect(p)
    if MAX_HEADER_BYTES < header_size(p) <= p.stat().st_size - 8:  # not the metadata, then
        state, masks = _plain(read_tensors(p))
        return Suspect(state, masks_of(state, masks), "safetensors", str(p),
                       findings=[f"its safetensors header is {header_size(p):,} bytes, far "
                                 "more than a ticket's; its metadata was ignored and the "
                                 "tensors read as they are"])
    header = read_header(p)
    tensors = read_tensors(p)
    if header.get("format") != FORMAT_NAME:
        state, masks = _plain(tensors)
        return Suspect(state, masks_of(state, masks), "safetensors", str(p))
    try:
        meta = parse_metadata(header, str(p))
        ticket = ticket_from(meta, tensors, str(p))
    except TicketctlError as e:  # a broken or lying header: read the tensors as they are
        state, masks = _plain(tensors)
        return Suspect(state, masks_of(state, masks), "safetensors", str(p),
                       findings=[f"the ticketctl header does not hold ({e}); the tensors "
                                 "were read as they are"])
    problem = altered(ticket, meta, str(p), int(header["format_version"]))
    return Suspect(ticket.state, masks_of(ticket.state, dict(ticket.mask)), "ticket", str(p),
                   ticket, [problem + "; checked anyway"] if problem else [])


def _torch_suspect(p: Path) -> Suspect:
    """A torch.save state dict (weights_only): tensors that would take more memory than the
    file holds are left out, and weights that are not real floating point are read as
    float32; each is a finding."""
    obj = load_torch_checkpoint(p)
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise TicketctlError(f"{p} holds no state dict")
    sd = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    findings = []
    for name, why in tensor_problems(sd, p.stat().st_size).items():
        findings.append(f"{why}; left out")
        del sd[name]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    state, masks = split_pruned_state(sd)
    for name, t in state.items():
        if t.dim() >= 1 and not t.is_floating_point() and not name.endswith("num_batches_tracked"):
            kind = str(t.dtype).removeprefix("torch.")
            state[name] = (t.real if t.is_complex() else t).to(torch.float32)
            findings.append(f"tensor {name!r} holds {kind} values, not floating-point weights; "
                            "read as float32")
    if not state:
        raise TicketctlError(f"{p} holds no readable tensors")
    return Suspect(state, masks_of(state, {k: v != 0 for k, v in masks.items()}), "torch",
                   str(p), findings=findings)
