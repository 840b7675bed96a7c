"""`ticketctl retrain`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import (
    Compute,
    DataOptions,
    Distributed,
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
from ticketctl.prune import resolve_settings
from ticketctl.train.retrain import retrain_ticket


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
    trigger_per_batch: Annotated[int, typer.Option(
        help="Trigger images per batch (the paper: 1).")] = 1,
    receipt: Annotated[Optional[Path], typer.Option(
        help="Commit the trigger set's SHA-256 to this receipt (updated in place, or new).")
    ] = None,
    signing_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.key to sign the receipt.")] = None,
    dist: Distributed,
    output: Output,
    compute: Compute,
) -> None:
    """Train a ticket from its rewind weights under its mask; report test accuracy."""
    output.check(out)
    if receipt is not None and trigger is None:
        raise TicketctlError("--receipt records a trigger set: pass --trigger too")
    if dist.wanted and trigger is not None:
        raise TicketctlError("--trigger does not run distributed yet: drop --nproc")
    if dist.launched():
        return
    ticket = load_ticket(ticket_path)
    settings = resolve_settings(
        training.preset, arch=ticket.arch,
        dataset=data.dataset or (ticket.dataset or {}).get("name"),
        train=training.overrides())
    settings.train.validate()
    dataset = load_recorded_dataset(ticket.dataset or {}, data.dataset, data.data_dir,
                                    device=resolve_device(compute.device),
                                    val_size=split.val_size, split_seed=split.split_seed)
    trig, trig_set = None, None
    if trigger is not None:
        trig_set = load_trigger_set(trigger)
        trig_set.check_classes(ticket.num_classes)
        trig = (trig_set.tensor(dataset.input_shape, dataset.mean, dataset.std),
                torch.from_numpy(trig_set.labels))
    ctx = init_from_env(dataset.train_x.device)
    try:
        with output.progress(silent=ctx is not None) as progress:
            task = progress.add_task("retrain", total=settings.train.epochs, info="")

            def on_epoch(s) -> None:
                trig_info = "" if s.trigger_accuracy is None else \
                    f" trigger {s.trigger_accuracy:.0f}%"
                progress.update(task, completed=s.epoch, info=f"val {s.val_accuracy or 0:.2f}%"
                                f" test {s.test_accuracy:.2f}%" + trig_info)

            result, trained = retrain_ticket(
                ticket, dataset, settings.train, on_epoch=on_epoch, trigger=trig,
                trigger_per_batch=trigger_per_batch,
                trigger_sha256=trig_set.sha256() if trig_set else None, dist=ctx)
    finally:
        shutdown()
    if ctx is not None and not ctx.is_main:  # only rank 0 writes files and output
        return
    if out is not None:
        save_ticket(trained, out, force=output.force)
    if receipt is not None and trig_set is not None:
        key = load_private_key(signing_key) if signing_key else None
        sha, n = trig_set.sha256(), len(trig_set.labels)
        updated = load_receipt(receipt).with_trigger(sha, n, key) if receipt.exists() \
            else trigger_receipt(sha, n, key)
        save_receipt(updated, receipt, force=True)

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
                 "seconds": result.seconds}, text)
