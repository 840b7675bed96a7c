"""`ticketctl retrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import all_or_nothing, check_output_path
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import (
    Compute,
    DataOptions,
    Distributed,
    NetworkSource,
    Output,
    Split,
    Training,
    command,
)
from ticketctl.data import load_recorded_dataset
from ticketctl.device import resolve_device
from ticketctl.distributed import init_from_env, shutdown
from ticketctl.errors import TicketctlError
from ticketctl.protect.receipt import load_private_key, load_receipt, save_receipt, trigger_receipt
from ticketctl.protect.trigger import load_trigger_set
from ticketctl.protect.verdict import default_null_rate, matches_needed
from ticketctl.prune import resolve_settings
from ticketctl.train.retrain import default_trigger_per_batch, retrain_ticket


@command
def retrain(
    *,
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="A ticket file.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o",
                                                help="Write the trained model here.")] = None,
    data: DataOptions,
    split: Split,
    training: Training,
    trigger: Annotated[Optional[Path], typer.Option(
        help="Scheme V3: mix this trigger set (.npz or folder) into every batch.")] = None,
    trigger_per_batch: Annotated[Optional[int], typer.Option(
        help="Trigger images per batch (default: enough for each image to be seen about 260 "
             "times over the schedule; the paper's 1 is far too few at batch 512).")] = None,
    receipt: Annotated[Optional[Path], typer.Option(
        help="Commit the trigger set's SHA-256 to this receipt (updated in place, or new).")
    ] = None,
    signing_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.key to sign the receipt.")] = None,
    dist: Distributed,
    network: NetworkSource,
    output: Output,
    compute: Compute,
) -> None:
    """Train a ticket from its rewind weights under its mask; report test accuracy."""
    output.check(out)
    if receipt is not None and trigger is None:
        raise TicketctlError("--receipt records a trigger set: pass --trigger too")
    if receipt is not None:  # updated in place: it may exist, but in a folder, not be one
        check_output_path(receipt, force=True)
        if out is not None and out.resolve() == receipt.resolve():
            raise TicketctlError("--out and --receipt must be different files")
    if trigger_per_batch is not None and trigger is None:
        raise TicketctlError("--trigger-per-batch needs --trigger SET")
    if dist.wanted and trigger is not None:
        raise TicketctlError("--trigger does not run distributed yet: drop --nproc")
    if dist.launched():
        return
    ticket = load_ticket(ticket_path)
    settings = resolve_settings(
        training.preset, arch=ticket.arch,
        dataset=data.dataset or (ticket.dataset or {}).get("name"),
        train=dist.train_overrides(training.overrides()))
    settings.train.validate()
    dataset = load_recorded_dataset(ticket.dataset or {}, data.dataset, data.data_dir,
                                    device=resolve_device(compute.device),
                                    val_size=split.val_size, split_seed=split.split_seed,
                                    stream=data.streaming.stream,
                                    image_size=data.streaming.image_size)
    trig, trig_set = None, None
    # every input is read before the training, so a bad one fails now, not after it
    key = load_private_key(signing_key) if signing_key else None
    prior = load_receipt(receipt) if receipt is not None and receipt.exists() else None
    if trigger is not None:
        trig_set = load_trigger_set(trigger)
        trig_set.check_classes(ticket.num_classes)
        trig = (trig_set.tensor(dataset.input_shape, dataset.mean, dataset.std),
                torch.from_numpy(trig_set.labels))
        if trigger_per_batch is None:
            trigger_per_batch, views = default_trigger_per_batch(
                len(trig_set.labels), len(dataset.train_y), settings.train,
                ticket.rewind_epoch or 0)
            if not output.quiet:
                console.print(f"{trigger_per_batch} trigger images per batch: each seen about "
                              f"{views:.0f} times", highlight=False)
    ctx = init_from_env(dataset.device)
    try:
        with output.progress(silent=ctx is not None) as progress:
            task = progress.add_task("retrain", total=settings.train.epochs, info="")

            def on_epoch(s) -> None:
                trig_info = "" if s.trigger_accuracy is None else \
                    f" trigger {s.trigger_accuracy:.0f}%"
                test = "" if s.test_accuracy is None else f" test {s.test_accuracy:.2f}%"
                progress.update(task, completed=s.epoch, info=f"val {s.val_accuracy or 0:.2f}%"
                                + test + trig_info)

            result, trained = retrain_ticket(
                ticket, dataset, settings.train, on_epoch=on_epoch, trigger=trig,
                trigger_per_batch=trigger_per_batch or 1,
                trigger_sha256=trig_set.sha256() if trig_set else None, dist=ctx)
    finally:
        shutdown()
    if ctx is not None and not ctx.is_main:  # only rank 0 writes files and output
        return
    updated = None
    if receipt is not None and trig_set is not None:
        sha, n = trig_set.sha256(), len(trig_set.labels)
        updated = prior.with_trigger(sha, n, key) if prior is not None \
            else trigger_receipt(sha, n, key)
    with all_or_nothing(out, force=output.force):  # the model and its receipt, or neither
        if out is not None:
            save_ticket(trained, out, force=output.force)
        if updated is not None:
            save_receipt(updated, receipt, force=True)  # updated in place
    if trig_set is not None and not output.quiet:
        need = matches_needed(len(trig_set.labels), default_null_rate(ticket.num_classes))
        got = round((result.trigger_accuracy or 0) * len(trig_set.labels) / 100)
        n = len(trig_set.labels)
        if need is None:
            console.print(f"[yellow]warning:[/] a set of {n} trigger images cannot verify at "
                          "the default alpha even when every label is reproduced; use a "
                          "larger set", highlight=False)
        elif got < need:
            console.print(f"[yellow]warning:[/] the model reproduces {got} of the {n} trigger "
                          f"labels and `verify --trigger` needs {need}: train longer or raise "
                          "--trigger-per-batch", highlight=False)

    def text() -> None:
        trig_note = "" if result.trigger_accuracy is None else \
            f", trigger accuracy {result.trigger_accuracy:.1f}%"
        console.print(f"test accuracy {result.test_accuracy:.2f}% at best validation "
                      f"(epoch {result.best_epoch}){trig_note}, density "
                      f"{100 * ticket.density:.3f}%" + (f"; wrote {plain(out)}" if out else ""),
                      highlight=False)

    output.emit({"test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
                 "best_epoch": result.best_epoch, "trigger_accuracy": result.trigger_accuracy,
                 "trigger_sha256": trig_set.sha256() if trig_set else None,
                 "out": str(out) if out else None, "density": ticket.density,
                 "trigger_per_batch": trigger_per_batch if trig_set else None,
                 "seconds": result.seconds}, text)
