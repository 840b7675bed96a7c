"""What every command shares: the consoles, JSON output, one-line errors, progress bars and the
launch of distributed ranks. Data goes to stdout (JSON with --json; `inspect`'s report, which
is its result); everything else for people (logs, warnings, progress, errors) goes to
stderr."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
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

from ticketctl.errors import RANK_ERRORS_ENV, TicketctlError

# Not a terminal (a pipe, a log file, CI): Rich would assume 80 columns and squeeze tables,
# cutting numbers ("6.1e-1..." for 6.1e-108); give it room instead, and tables fold, never cut.
console = Console(stderr=True, width=None if os.isatty(2) else 200)
# A command whose text report is its result (`inspect`) prints it here, on stdout, for pipes.
out = Console(width=None if os.isatty(1) else 200)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(value: Any) -> str:
    """Text with terminal control characters (an escape sequence could retitle or clear the
    user's terminal) shown as \\xNN: what `plain` shows, before markup is escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value))


def plain(value: Any) -> str:
    """Text from a file or a user (metadata, messages, paths), shown literally: Rich markup
    escaped, and terminal control characters shown as \\xNN (`printable`)."""
    return escape(printable(value))


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


ERROR_KINDS = {1: "check failed", 2: "bad input", 130: "interrupted", 143: "interrupted"}
RANK_ERROR_GRACE_S = 2.0  # how long a failing rank other than 0 waits before it exits
LOST_PEER = "lost peer"  # a rank's error kind when another rank left first: not the cause


def fail(message: str, code: int = 2, as_json: bool = False, kind: str | None = None) -> None:
    """One line on stderr and the exit status; with --json also one JSON document on stdout
    (`error`, `exit_code`, `message`), so a script reading stdout sees the failure. A rank of
    a data-parallel run started by `launch_ranks` writes the error to its file instead: the
    command that started the ranks reports it once."""
    errors = os.environ.get(RANK_ERRORS_ENV)
    if errors and os.path.isdir(errors) and "RANK" in os.environ:
        doc = {"message": message, "code": code, "kind": kind, "time": time.time()}
        target = Path(errors) / f"rank{os.environ['RANK']}.json"
        try:
            target.with_suffix(".tmp").write_text(json.dumps(doc))
            os.replace(target.with_suffix(".tmp"), target)
        except OSError:
            pass  # (then said here, as without the file)
        else:
            if os.environ["RANK"] != "0":
                # torchrun stops every rank once one has exited: the others wait a moment,
                # so that rank 0, meeting the same bad input, reports it in the user's words
                # (the others work in scratch copies of the run folder)
                time.sleep(RANK_ERROR_GRACE_S)
            raise typer.Exit(code)
    if as_json:
        emit_json(error_doc(message, code, kind))
    error_line(message)
    raise typer.Exit(code)


_PATTERN = re.compile(r"[*?[]")


def expand_paths(args: list[str]) -> list[str]:
    """The files named on a command line, with glob patterns (`*`, `?`, `[...]`, `**`)
    expanded here as well, for a shell that passes them on as written (quoted, or a shell
    without globbing); a name that exists is taken as it is, even with such characters, and
    `-` stays `-`. A pattern that matches nothing is an error; each file is listed once."""
    out: list[str] = []
    for arg in args:
        if arg == "-" or not _PATTERN.search(arg) or os.path.lexists(arg):
            out.append(arg)
            continue
        matches = sorted(glob.glob(arg, recursive=True))
        if not matches:
            raise TicketctlError(f"no file matches {arg!r}; check the pattern")
        out += matches
    return list(dict.fromkeys(out))


def error_doc(message: str, code: int = 2, kind: str | None = None) -> dict[str, Any]:
    """What --json prints for a failure."""
    return {"error": kind or ERROR_KINDS.get(code, "error"), "exit_code": code,
            "message": message}


def error_line(message: str) -> None:
    """One error on stderr, on one line, printed literally."""
    console.print(f"[bold red]error:[/] {plain(message)}", highlight=False, soft_wrap=True)


class LineProgress:
    """Progress for a log or a pipe: a plain line per task at most every `every` seconds (and
    when it ends), with what it reported and the time left, where a terminal gets a bar."""

    def __init__(self, every: float = 10.0) -> None:
        self.console = console
        self.every = every
        self.tasks: dict[int, dict[str, Any]] = {}

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": 0.0,
                            "fields": fields, "start": time.monotonic(), "shown": 0.0}
        return task

    def update(self, task: int, completed: float | None = None, advance: float | None = None,
               **fields: Any) -> None:
        t = self.tasks[task]
        t["completed"] = completed if completed is not None else t["completed"] + (advance or 0)
        t["fields"].update(fields)
        now = time.monotonic()
        done = t["total"] is not None and t["completed"] >= t["total"]
        if done or now - t["shown"] >= self.every:
            t["shown"] = now
            self.console.print(self._line(t, now), highlight=False, soft_wrap=True)

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    @staticmethod
    def _line(t: dict[str, Any], now: float) -> str:
        elapsed = now - t["start"]
        total, done = t["total"], t["completed"]
        count = f"{done:g}/{total:g}" if total else f"{done:g}"
        left = ""
        if total and 0 < done < total:
            left = f", about {_duration(elapsed / done * (total - done))} left"
        info = t["fields"].get("info") or ""
        return (f"{plain(t['description'])}: {count} {plain(info)} ({_duration(elapsed)}"
                f"{left})").replace("  ", " ")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Progress | LineProgress]:
    """A Rich progress bar on a terminal; plain progress lines when stderr is a log or a pipe;
    nothing under --quiet (or --json, which passes quiet)."""
    if not quiet and not console.is_terminal:
        yield LineProgress()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, disable=quiet, transient=False,
    )
    with progress:
        yield progress


