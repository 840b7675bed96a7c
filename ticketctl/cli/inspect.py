"""`ticketctl inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ticketctl.artifacts.describe import describe_file
from ticketctl.cli.options import Output, command
from ticketctl.cli.render import ticket_table


@command
def inspect(
    *,
    file: Annotated[Path, typer.Argument(help="A ticket file (.safetensors).")],
    output: Output,
) -> None:
    """Show what a ticket file holds: per-layer density, metadata and hashes."""
    info = describe_file(file)
    output.emit(info, lambda: ticket_table(info))
