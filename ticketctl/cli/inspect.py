"""`ticketctl inspect`: what one or several files hold, as a report on stdout (or JSON)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from ticketctl.cli.common import error_doc, error_line, expand_paths, out
from ticketctl.cli.options import Output, command
from ticketctl.cli.render import run_file_table, ticket_table, trigger_set_table
from ticketctl.describe import (
    Described,
    RunFileInfo,
    TicketInfo,
    TriggerSetInfo,
    describe_path,
    describe_stream,
)
from ticketctl.errors import TicketctlError


def _describe(path: str) -> Described:
    if path != "-":
        return describe_path(path)
    if sys.stdin is None or sys.stdin.isatty():
        raise TicketctlError("`-` reads the file from stdin, but stdin is a terminal; pipe a "
                             "file in (ticketctl inspect - < FILE)")
    return describe_stream(sys.stdin.buffer)


def _render(info: Described) -> None:
    if isinstance(info, TicketInfo):
        ticket_table(info.to_dict(), out)
    elif isinstance(info, RunFileInfo):
        run_file_table(info, out)
    elif isinstance(info, TriggerSetInfo):
        trigger_set_table(info, out)


@command
def inspect(
    *,
    files: Annotated[list[str], typer.Argument(
        help="Files to show: tickets (.safetensors), run-folder files (masks/round-NNN, "
             "rewind, checkpoint, trained-*), trigger sets (.npz); glob patterns are "
             "expanded (quoted too); - reads one file from stdin.", metavar="FILE")],
    output: Output,
) -> None:
    """Show what a ticket file holds: per-layer density, metadata and hashes (and what
    run-folder files and trigger sets hold). The report goes to stdout; with several files,
    --json prints one list."""
    if files.count("-") > 1:
        raise TicketctlError("`-` (stdin) can be given only once")
    paths = expand_paths(files)
    if len(paths) == 1:  # the single-file shape scripts already read
        info = _describe(paths[0])
        output.emit(info.to_dict(), lambda: _render(info))
        return
    docs: list[dict[str, Any]] = []
    worst, shown = 0, False
    for path in paths:
        try:
            info = _describe(path)
        except Exception as e:  # each file gets its line, the others are still shown
            if output.debug:
                raise
            known = isinstance(e, TicketctlError)
            code = e.exit_code if isinstance(e, TicketctlError) else 2
            message = str(e) if known else \
                f"{path}: unexpected {type(e).__name__}: {e} (rerun with --debug for a traceback)"
            worst = max(worst, code)
            error_line(message)
            docs.append({"file": path, **error_doc(message, code, None if known else
                                                   "unexpected")})
            continue
        docs.append(info.to_dict())
        if not output.json_out and not output.quiet:
            if shown:
                out.print()
            _render(info)
            shown = True
    if output.json_out:
        output.emit(docs, lambda: None)
    if worst:
        raise typer.Exit(worst)
