"""`ticketctl attack ...`: one sub-command per attack. They share their options (the groups
below and in `options`) and their rendering."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer
from rich.progress import Progress
from rich.table import Table

from ticketctl.artifacts import Ticket, load_ticket, save_ticket
from ticketctl.artifacts.convert import write_state_dict
from ticketctl.artifacts.io import all_or_nothing, write_text_atomic
from ticketctl.attacks import AttackReport, AttackRunner, fake1, nokey
from ticketctl.attacks.channels import ChannelPruned, channel_pruned, check_ratios
from ticketctl.attacks.checks import owner_checks
from ticketctl.attacks.degrade import check_sigmas, noised, parse_formats, quantized
from ticketctl.attacks.distill import check_temperature, distill_attack
from ticketctl.attacks.fake3 import fake3
from ticketctl.attacks.finetune import finetune
from ticketctl.attacks.keymask import summary_rows
from ticketctl.attacks.permute import permute, permute_blind
from ticketctl.attacks.removal import Method, added, mark_removed, pruned
from ticketctl.attacks.removal import sweep as sweep_removal
from ticketctl.attacks.runner import MATCH_POINTS
from ticketctl.attacks.spread import parse_devices
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import (
    Compute,
    DataOptions,
    NetworkSource,
    OldSpelling,
    Output,
    OwnerMarks,
    Pack,
    Training,
    Without,
    command,
    group,
    nested,
    option,
    parse_floats,
    parse_ints,
)
from ticketctl.data import Dataset, load_recorded_dataset
from ticketctl.device import resolve_device
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.plots import plot_attack
from ticketctl.protect.receipt import load_receipt
from ticketctl.prune import resolve_settings

app = typer.Typer(help="Simulate the attacks a thief would try.", no_args_is_help=True)

Released = Annotated[Path, typer.Argument(metavar="MODEL",
                                          help="The released model (a ticket file).")]
Locked = Annotated[Path, typer.Argument(metavar="LOCKED", help="A locked ticket.")]
Seed = Annotated[int, typer.Option(help="Seed of the attack's random choices.")]


def attack(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an attack sub-command (its options expanded by `options.command`)."""
    return lambda fn: app.command(name)(command(fn))


