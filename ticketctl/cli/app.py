"""The `ticketctl` command: one module per command group, each a thin function."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from ticketctl import __version__, prefetch
from ticketctl.cli.common import console, emit_json, plain


@dataclass(frozen=True)
class Lazy:
    """A command whose module (and PyTorch, SciPy, ...) is imported only when it runs or its
    own --help is asked for: `ticketctl --help` and `--version` import none of them."""

    module: str
    attr: str
    help: str  # the first paragraph of its docstring (a test keeps the two the same)
    group: bool = False  # `attr` is a Typer app of sub-commands


COMMANDS = {
    "find": Lazy("ticketctl.cli.find", "find", "Find a ticket: dense training, then IMP with "
                 "rewinding and the extreme-ticket search."),
    "retrain": Lazy("ticketctl.cli.retrain", "retrain", "Train a ticket from its rewind "
                    "weights under its mask; report test accuracy."),
    "split": Lazy("ticketctl.cli.split", "split", "Scheme V1: split a ticket into a small "
                  "secret key and the locked rest."),
    "merge": Lazy("ticketctl.cli.split", "merge", "Join a locked ticket and its key back into "
                  "the exact original ticket."),
    "keygen": Lazy("ticketctl.cli.sign", "keygen", "Make an Ed25519 key pair for signing "
                   "receipts."),
    "sign": Lazy("ticketctl.cli.sign", "sign", "Scheme V2: embed a message as a QR code in "
                 "the mask; write the signed ticket and a receipt."),
    "verify": Lazy("ticketctl.cli.sign", "verify", "Verify a suspect model: the QR code in "
                   "its mask against a receipt (white box) and its answers to a trigger set "
                   "(black box), each with a p-value."),
    "trigger": Lazy("ticketctl.cli.trigger", "app", "Scheme V3 trigger sets.", group=True),
    "calibrate": Lazy("ticketctl.cli.trigger", "calibrate", "Measure how often models "
                      "trained without the trigger set agree with it; write the upper 99% "
                      "bound as the null rate for `verify --null-rate`."),
    "attack": Lazy("ticketctl.cli.attack", "app", "Simulate the attacks a thief would try.",
                   group=True),
    "inspect": Lazy("ticketctl.cli.inspect", "inspect", "Show what a ticket file holds: "
                    "per-layer density, metadata and hashes (and what run-folder files and "
                    "trigger sets hold). The report goes to stdout; with several files, "
                    "--json prints one list."),
    "convert": Lazy("ticketctl.cli.convert", "convert", "Import torch-prune or authors' "
                    "checkpoints (weights_only loading), or export a ticket (its metadata "
                    "kept in the export, so a round trip keeps kind, rewind epoch and "
                    "dataset)."),
    "demo": Lazy("ticketctl.cli.demo", "demo", "Run the pipeline on the embedded digits "
                 "dataset on CPU (about 35 s on 2 cores)."),
    "data": Lazy("ticketctl.cli.data", "data", "Check that a dataset loads from its folder "
                 "and show its splits."),
}


def load_command(name: str) -> Any:
    """The Click command of `COMMANDS[name]`, built by Typer from its module."""
    spec = COMMANDS[name]
    obj = getattr(importlib.import_module(spec.module), spec.attr)
    if spec.group:
        cmd = typer.main.get_group(obj)
    else:
        one = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
        one.command(name)(obj)
        cmd = typer.main.get_command(one)
    cmd.name = name
    return cmd


class OneLineErrors(TyperGroup):
    """Usage errors (a missing option, a value outside its choices, a word that is not a
    number) as one line on stderr with exit status 2, like every other error, instead of
    Click's usage box. Help screens and exit codes are otherwise Typer's."""

    def main(self, args: Any = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as e:  # Click's exceptions (Typer vendors Click: matched by shape)
            code = getattr(e, "exit_code", None)
            if not isinstance(code, int) or not callable(getattr(e, "format_message", None)):
                if type(e).__name__ != "Abort":
                    raise
                console.print("[bold red]error:[/] aborted", highlight=False)
                sys.exit(1)
            if type(e).__name__ != "NoArgsIsHelpError":  # whose help is already printed
                ctx = getattr(e, "ctx", None)
                hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
                words = sys.argv[1:] if args is None else [str(a) for a in args]
                # one line: Click lists a missing choice option's choices one per line
                message = " ".join(e.format_message().split()) + hint
                if "--json" in words:
                    emit_json({"error": "usage", "exit_code": code, "message": message})
                console.print(f"[bold red]error:[/] {plain(message)}",
                              highlight=False, soft_wrap=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)

    # ---- commands, imported when used ----------------------------------------------------------
    _loaded: dict[str, Any] = {}

    def list_commands(self, ctx: Any) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: Any, name: str) -> Any:
        """The command once loaded; before, a stand-in with its name and help (what the
        root --help lists), so listing imports nothing."""
        if name in self._loaded:
            return self._loaded[name]
        spec = COMMANDS.get(name)
        return None if spec is None else TyperCommand(name, help=spec.help)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else None
        if name in COMMANDS:
            # the file a command reads first is read and hashed on another core while the
            # command's module imports PyTorch (ticketctl/prefetch.py)
            prefetch.start_for_args(args[1:])
        if name in COMMANDS and name not in self._loaded:
            self._loaded[name] = load_command(name)
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="ticketctl",
    cls=OneLineErrors,
    help="Find, protect and verify lottery tickets (sparse masks found by IMP).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ticketctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Find, protect and verify lottery tickets (sparse masks found by IMP)."""
    from ticketctl.device import configure_cuda  # PyTorch: only once a command runs

    configure_cuda()  # process-wide switches, once, before any command computes


def main() -> None:
    """The console command. Once the command has finished and its output is flushed, the
    process ends without the interpreter's teardown: PyTorch's (unregistering its operators,
    a garbage collection of every object) takes about 0.4 s on 2 cores, longer than most of
    `verify`'s own work. Exit handlers still run; an exception ends the process as usual."""
    try:
        app()
        code: object = 0
    except SystemExit as e:
        code = e.code
    if code is not None and not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    fast_exit(code or 0)


def fast_exit(code: int) -> None:
    """Flush, run the exit handlers, and end the process with `code` (see `main`)."""
    import atexit
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing to keep
            pass
    atexit._run_exitfuncs()  # what the interpreter would run first (torch, multiprocessing)
    os._exit(code)
