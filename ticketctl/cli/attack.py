"""`ticketctl attack ...`: one sub-command per attack, sharing options and rendering."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import check_output_path, write_text_atomic
from ticketctl.attacks import AttackRunner, fake1, nokey
from ticketctl.attacks.checks import owner_checks
from ticketctl.attacks.fake3 import fake3
from ticketctl.attacks.finetune import finetune
from ticketctl.attacks.keymask import summary_rows
from ticketctl.attacks.permute import permute
from ticketctl.attacks.removal import added, mark_removed, pruned, sweep
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
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.plots import plot_attack
from ticketctl.protect.receipt import load_public_key, load_receipt
from ticketctl.protect.trigger import load_trigger_set
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
            no_graph, out_dir, device, progress, pack=None):
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

    return AttackRunner(data, settings.train, out_dir=out_dir, on_epoch=on_epoch, pack=pack)


def _render(report, json_out: bool, quiet: bool, csv_path: Path | None, force: bool,
            plot_path: Path | None = None) -> None:
    rows = summary_rows(report)
    if plot_path is not None:
        plot_attack([r.__dict__ for r in report.rows], report.reference_accuracy, plot_path,
                    title=f"attack {report.attack}", force=force)
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
    cols = ["strength", "accuracy", "change", "matches"]
    extra = [c for c in ("message", "bit_match", "p_value", "defended_message",
                         "defended_p_value", "trigger_accuracy", "verified")
             if any(row.get(c) is not None for row in rows)]
    for col in cols + extra:
        table.add_column(col.replace("_", " "), justify="right")
    for r, row in zip(report.rows, rows, strict=True):
        cells = [f"{r.strength}", f"{r.accuracy:.2f}%",
                 "-" if r.delta is None else f"{r.delta:+.2f}",
                 "-" if r.matches is None else ("yes" if r.matches else "[red]no")]
        for c in extra:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:.2g}" if c.endswith("p_value") else
                         f"{100 * v:.1f}%" if c == "bit_match" else
                         f"{v:.1f}%" if c == "trigger_accuracy" else
                         ("yes" if v else "[red]no") if c == "verified" else str(v))
        table.add_row(*cells)
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
    pack: o.Pack = None,
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
                         no_compile, no_graph, out_dir, device, progress, pack)
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
    pack: o.Pack = None,
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
                         no_compile, no_graph, out_dir, device, progress, pack)
        report = fake1(runner, lt, ratios, key=kt, reference=reference_accuracy, seed=seed)
    _render(report, json_out, quiet, csv_path, force)


ReceiptOpt = Annotated[Optional[Path], typer.Option(help="The owner's receipt (Scheme V2).")]
PubOpt = Annotated[Optional[Path], typer.Option(help="PREFIX.pub that signed the receipt.")]
TriggerOpt = Annotated[Optional[Path], typer.Option(help="The owner's trigger set (V3).")]
PlotOpt = Annotated[Optional[Path], typer.Option(
    "--plot", help="PNG of accuracy and -log10 p against strength.")]


def _removal(model, make_name, strengths, make, receipt, public_key, trigger, null_rate, alpha,
             defend, dataset, data_dir, device, csv_path, plot_path, json_out, quiet, force):
    for p in (csv_path, plot_path):
        if p is not None:
            check_output_path(p, force)
    ticket = load_ticket(model)
    data = load_recorded_dataset(ticket.dataset or {}, dataset, data_dir,
                                 device=resolve_device(device))
    checks = owner_checks(ticket, data, load_receipt(receipt) if receipt else None,
                          load_public_key(public_key) if public_key else None,
                          load_trigger_set(trigger) if trigger else None, null_rate, alpha,
                          defend)
    report = sweep(ticket, data, make_name, strengths, lambda s: make(ticket, s), checks)
    _render(report, json_out, quiet, csv_path, force, plot_path)
    if mark_removed(report):
        raise CheckFailed("an attacked model still matches the original but fails every check")


@app.command("prune")
@handle_errors
def prune_cmd(
    model: Annotated[Path, typer.Argument(help="The released model (a ticket file).")],
    method: Annotated[str, typer.Option(help="omp (by magnitude) or random.")] = "omp",
    ratios: Annotated[str, typer.Option(
        help="Fractions of the remaining weights to remove.")] = "0.05,0.1,0.2,0.3,0.5",
    seed: o.Seed = 0,
    receipt: ReceiptOpt = None,
    public_key: PubOpt = None,
    trigger: TriggerOpt = None,
    null_rate: Annotated[Optional[float], typer.Option(help="Trigger null rate.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level.")] = 1e-6,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    csv_path: CsvOpt = None,
    plot_path: PlotOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Remove a fraction of the remaining weights (no fine-tuning) and check every mark."""
    values = o.parse_floats(ratios, "--ratios") or []
    _removal(model, f"prune-{method}", values,
             lambda t, s: pruned(t, method, s, seed), receipt, public_key, trigger, null_rate,
             alpha, False, dataset, data_dir, device, csv_path, plot_path, json_out, quiet,
             force)