def launch_ranks(nproc: int, nnodes: int, rdzv_endpoint: str | None, timeout_s: float) -> bool:
    """With --nproc/--nnodes above 1 in the user's process: run this same command as
    torchrun ranks and return True once they finished (exit 2 if one failed)."""
    from ticketctl.distributed import in_worker, launch, relaunch_args

    if (nproc <= 1 and nnodes <= 1) or in_worker():
        return False
    with tempfile.TemporaryDirectory(prefix="ticketctl-errors-") as errors:
        code = launch(relaunch_args(sys.argv[1:]), nproc, nnodes, rdzv_endpoint, timeout_s,
                      env={RANK_ERRORS_ENV: errors})
        reported = rank_error(Path(errors))
    if code == 0:
        return True
    if reported is None:
        raise TicketctlError(f"a distributed rank failed (exit {code}); every rank was "
                             "stopped, see the messages above")
    rank, message, rank_code, kind = reported
    if rank != 0:
        message = f"a distributed rank failed (rank {rank}: {message}); every rank was stopped"
    err = TicketctlError(message)
    err.exit_code = rank_code
    err.kind = kind  # type: ignore[attr-defined]  # (the --json document's "error")
    raise err


def rank_error(folder: Path) -> tuple[int, str, int, str | None] | None:
    """The error to report of those the ranks wrote (rank, message, exit code, kind): of the
    errors that are not a rank losing its peer (unless there is nothing else), the first one
    written, or rank 0's when it came within the grace the other ranks wait (every rank
    refusing the same input: rank 0's message names the user's own paths)."""
    found = []
    for f in folder.glob("rank*.json"):
        try:
            doc = json.loads(f.read_text())
            found.append((float(doc["time"]), int(f.stem[4:]), str(doc["message"]),
                          int(doc["code"]), doc.get("kind")))
        except (OSError, ValueError, KeyError):
            continue
    causes = [e for e in found if e[4] != LOST_PEER]
    found = causes or found
    if not found:
        return None
    first = min(found)
    zero = next((e for e in found if e[1] == 0 and e[0] - first[0] <= RANK_ERROR_GRACE_S),
                None)
    _, rank, message, code, kind = zero or first
    return rank, message, code, kind
