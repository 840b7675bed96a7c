from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import check_output_path
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
    launch_ranks,
    progress_bar,
)
from ticketctl.data import load_recorded_dataset
from ticketctl.device import resolve_device
from ticketctl.distributed import init_from_env, shutdown
from ticketctl.errors import TicketctlError
from ticketctl.protect.receipt import add_trigger, load_private_key, load_receipt, save_receipt
from ticketctl.protect.trigger import load_trigger_set
from ticketctl.prune import resolve_settings
from ticketctl.train.retrain import retrain_ticket


@handle_errors
def retrain(
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="A ticket file.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o",
                                                help="Write the trained model here.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="Training schedule: demo, fast or paper (default: demo on digits, else paper)."
    )] = None,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    val_size: o.ValSize = None,
    split_seed: Annotated[Optional[int], typer.Option(
        help="Seed of the validation split (default: the ticket's).")] = None,
    epochs: o.Epochs = None,
    batch_size: o.BatchSize = None,
    lr: o.Lr = None,
    momentum: o.Momentum = None,
    weight_decay: o.WeightDecay = None,
    nesterov: o.Nesterov = None,
    schedule: o.Schedule = None,
    milestones: o.Milestones = None,
    warmup_epochs: o.Warmup = None,
    seed: o.Seed = 0,
    no_compile: o.NoCompile = False,
    no_graph: o.NoGraph = False,
    no_bf16: o.NoBf16 = False,
    no_channels_last: o.NoChannelsLast = False,
    trigger: Annotated[Optional[Path], typer.Option(
        help="Scheme V3: mix this trigger set (.npz or folder) into every batch.")] = None,
    trigger_per_batch: Annotated[int, typer.Option(
        help="Trigger images per batch (the paper: 1).")] = 1,
    receipt: Annotated[Optional[Path], typer.Option(
        help="Commit the trigger set's SHA-256 to this receipt (updated in place, or new).")
    ] = None,
    signing_key: Annotated[Optional[Path], typer.Option(
        help="PREFIX.key to sign the receipt.")] = None,
    nproc: o.Nproc = 1,
    nnodes: o.Nnodes = 1,
    rdzv_endpoint: o.RdzvEndpoint = None,
    dist_timeout: o.DistTimeout = 3600.0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Train a ticket from its rewind weights under its mask; report test accuracy."""
    if out is not None:
        check_output_path(out, force)
    if receipt is not None and trigger is None:
        raise TicketctlError("--receipt records a trigger set: pass --trigger too")
    if (nproc > 1 or nnodes > 1) and trigger is not None:
        raise TicketctlError("--trigger does not run distributed yet: drop --nproc")
    if launch_ranks(nproc, nnodes, rdzv_endpoint, dist_timeout):
        return
    ticket = load_ticket(ticket_path)
    settings = resolve_settings(
        preset, arch=ticket.arch, dataset=dataset or (ticket.dataset or {}).get("name"),
        train=o.train_overrides(epochs, batch_size, lr, momentum, weight_decay, nesterov,
                                schedule, milestones, warmup_epochs, seed, no_compile, no_graph,
                                no_bf16, no_channels_last))
    settings.train.validate()
    data = load_recorded_dataset(ticket.dataset or {}, dataset, data_dir,
                                 device=resolve_device(device), val_size=val_size,
                                 split_seed=split_seed)
    trig, trig_set = None, None
    if trigger is not None:
        trig_set = load_trigger_set(trigger)
        trig_set.check_classes(ticket.num_classes)
        trig = (trig_set.tensor(data.input_shape, data.mean, data.std),
                torch.from_numpy(trig_set.labels))
    ctx = init_from_env(data.train_x.device)
    try:
        with progress_bar(quiet or json_out or ctx is not None) as progress:
            task = progress.add_task("retrain", total=settings.train.epochs, info="")

            def on_epoch(s) -> None:
                trig_info = "" if s.trigger_accuracy is None else \
                    f" trigger {s.trigger_accuracy:.0f}%"
                progress.update(task, completed=s.epoch, info=f"val {s.val_accuracy or 0:.2f}%"
                                f" test {s.test_accuracy:.2f}%" + trig_info)

            result, trained = retrain_ticket(
                ticket, data, settings.train, on_epoch=on_epoch, trigger=trig,
                trigger_per_batch=trigger_per_batch,
                trigger_sha256=trig_set.sha256() if trig_set else None, dist=ctx)
    finally:
        shutdown()
    if ctx is not None and not ctx.is_main:  # only rank 0 writes files and output
        return
    if out is not None:
        save_ticket(trained, out, force=force)
    if receipt is not None and trig_set is not None:
        doc = load_receipt(receipt) if receipt.exists() else None
        key = load_private_key(signing_key) if signing_key else None
        save_receipt(add_trigger(doc, trig_set.sha256(), len(trig_set.labels), key), receipt,
                     force=True)
    if json_out:
        emit_json({"test_accuracy": result.test_accuracy, "val_accuracy": result.val_accuracy,
                   "best_epoch": result.best_epoch, "trigger_accuracy": result.trigger_accuracy,
                   "trigger_sha256": trig_set.sha256() if trig_set else None,
                   "out": str(out) if out else None, "density": ticket.density,
                   "seconds": result.seconds})
    elif not quiet:
        trig_note = "" if result.trigger_accuracy is None else \
            f", trigger accuracy {result.trigger_accuracy:.1f}%"
        console.print(f"test accuracy {result.test_accuracy:.2f}% at best validation "
                      f"(epoch {result.best_epoch}){trig_note}, density "
                      f"{100 * ticket.density:.3f}%" + (f"; wrote {out}" if out else ""),
                      highlight=False)
