from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

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
from ticketctl.cli.render import ticket_table
from ticketctl.demo import DEMO_TRAIN, default_out_dir, run_demo


@handle_errors
def demo(
    out_dir: Annotated[Optional[Path], typer.Option(
        help="Folder for the demo's files (default: a new runs/demo-<time>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Run the pipeline on the embedded digits dataset on CPU (seconds)."""
    out = out_dir or default_out_dir()
    with progress_bar(quiet or json_out) as progress:
        task = progress.add_task("dense training", total=DEMO_TRAIN.epochs, info="")

        def on_epoch(stage: str, s) -> None:
            progress.update(task, completed=s.epoch,
                            info=f"test {s.test_accuracy:.1f}% val {s.val_accuracy or 0:.1f}%")

        result = run_demo(out, force=force, device=device, on_epoch=on_epoch, seed=seed)
    if json_out:
        emit_json(result)
        return
    if not quiet:
        console.print(f"dense digits CNN: {result['dense_accuracy']:.2f}% test accuracy; "
                      f"after 50% magnitude pruning: {result['pruned_accuracy']:.2f}%",
                      highlight=False)
        ticket_table(result["inspect"])
        console.print(f"files in {result['out_dir']} ({result['seconds']:.1f} s)",
                      highlight=False)
