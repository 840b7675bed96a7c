"""What every command shares: the console, JSON output, one-line errors, progress bars and the
launch of distributed ranks. Data goes to stdout (only with --json); everything for people
goes to stderr."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ticketctl.errors import TicketctlError

# Not a terminal (a pipe, a log file, CI): Rich would assume 80 columns and squeeze tables,
# cutting numbers ("6.1e-1..." for 6.1e-108); give it room instead, and tables fold, never cut.
console = Console(stderr=True, width=None if os.isatty(2) else 200)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def plain(value: Any) -> str:
    """Text from a file or a user (metadata, messages, paths), shown literally: Rich markup
    escaped, and terminal control characters (an escape sequence could retitle or clear the
    user's terminal) shown as \\xNN."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))
    return escape(text)


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null instead so every parser reads it."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


ERROR_KINDS = {1: "check failed", 2: "bad input", 130: "interrupted"}


def fail(message: str, code: int = 2, as_json: bool = False, kind: str | None = None) -> None:
    """One line on stderr and the exit status; with --json also one JSON document on stdout
    (`error`, `exit_code`, `message`), so a script reading stdout sees the failure."""
    if as_json:
        emit_json({"error": kind or ERROR_KINDS.get(code, "error"), "exit_code": code,
                   "message": message})
    console.print(f"[bold red]error:[/] {plain(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def show_progress(quiet: bool) -> bool:
    return not quiet and console.is_terminal


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Progress]:
    """A Rich progress bar on stderr, silent under --quiet or when stderr is not a terminal."""
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=not show_progress(quiet), transient=False,
    )
    with progress:
        yield progress


def launch_ranks(nproc: int, nnodes: int, rdzv_endpoint: str | None, timeout_s: float) -> bool:
    """With --nproc/--nnodes above 1 in the user's process: run this same command as
    torchrun ranks and return True once they finished (exit 2 if one failed)."""
    from ticketctl.distributed import in_worker, launch, relaunch_args

    if (nproc <= 1 and nnodes <= 1) or in_worker():
        return False
    code = launch(relaunch_args(sys.argv[1:]), nproc, nnodes, rdzv_endpoint, timeout_s)
    if code != 0:
        raise TicketctlError(f"a distributed rank failed (exit {code}); every rank was "
                             "stopped, see the messages above")
    return True
