"""The `ticketctl` command: one module per command group, each a thin function."""

from __future__ import annotations

import sys
from typing import Any

import typer
from typer.core import TyperGroup

from ticketctl import __version__
from ticketctl.cli import attack, trigger
from ticketctl.cli.common import console, emit_json, plain
from ticketctl.cli.convert import convert
from ticketctl.cli.data import data
from ticketctl.cli.demo import demo
from ticketctl.cli.find import find
from ticketctl.cli.inspect import inspect
from ticketctl.cli.retrain import retrain
from ticketctl.cli.sign import keygen, sign, verify
from ticketctl.cli.split import merge, split
from ticketctl.device import configure_cuda


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
                if "--json" in words:
                    emit_json({"error": "usage", "exit_code": code,
                               "message": e.format_message() + hint})
                console.print(f"[bold red]error:[/] {plain(e.format_message() + hint)}",
                              highlight=False, soft_wrap=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="ticketctl",
    cls=OneLineErrors,
    help="Find, protect and verify lottery tickets (sparse masks found by IMP).",
    no_args_is_help=True,
    add_completion=False,
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
    configure_cuda()  # process-wide switches, once, before any command computes


app.command("find")(find)
app.command("retrain")(retrain)
app.command("split")(split)
app.command("merge")(merge)
app.command("keygen")(keygen)
app.command("sign")(sign)
app.command("verify")(verify)
app.add_typer(trigger.app, name="trigger")
app.command("calibrate")(trigger.calibrate)
app.add_typer(attack.app, name="attack")
app.command("inspect")(inspect)
app.command("convert")(convert)
app.command("demo")(demo)
app.command("data")(data)


def main() -> None:
    app()
