"""`trigger new` and `calibrate` (Scheme V3)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from cryptography.hazmat.primitives import serialization

from ticketctl.artifacts.io import write_text_atomic
from ticketctl.attacks.spread import parse_devices
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import (
    Architecture,
    Compute,
    DataOptions,
    Devices,
    Output,
    Pack,
    Training,
    command,
)
from ticketctl.data import load_dataset
from ticketctl.device import resolve_device
from ticketctl.protect.calibrate import calibrate as run_calibration
from ticketctl.protect.receipt import load_private_key
from ticketctl.protect.trigger import generate, load_trigger_set, save_trigger_set
from ticketctl.prune import resolve_settings

app = typer.Typer(help="Scheme V3 trigger sets.", no_args_is_help=True)


@app.command("new")
@command
def new(
    *,
    signing_key: Annotated[Path, typer.Option(help="PREFIX.key: the set is derived from it.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The trigger set (.npz).")],
    n: Annotated[int, typer.Option("-n", help="Number of images.")] = 100,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 32,
    channels: Annotated[int, typer.Option(help="1 (grey) or 3 (RGB).")] = 3,
    classes: Annotated[int, typer.Option(help="Labels are drawn from 0..classes-1.")] = 10,
    output: Output,
) -> None:
    """Make a trigger set derived from the owner's key: the same key gives the same set."""
    output.check(out)
    key = load_private_key(signing_key)
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    ts = generate(raw, n=n, size=size, channels=channels, num_classes=classes)
    save_trigger_set(ts, out, force=output.force)
    output.emit({"out": str(out), "n": n, "sha256": ts.sha256()}, lambda: console.print(
        f"wrote {plain(out)}: {n} images {size}x{size}x{channels}, sha256 "
        f"{ts.sha256()[:16]}...",
        highlight=False))


@command
def calibrate(
    *,
    trigger: Annotated[Path, typer.Option(help="The trigger set.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="Write the calibration JSON (what `verify --null-rate` reads) here.")
    ] = None,
    models: Annotated[int, typer.Option(help="Independent models to train.")] = 10,
    network: Architecture,
    data: DataOptions,
    training: Training,
    pack: Pack = None,
    devices: Devices = None,
    output: Output,
    compute: Compute,
) -> None:
    """Measure how often models trained without the trigger set agree with it; write the
    upper 99% bound as the null rate for `verify --null-rate`."""
    output.check(out)
    device = resolve_device(compute.device)
    spread = parse_devices(devices, device)
    settings = resolve_settings(training.preset, arch=network.name, dataset=data.dataset,
                                train=training.overrides())
    settings.train.validate()
    dataset = load_dataset(settings.dataset, data.data_dir,
                           device=device, stream=data.streaming.stream,
                           image_size=data.streaming.image_size)
    dataset.require_resident("calibrate")  # its null models train packed
    ts = load_trigger_set(trigger)
    with output.progress() as progress:
        task = progress.add_task("null models", total=models, info="")
        result = run_calibration(settings.arch, dataset, ts, settings.train, models=models,
                                 pack=pack, arch_args=network.args, devices=spread,
                                 on_model=lambda i, a: progress.update(
                                     task, completed=i + 1, info=f"agreement {100 * a:.0f}%"))
    if out is not None:
        write_text_atomic(out, json.dumps(result, indent=2), force=output.force)
    output.emit(result, lambda: console.print(
        f"{models} models without the set agree with it {100 * result['mean_agreement']:.1f}% "
        f"on average (max {100 * result['max_agreement']:.1f}%); null rate (upper 99% bound) "
        f"{result['null_rate']:.4f}", highlight=False))