@app.command("addon")
@handle_errors
def addon_cmd(
    model: Annotated[Path, typer.Argument(help="The released model (a ticket file).")],
    rates: Annotated[str, typer.Option(
        help="Fractions of the pruned positions to revive.")] = "0.005,0.01,0.02,0.05,0.1",
    defend: Annotated[bool, typer.Option(
        help="Also verify after the owner's magnitude-floor pruning.")] = False,
    seed: o.Seed = 0,
    receipt: ReceiptOpt = None,
    public_key: PubOpt = None,
    trigger: TriggerOpt = None,
    null_rate: Annotated[Optional[float], typer.Option(help="Trigger null rate.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level.")] = 1e-6,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    csv_path: CsvOpt = None,
    plot_path: PlotOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Revive a fraction of pruned positions with small random weights and check every mark."""
    values = o.parse_floats(rates, "--rates") or []
    _removal(model, "addon", values, lambda t, s: added(t, s, seed), receipt, public_key,
             trigger, null_rate, alpha, defend, dataset, data_dir, device, csv_path, plot_path,
             json_out, quiet, force)


@app.command("permute")
@handle_errors
def permute_cmd(
    model: Annotated[Path, typer.Argument(help="The released model (a ticket file).")],
    seed: o.Seed = 0,
    receipt: ReceiptOpt = None,
    public_key: PubOpt = None,
    trigger: TriggerOpt = None,
    null_rate: Annotated[Optional[float], typer.Option(help="Trigger null rate.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level.")] = 1e-6,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    out: Annotated[Optional[Path], typer.Option(help="Also write the permuted model.")] = None,
    csv_path: CsvOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Permute hidden channels (outputs unchanged) and check every mark; verification
    re-aligns channels by the fingerprints in the receipt."""
    if out is not None:
        check_output_path(out, force)
    ticket = load_ticket(model)
    moved, _ = permute(ticket, seed)
    if out is not None:
        save_ticket(moved, out, force=force)
    _removal(model, "permute", [0.0], lambda t, s: moved.state, receipt, public_key, trigger,
             null_rate, alpha, False, dataset, data_dir, device, csv_path, None, json_out,
             quiet, force)


@app.command("fake3")
@handle_errors
def fake3_cmd(
    signed: Annotated[Path, typer.Argument(help="The released signed model.")],
    message: Annotated[str, typer.Option(help="The forger's message.")],
    receipt: Annotated[Path, typer.Option(help="The owner's receipt.")],
    seed: o.Seed = 1,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """An insider overwrites the signed region with his own code: accuracy cost, and whose
    receipt predates the release."""
    ticket = load_ticket(signed)
    data = load_recorded_dataset(ticket.dataset or {}, dataset, data_dir,
                                 device=resolve_device(device))
    result = fake3(ticket, load_receipt(receipt), message, data, seed=seed)
    if json_out:
        emit_json(result)
    elif not quiet:
        console.print(
            f"fake3: accuracy {result['accuracy_before']:.2f}% -> {result['accuracy_after']:.2f}%"
            f" ({result['delta']:+.2f}); the forger's code reads "
            f"{result['forger_on_forged']['message']!r}; the owner's receipt (signed "
            f"{result['owner_receipt_signed']}, made {result['owner_receipt_created']}) "
            f"{'matches' if result['owner_receipt_matches_release'] else 'does not match'} the "
            f"released model; the forger's receipt (made {result['forger_receipt_created']}) "
            f"{'matches' if result['forger_receipt_matches_release'] else 'does not match'} it",
            highlight=False)


@app.command("finetune")
@handle_errors
def finetune_cmd(
    model: Annotated[Path, typer.Argument(help="The released model (a ticket file).")],
    epochs: Annotated[str, typer.Option(
        help="Fine-tuning epochs, one row each, e.g. 5,10,20.")],
    dense: Annotated[bool, typer.Option(
        help="Train every weight: pruned positions may grow back.")] = False,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate (default: a tenth of the preset's), cosine, no warm-up.")
    ] = None,
    reference_accuracy: RefOpt = None,
    preset: Preset = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Fine-tune on this dataset (default: the model's); another class count gets a "
             "new head (transfer).", rich_help_panel=o.P_DATA)] = None,
    data_dir: o.DataDir = None,
    batch_size: o.BatchSize = None,
    seed: o.Seed = 0,
    no_compile: o.NoCompile = False,
    no_graph: o.NoGraph = False,
    receipt: ReceiptOpt = None,
    public_key: PubOpt = None,
    trigger: TriggerOpt = None,
    null_rate: Annotated[Optional[float], typer.Option(help="Trigger null rate.")] = None,
    alpha: Annotated[float, typer.Option(help="Decision level.")] = 1e-6,
    pack: o.Pack = None,
    out_dir: OutDir = None,
    csv_path: CsvOpt = None,
    plot_path: PlotOpt = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Fine-tune the released model (same data, or another dataset with a new head) and
    check every mark; --dense lets pruned weights grow back."""
    counts = o.parse_ints(epochs, "--epochs") or []
    for p in (csv_path, plot_path):
        if p is not None:
            check_output_path(p, force)
    ticket = load_ticket(model)
    with progress_bar(quiet or json_out) as progress:
        runner = _runner(ticket, preset, dataset, data_dir, None, batch_size, None, seed,
                         no_compile, no_graph, out_dir, device, progress, pack)
        if trigger is not None and runner.data.num_classes != ticket.num_classes:
            raise TicketctlError(
                f"--trigger checks answers in the model's {ticket.num_classes} classes; a "
                f"transfer to {runner.data.num_classes} classes replaces the head")
        checks = owner_checks(ticket, runner.data,
                              load_receipt(receipt) if receipt else None,
                              load_public_key(public_key) if public_key else None,
                              load_trigger_set(trigger) if trigger else None, null_rate, alpha,
                              defend=receipt is not None)
        report = finetune(runner, ticket, counts, dense=dense, lr=lr, checks=checks,
                          reference=reference_accuracy, seed=seed)
    _render(report, json_out, quiet, csv_path, force, plot_path)
    if mark_removed(report):
        raise CheckFailed("a fine-tuned model still matches the original but fails every check")