@group()
class Report:
    """Where a sweep's rows go besides the table or JSON."""

    csv_path: Optional[Path] = option("--csv", help="Also write the rows as CSV.")
    plot_path: Optional[Path] = option("--plot",
                                    help="PNG of accuracy and -log10 p against strength.")

    def write(self, report: AttackReport, force: bool,
              also: Callable[[], object] | None = None) -> None:
        """The plot and the CSV (and what `also` writes), all of them or none."""
        with all_or_nothing(self.plot_path, self.csv_path, force=force):
            if also is not None:
                also()
            if self.plot_path is not None:
                plot_attack([r.__dict__ for r in report.rows], report.reference_accuracy,
                            self.plot_path, title=f"attack {report.attack}", force=force)
            if self.csv_path is not None:
                rows = summary_rows(report)
                buf = io.StringIO()
                w = csv.DictWriter(buf, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
                write_text_atomic(self.csv_path, buf.getvalue(), force=force)


@group()
class Sweep:
    """What every attack shares: its data, where its rows go, how it reports and computes."""

    data: DataOptions = nested(DataOptions)
    network: NetworkSource = nested(NetworkSource)
    report: Report = nested(Report)
    output: Output = nested(Output)
    compute: Compute = nested(Compute)

    def dataset(self, ticket: Ticket) -> Dataset:
        """The ticket's recorded dataset, unless another was given; in memory (the attacks
        train and score on whole splits)."""
        data = load_recorded_dataset(ticket.dataset or {}, self.data.dataset,
                                     self.data.data_dir,
                                     device=resolve_device(self.compute.device),
                                     stream=self.data.streaming.stream,
                                     image_size=self.data.streaming.image_size)
        data.require_resident("the attacks")
        return data

    def scoring_data(self, ticket: Ticket, marks: OwnerMarks | None = None) -> Dataset | None:
        """The dataset accuracy is measured on, or None when the ticket's network cannot be
        built here (imported without it, no --model-factory): the marks are still checked
        and the accuracy columns say "not measured"."""
        if ticket.can_build():
            return self.dataset(ticket)
        if marks is not None and marks.trigger is not None:
            raise TicketctlError("--trigger checks the model's answers, which needs its "
                                 "network: pass --model-factory FILE.py:FUNCTION")
        return None

    def render(self, report: AttackReport,
               also: Callable[[], object] | None = None) -> AttackReport:
        self.report.write(report, self.output.force, also)
        self.output.emit(report.to_dict(), lambda: console.print(_table(report)))
        return report


@group()
class Retraining:
    """What an attack that trains shares: the schedule, the reference, the sweep folder."""

    training: Training = nested(Training)
    pack: Pack = None
    key: Optional[Path] = option(
        "--key-mask", old="--key", help="The owner's key mask (the V1 key file `split` "
        "wrote): the original ticket is retrained the same way as the reference.")
    reference_accuracy: Optional[float] = option(
        help="Reference accuracy of the original ticket, if no --key-mask is given.")
    out_dir: Optional[Path] = option(
        help="Sweep folder: finished rows are kept there and reused on a rerun.")
    devices: Optional[str] = option(
        help="Spread the sweep's trainings over these devices, one worker process each: "
             "'all' (every visible GPU), or a list such as cuda:0,cuda:1 (default: one).")

    def key_ticket(self) -> Ticket | None:
        return load_ticket(self.key) if self.key else None

    def runner(self, ticket: Ticket, sweep: Sweep, progress: Progress) -> AttackRunner:
        """Retraining on the ticket's dataset (or the one given) with the preset's schedule."""
        settings = resolve_settings(
            self.training.preset, arch=ticket.arch,
            dataset=sweep.data.dataset or (ticket.dataset or {}).get("name"),
            train=self.training.overrides())
        settings.train.validate()
        tasks: dict[str, int] = {}

        def on_epoch(label, s):
            if label not in tasks:
                tasks[label] = progress.add_task(f"retrain {label}",
                                                 total=settings.train.epochs, info="")
            progress.update(tasks[label], completed=s.epoch,
                            info=f"test {s.test_accuracy:.2f}%" if s.test_accuracy is not
                            None and s.test_accuracy == s.test_accuracy else
                            f"loss {s.train_loss:.3f}")

        data = sweep.dataset(ticket)
        return AttackRunner(data, settings.train, out_dir=self.out_dir,
                            on_epoch=on_epoch, pack=self.pack,
                            devices=parse_devices(self.devices, data.device))


def _table(report: AttackReport) -> Table:
    rows = summary_rows(report)
    ref = report.reference_accuracy
    shown = "not measured" if ref is None else f"{ref:.2f}%"
    table = Table(title=f"attack {report.attack}: reference {shown} "
                        f"({plain(report.reference)})")
    cols = ["strength", "accuracy", "change", "matches"]
    extra = [c for c in ("message", "bit_match", "p_value", "defended_message",
                         "defended_p_value", "trigger_accuracy", "verified")
             if any(row.get(c) is not None for row in rows)]
    for col in cols + extra:
        table.add_column(col.replace("_", " "), justify="right", overflow="fold")
    for r, row in zip(report.rows, rows, strict=True):
        cells = [f"{r.strength}", "not measured" if r.accuracy is None else f"{r.accuracy:.2f}%",
                 "-" if r.delta is None else f"{r.delta:+.2f}",
                 "-" if r.matches is None else ("yes" if r.matches else "[red]no")]
        for c in extra:
            v = row.get(c)
            cells.append("-" if v is None else f"{v:.2g}" if c.endswith("p_value") else
                         f"{100 * v:.1f}%" if c == "bit_match" else
                         f"{v:.1f}%" if c == "trigger_accuracy" else
                         ("yes" if v else "[red]no") if c == "verified" else plain(v))
        table.add_row(*cells)
    return table


def _refuse_removed(report: AttackReport, what: str) -> None:
    if mark_removed(report):
        raise CheckFailed(f"{what} still matches the original but fails every check")


def _refuse_lock_broken(report: AttackReport, how: str) -> None:
    """A V1 attack succeeds when the locked ticket, retrained {how}, matches the reference."""
    broken = [r for r in report.rows if r.matches]
    if broken:
        r = broken[0]
        raise CheckFailed(f"the lock had no effect: retrained {how}, the locked ticket reaches "
                          f"{r.accuracy:.2f}% against the reference "
                          f"{report.reference_accuracy:.2f}% (within {MATCH_POINTS:g} point)")


def _retraining_sweep(path: Path, retraining: Retraining, sweep: Sweep,
                      run: Callable[[AttackRunner, Ticket], AttackReport]) -> AttackReport:
    """An attack that trains: its runner, its progress bars, then the rows."""
    sweep.output.check(sweep.report.csv_path, sweep.report.plot_path)
    ticket = load_ticket(path)
    with sweep.output.progress() as progress:
        report = run(retraining.runner(ticket, sweep, progress), ticket)
    return sweep.render(report)


# ---- attacks on a locked ticket (Scheme V1) ------------------------------------------------------
@attack("nokey")
def nokey_cmd(*, locked: Locked, retraining: Retraining, sweep: Sweep) -> None:
    """Retrain a locked ticket from its rewind weights without the key; exits 1 when that
    still matches the reference (the lock had no effect)."""
    _refuse_lock_broken(_retraining_sweep(locked, retraining, sweep, lambda runner, lt: nokey(
        runner, lt, key=retraining.key_ticket(), reference=retraining.reference_accuracy)),
        "without the key")


@attack("fake1")
def fake1_cmd(
    locked: Locked,
    key_ratios: Annotated[str, typer.Option(
        help="Forged key sizes as fractions of the ticket, one row each, e.g. 0.05,0.1,0.2."),
        OldSpelling("--key-ratio")],
    retraining: Retraining,
    sweep: Sweep,
) -> None:
    """Retrain a locked ticket with a forged random key of the same size (ambiguity attack);
    exits 1 when a forged key matches the reference (the forgery works)."""
    ratios = parse_floats(key_ratios, "--key-ratios") or []
    _refuse_lock_broken(_retraining_sweep(locked, retraining, sweep, lambda runner, lt: fake1(
        runner, lt, ratios, key=retraining.key_ticket(),
        reference=retraining.reference_accuracy, seed=retraining.training.seed)),
        "with a forged key")


# ---- removal attacks on a released model, checked by every mark ---------------------------------
def _removal(model: Path | Ticket, name: str, strengths: list[Any],
             make: Callable[[Ticket, Any], Any], marks: OwnerMarks,
             defend: bool, sweep: Sweep, also: Callable[[], object] | None = None,
             rates: bool = True) -> None:
    """An attack without training on `model` (a path, or the ticket already read)."""
    sweep.output.check(sweep.report.csv_path, sweep.report.plot_path)
    ticket = model if isinstance(model, Ticket) else load_ticket(model)
    dataset = sweep.scoring_data(ticket, marks)
    checks = owner_checks(ticket, dataset, marks.load(defend=defend))
    result = sweep.render(sweep_removal(ticket, dataset, name, strengths,
                                        lambda s: make(ticket, s), checks, rates=rates), also)
    _refuse_removed(result, "an attacked model")


@attack("prune")
def prune_cmd(
    *,
    model: Released,
    method: Annotated[Method, typer.Option(help="Which weights to remove.")] = Method.OMP,
    rates: Annotated[str, typer.Option(
        help="Fractions of the remaining weights to remove, one row each."),
        OldSpelling("--ratios")] = "0.05,0.1,0.2,0.3,0.5",
    seed: Seed = 0,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Remove a fraction of the remaining weights (no fine-tuning) and check every mark."""
    values = parse_floats(rates, "--rates") or []
    _removal(model, f"prune-{method}", values, lambda t, s: pruned(t, method, s, seed), marks,
             False, sweep)


@attack("addon")
def addon_cmd(
    *,
    model: Released,
    rates: Annotated[str, typer.Option(
        help="Fractions of the pruned positions to revive, one row each.")
    ] = "0.005,0.01,0.02,0.05,0.1",
    defend: Annotated[bool, typer.Option(
        help="Also verify after the owner's magnitude-floor pruning.")] = False,
    seed: Seed = 0,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Revive a fraction of pruned positions with small random weights and check every mark."""
    values = parse_floats(rates, "--rates") or []
    _removal(model, "addon", values, lambda t, s: added(t, s, seed), marks, defend, sweep)


def _save_paths(save: Path | None, names: list[str], sweep: Sweep) -> list[Path]:
    """--save FOLDER: FOLDER/<name>.safetensors for each row (the folder made), none of them
    over an existing file without --force."""
    if save is None:
        return []
    if save.exists() and not save.is_dir():
        raise TicketctlError(f"--save {save}: not a folder")
    try:
        save.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TicketctlError(f"cannot make --save {save}: {e.strerror or e}") from None
    files = [save / f"{n}.safetensors" for n in names]
    sweep.output.check(*files)
    return files


def _writer(files: list[Path], state: Callable[[int], dict[str, torch.Tensor]],
            sweep: Sweep) -> Callable[[], None] | None:
    """What writes row i's model to files[i] as a plain state dict, with the rows' plot and
    CSV (all of them or none); None when nothing is saved."""
    if not files:
        return None

    def write() -> None:
        for i, path in enumerate(files):
            write_state_dict(state(i), path, force=sweep.output.force)

    return write


@attack("quantize")
def quantize_cmd(
    *,
    model: Released,
    bits: Annotated[str, typer.Option(
        help="Integer widths (2-16 bits, per-channel symmetric) and 'fp8' (float8 e4m3, "
             "per-channel scaled), one row each.")] = "8,6,4,fp8",
    save: Annotated[Optional[Path], typer.Option(
        help="Also write each quantized (dequantized) model into this folder as a plain "
             "state dict, FOLDER/quantized-<format>.safetensors, for `verify`.")] = None,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Quantize every conv and linear weight after training, as deployments do (no
    fine-tuning), and check every mark on the dequantized model."""
    formats = parse_formats(bits)
    files = _save_paths(save, [f"quantized-{f}" for f in formats], sweep)
    ticket = load_ticket(model)
    _removal(ticket, "quantize", formats, quantized, marks, False, sweep,
             also=_writer(files, lambda i: quantized(ticket, formats[i]), sweep), rates=False)


@attack("channel-prune")
def channel_prune_cmd(
    *,
    model: Released,
    rates: Annotated[str, typer.Option(
        help="Fractions of each layer's output channels to remove, in (0, 1), one row each."),
        OldSpelling("--ratios")] = "0.1,0.2,0.3,0.5",
    save: Annotated[Optional[Path], typer.Option(
        help="Also write each smaller model into this folder as a plain state dict, "
             "FOLDER/channel-pruned-<rate>.safetensors, for `verify`.")] = None,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Remove the output channels of smallest L1 norm from every layer whose channels feed
    only other layers' weights, with the inputs that read them (no fine-tuning), and check
    every mark on the smaller model; verification re-aligns the signed layer's channels."""
    values = parse_floats(rates, "--rates") or []
    check_ratios(values)
    files = _save_paths(save, [f"channel-pruned-{r:g}" for r in values], sweep)
    ticket = load_ticket(model)
    if not ticket.can_build():
        raise TicketctlError("channel pruning needs the ticket's network, to know which layers "
                             "read which channels: import the ticket with its network "
                             "(--arch or --model-factory)")
    made: dict[float, ChannelPruned] = {}

    def make(t: Ticket, r: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        made[r] = made.get(r) or channel_pruned(t, r)
        return made[r].released, made[r].scored

    _removal(ticket, "channel-prune", values, make, marks, False, sweep,
             also=_writer(files, lambda i: made[values[i]].released, sweep), rates=False)


@attack("noise")
def noise_cmd(
    *,
    model: Released,
    sigmas: Annotated[str, typer.Option(
        help="Noise added to every kept weight, as a fraction of its layer's weight "
             "standard deviation, one row each.")] = "0.01,0.05,0.1,0.2,0.5",
    seed: Seed = 0,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Add Gaussian noise to the kept weights (masks unchanged) and check every mark."""
    values = parse_floats(sigmas, "--sigmas") or []
    check_sigmas(values)
    _removal(model, "noise", values, lambda t, s: noised(t, s, seed), marks, False, sweep,
             rates=False)


@attack("permute")
def permute_cmd(
    *,
    model: Released,
    seed: Seed = 0,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Also write the permuted model.")] = None,
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Permute hidden channels (outputs unchanged) and check every mark; verification
    re-aligns channels by the fingerprints in the receipt. A ticket imported without its
    network gets each masked layer's units relabelled independently (accuracy not
    measured)."""
    sweep.output.check(out)
    ticket = load_ticket(model)
    moved, _ = permute(ticket, seed) if ticket.can_build() else permute_blind(ticket, seed)
    # the permuted model is written with the rows' plot and CSV: all of them or none
    _removal(ticket, "permute", [0.0], lambda t, s: moved.state, marks, False, sweep,
             also=None if out is None else lambda: save_ticket(moved, out,
                                                               force=sweep.output.force))


# ---- an insider's forgery (Scheme V2) ------------------------------------------------------------
@attack("fake3")
def fake3_cmd(
    *,
    signed: Annotated[Path, typer.Argument(help="The released signed model.")],
    message: Annotated[str, typer.Option(help="The forger's message.")],
    receipt: Annotated[Path, typer.Option(help="The owner's receipt.")],
    seed: Seed = 1,
    sweep: Sweep,
) -> None:
    """An insider overwrites the signed region with his own code: accuracy cost, and whose
    receipt predates the release."""
    sweep.output.check(sweep.report.csv_path, sweep.report.plot_path)
    ticket = load_ticket(signed)
    report = fake3(ticket, load_receipt(receipt), message, sweep.scoring_data(ticket),
                   seed=seed)
    sweep.report.write(report, sweep.output.force)
    result = report.to_dict()
    sweep.output.emit(result, lambda: console.print(
        ("fake3: accuracy not measured (no network); " if result["delta"] is None else
         f"fake3: accuracy {result['accuracy_before']:.2f}% -> "
         f"{result['accuracy_after']:.2f}% ({result['delta']:+.2f}); ")
        + "the forger's code reads "
        f"{plain(repr(result['forger_on_forged']['message']))}; the owner's receipt (signed "
        f"{result['owner_receipt_signed']}, made {result['owner_receipt_created']}) "
        f"{'matches' if result['owner_receipt_matches_release'] else 'does not match'} the "
        f"released model; the forger's receipt (made {result['forger_receipt_created']}) "
        f"{'matches' if result['forger_receipt_matches_release'] else 'does not match'} it",
        highlight=False))


# ---- distillation --------------------------------------------------------------------------------
@attack("distill")
def distill_cmd(
    *,
    model: Released,
    temperature: Annotated[float, typer.Option(
        help="Softening of both networks' outputs in the distillation loss.")] = 4.0,
    student: Annotated[Optional[str], typer.Option(
        help="The student's architecture, a registered name (default: the released one's).")
    ] = None,
    retraining: Annotated[Retraining, Without("key", "reference_accuracy")],
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Train a fresh network only on the released model's softened outputs over the training
    images (no labels, no masks) for --epochs, and check every mark on it: the signature is
    expected to vanish; the row shows what the trigger set keeps."""
    check_temperature(temperature)

    def run(runner: AttackRunner, ticket: Ticket) -> AttackReport:
        return distill_attack(runner, ticket, temperature, marks.load(defend=False), student)

    _refuse_removed(_retraining_sweep(model, retraining, sweep, run), "a distilled model")


# ---- fine-tuning and transfer --------------------------------------------------------------------
@attack("finetune")
def finetune_cmd(
    *,
    model: Released,
    sweep_epochs: Annotated[str, typer.Option(
        help="Fine-tuning lengths in epochs, one row each, e.g. 5,10,20."),
        OldSpelling("--epochs")],
    dense: Annotated[bool, typer.Option(
        help="Train every weight: pruned positions may grow back.")] = False,
    lr: Annotated[Optional[float], typer.Option(
        help="Peak learning rate (default: a tenth of the preset's), cosine, no warm-up.")
    ] = None,
    retraining: Annotated[Retraining, Without("key", "epochs", "lr")],
    marks: OwnerMarks,
    sweep: Sweep,
) -> None:
    """Fine-tune the released model (on its own data, or on another --dataset: another class
    count gets a new head, a transfer) and check every mark; --dense lets pruned weights grow
    back."""
    counts = parse_ints(sweep_epochs, "--sweep-epochs") or []

    def run(runner: AttackRunner, ticket: Ticket) -> AttackReport:
        if marks.trigger is not None and runner.data.num_classes != ticket.num_classes:
            raise TicketctlError(
                f"--trigger checks answers in the model's {ticket.num_classes} classes; a "
                f"transfer to {runner.data.num_classes} classes replaces the head")
        checks = owner_checks(ticket, runner.data, marks.load(defend=marks.receipt is not None))
        return finetune(runner, ticket, counts, dense=dense, lr=lr, checks=checks,
                        reference=retraining.reference_accuracy, seed=retraining.training.seed)

    _refuse_removed(_retraining_sweep(model, retraining, sweep, run), "a fine-tuned model")
