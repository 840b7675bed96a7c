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
from ticketctl.cli.options import NetworkSource, Output, command
from ticketctl.errors import TicketctlError
from ticketctl.models.sources import parse_arch_args


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
    arch: Annotated[Optional[str], typer.Option(
        help="A built-in, torchvision:NAME or timm:NAME (default: the built-in whose tensors "
             "fit, else --model-factory's network, else none: weights and masks only).")
    ] = None,
    arch_arg: Annotated[Optional[list[str]], typer.Option(
        "--arch-arg", help="KEY=VALUE for the torchvision, timm or factory builder "
        "(repeatable).")] = None,
    masks_from_zeros: Annotated[bool, typer.Option(
        help="A plain state dict of no known network: each weight's zeros are its mask "
             "(the weights holding zeros are the pruned ones).")] = False,
    prunable: Annotated[Optional[str], typer.Option(
        help="Take masks from the zeros of the weights whose names this regular expression "
             "matches.")] = None,
    prune_linear: Annotated[bool, typer.Option(
        help="With a network, linear layers' zeros are masks too.")] = False,
    num_classes: Annotated[Optional[int], typer.Option(help="Classes (from fc if absent).")] = None,
    weights: Annotated[Weights, typer.Option(
        help="Imported weights: the authors' init_weight (rewind: a ticket) when present "
             "(auto), or the trained ones.")] = Weights.AUTO,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset name to record.")] = None,
    network: NetworkSource,
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
        if arch is not None and network.model_factory is not None:
            raise TicketctlError("give --arch or --model-factory, not both")
        args = parse_arch_args(arch_arg)
        ticket = import_checkpoint(file, arch=arch, num_classes=num_classes, weights=weights,
                                   dataset=dataset, arch_args=args or None,
                                   masks_from_zeros=masks_from_zeros, prunable=prunable,
                                   prune_linear=prune_linear)
        save_ticket(ticket, out, force=output.force)
        result = {"out": str(out), "format": "ticketctl", "kind": ticket.kind.value,
                  "arch": ticket.arch, "arch_args": ticket.arch_args,
                  "num_classes": ticket.num_classes, "density": ticket.density,
                  "masks_sha256": ticket.mask.sha256()}
    output.emit(result, lambda: console.print(
        f"wrote {plain(out)} ({plain(result['kind'])}, {plain(result['arch'])}, density "
        f"{100 * result['density']:.2f}%)", highlight=False))
