from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.convert import import_checkpoint, save_torch_prune
from ticketctl.cli.common import (
    DebugOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    console,
    emit_json,
    handle_errors,
)
from ticketctl.errors import TicketctlError


@handle_errors
def convert(
    file: Annotated[Path, typer.Argument(help="A torch-prune state dict or an authors' "
                                         ".pth.tar to import, or a ticket to export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file.")],
    to: Annotated[Optional[str], typer.Option(
        "--to", help="Export a ticket to this format: torch-prune.")] = None,
    arch: Annotated[Optional[str], typer.Option(help="Architecture (inferred if absent).")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (from fc if absent).")] = None,
    weights: Annotated[str, typer.Option(
        help="auto, rewind (authors' init_weight -> kind ticket) or trained.")] = "auto",
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name to record.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
) -> None:
    """Import torch-prune or authors' checkpoints (weights_only loading), or export a ticket."""
    if to is not None:
        if to != "torch-prune":
            raise TicketctlError(f"unknown export format {to!r}; supported: torch-prune")
        ticket = load_ticket(file)
        save_torch_prune(ticket, out, force=force)
        result = {"out": str(out), "format": to, "kind": ticket.kind, "arch": ticket.arch,
                  "density": ticket.density}
    else:
        ticket = import_checkpoint(file, arch=arch, num_classes=num_classes, weights=weights,
                                   dataset=dataset)
        save_ticket(ticket, out, force=force)
        result = {"out": str(out), "format": "ticketctl", "kind": ticket.kind,
                  "arch": ticket.arch, "arch_args": ticket.arch_args,
                  "num_classes": ticket.num_classes, "density": ticket.density,
                  "masks_sha256": ticket.mask.sha256()}
    if json_out:
        emit_json(result)
    elif not quiet:
        console.print(f"wrote {out} ({result['kind']}, {result['arch']}, "
                      f"density {100 * result['density']:.2f}%)", highlight=False)
