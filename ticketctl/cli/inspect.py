from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ticketctl.artifacts.describe import describe_file
from ticketctl.cli.common import DebugOpt, JsonOpt, QuietOpt, emit_json, handle_errors
from ticketctl.cli.render import ticket_table


@handle_errors
def inspect(
    file: Annotated[Path, typer.Argument(help="A ticket file (.safetensors).")],
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Show what a ticket file holds: per-layer density, metadata and hashes."""
    info = describe_file(file)
    if json_out:
        emit_json(info)
    elif not quiet:
        ticket_table(info)
