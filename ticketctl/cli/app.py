"""The `ticketctl` command: one module per command group, each a thin function."""

from __future__ import annotations

import typer

from ticketctl import __version__
from ticketctl.cli import attack, trigger
from ticketctl.cli.convert import convert
from ticketctl.cli.data import data
from ticketctl.cli.demo import demo
from ticketctl.cli.find import find
from ticketctl.cli.inspect import inspect
from ticketctl.cli.retrain import retrain
from ticketctl.cli.sign import keygen, sign, verify
from ticketctl.cli.split import merge, split

app = typer.Typer(
    name="ticketctl",
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
