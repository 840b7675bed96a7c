"""`ticketctl convert`: import and export at the edges."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.convert import (
    ExportFormat,
    Weights,
    import_checkpoint,
    is_ticket,
    output_format,
    save_torch_prune,
)
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import Output, command
from ticketctl.errors import TicketctlError


@command
def convert(
    *,
    file: Annotated[Path, typer.Argument(help="A torch-prune state dict or an authors' "
                                         ".pth.tar to import, or a ticket to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file (.safetensors: a "
                                      "ticket; .pt or .pth: a torch-prune state dict).")],
    to: Annotated[Optional[ExportFormat], typer.Option(
        "--to", help="What to write: a ticket (import a checkpoint) or a torch-prune state "
                     "dict (export a ticket). Default: from --out's extension.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture (inferred if absent).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (from fc if absent).")] = None,
    weights: Annotated[Weights, typer.Option(
        help="Imported weights: the authors' init_weight (rewind: a ticket) when present "
             "(auto), or the trained ones.")] = Weights.AUTO,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name to record.")] = None,
    output: Output,
) -> None:
    """Import torch-prune or authors' checkpoints (weights_only loading), or export a ticket
    (its metadata kept in the export, so a round trip keeps kind, rewind epoch and dataset)."""
    fmt = output_format(out, to)
    output.check(out)
    if fmt == ExportFormat.TORCH_PRUNE:
        ticket = load_ticket(file)
        save_torch_prune(ticket, out, force=output.force)
        result = {"out": str(out), "format": fmt.value, "kind": ticket.kind.value,
                  "arch": ticket.arch, "density": ticket.density}
    else:
        if is_ticket(file):
            raise TicketctlError(f"{file} is already a ticket; to export it, pass --to "
                                 "torch-prune or name the output .pt")
        ticket = import_checkpoint(file, arch=arch, num_classes=num_classes, weights=weights,
                                   dataset=dataset)
        save_ticket(ticket, out, force=output.force)
        result = {"out": str(out), "format": "ticketctl", "kind": ticket.kind.value,
                  "arch": ticket.arch, "arch_args": ticket.arch_args,
                  "num_classes": ticket.num_classes, "density": ticket.density,
                  "masks_sha256": ticket.mask.sha256()}
    output.emit(result, lambda: console.print(
        f"wrote {plain(out)} ({plain(result['kind'])}, {plain(result['arch'])}, density "
        f"{100 * result['density']:.2f}%)", highlight=False))
