"""`ticketctl attack ...`: one sub-command per attack, sharing options and rendering."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketctl.artifacts import load_ticket
from ticketctl.artifacts.io import check_output_path, write_text_atomic
from ticketctl.attacks import AttackRunner, fake1, nokey
from ticketctl.attacks.keymask import summary_rows
from ticketctl.cli import options as o
from ticketctl.cli.common import (
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    QuietOpt,
    console,
    emit_json,
    handle_errors,
    progress_bar,
)
from ticketctl.data import load_recorded_dataset
from ticketctl.device import resolve_device
from ticketctl.prune import resolve_settings

app = typer.Typer(help="Simulate the attacks a thief would try.", no_args_is_help=True)

KeyOpt = Annotated[Optional[Path], typer.Option(
    help="The owner's key: the original ticket is retrained the same way as the reference.")]
RefOpt = Annotated[Optional[float], typer.Option(
    help="Reference accuracy of the original ticket, if no --key is given.")]
OutDir = Annotated[Optional[Path], typer.Option(
    help="Sweep folder: finished rows are kept there and reused on a rerun.")]
CsvOpt = Annotated[Optional[Path], typer.Option("--csv", help="Also write the rows as CSV.")]
Preset = Annotated[Optional[str], typer.Option(
    help="Retraining schedule: demo, fast or paper (default: demo on digits, else paper).")]


def _runner(ticket, preset, dataset, data_dir, epochs, batch_size, lr, seed, no_compile,
            no_graph, out_dir, device, progress):
    settings = resolve_settings(
        preset, arch=ticket.arch, dataset=dataset or (ticket.dataset or {}).get("name"),
        train=o.train_overrides(epochs, batch_size, lr, None, None, None, None, None, None, seed,
                                no_compile, no_graph, False, False))
    settings.train.validate()
    data = load_recorded_dataset(ticket.dataset or {}, dataset, data_dir,
                                 device=resolve_device(device))
    tasks: dict[str, int] = {}

    def on_epoch(label, s):
        if label not in tasks:
            tasks[label] = progress.add_task(f"retrain {label}", total=settings.train.epochs,
                                             info="")
        progress.update(tasks[label], completed=s.epoch, info=f"test {s.test_accuracy:.2f}%")

    return AttackRunner(data, settings.train, out_dir=out_dir, on_epoch=on_epoch)


def _render(report, json_out: bool, quiet: bool, csv_path: Path | None, force: bool) -> None:
    rows = summary_rows(report)
    if csv_path is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        write_text_atomic(csv_path, buf.getvalue(), force=force)
    if json_out:
        emit_json(report.to_dict())
        return
    if quiet:
        return
    ref = report.reference_accuracy
    table = Table(title=f"attack {report.attack}: reference "
                        f"{'-' if ref is None else f'{ref:.2f}%'} ({report.reference})")
    for col in ("strength", "accuracy", "change", "matches"):
        table.add_column(col, justify="right")
    for r in report.rows:
        table.add_row(f"{r.strength}", f"{r.accuracy:.2f}%",
                      "-" if r.delta is None else f"{r.delta:+.2f}",
                      "-" if r.matches is None else ("yes" if r.matches else "[red]no"))
    console.print(table)


@app.command("nokey")
@handle_errors
def nokey_cmd(
    locked: Annotated[Path, typer.Argument(metavar="LOCKED", help="A locked ticket.")],
    key: KeyOpt = None,
    reference_accuracy: RefOpt = None,
    preset: Preset = None,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    epochs: o.Epochs = None,
    batch_size: o.BatchSize = None,
    lr: o.Lr = None,
    seed: o.Seed = 0,
    no_compile: o.NoCompile = False,
    no_graph: o.NoGraph = False,
    out_dir: OutDir = None,
    csv_path: CsvOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Retrain a locked ticket from its rewind weights without the key."""
    if csv_path:
        check_output_path(csv_path, force)
    lt = load_ticket(locked)
    kt = load_ticket(key) if key else None
    with progress_bar(quiet or json_out) as progress:
        runner = _runner(lt, preset, dataset, data_dir, epochs, batch_size, lr, seed,
                         no_compile, no_graph, out_dir, device, progress)
        report = nokey(runner, lt, key=kt, reference=reference_accuracy)
    _render(report, json_out, quiet, csv_path, force)


@app.command("fake1")
@handle_errors
def fake1_cmd(
    locked: Annotated[Path, typer.Argument(metavar="LOCKED", help="A locked ticket.")],
    key_ratio: Annotated[str, typer.Option(
        help="Forged key size(s) as a fraction of the ticket, e.g. 0.05,0.1,0.2.")],
    key: KeyOpt = None,
    reference_accuracy: RefOpt = None,
    preset: Preset = None,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    epochs: o.Epochs = None,
    batch_size: o.BatchSize = None,
    lr: o.Lr = None,
    seed: o.Seed = 0,
    no_compile: o.NoCompile = False,
    no_graph: o.NoGraph = False,
    out_dir: OutDir = None,
    csv_path: CsvOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Retrain a locked ticket with a forged random key of the same size (ambiguity attack)."""
    ratios = o.parse_floats(key_ratio, "--key-ratio") or []
    if csv_path:
        check_output_path(csv_path, force)
    lt = load_ticket(locked)
    kt = load_ticket(key) if key else None
    with progress_bar(quiet or json_out) as progress:
        runner = _runner(lt, preset, dataset, data_dir, epochs, batch_size, lr, seed,
                         no_compile, no_graph, out_dir, device, progress)
        report = fake1(runner, lt, ratios, key=kt, reference=reference_accuracy, seed=seed)
    _render(report, json_out, quiet, csv_path, force)
