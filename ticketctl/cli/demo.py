"""`ticketctl demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ticketctl.cli.common import console, plain
from ticketctl.cli.options import Output, command
from ticketctl.cli.render import ProgressEvents, attacks_table, rounds_table, ticket_table
from ticketctl.demo import default_out_dir, run_demo
from ticketctl.device import Device, configure_threads
from ticketctl.prune import Round


@command
def demo(
    *,
    out_dir: Annotated[Optional[Path], typer.Option(
        help="Folder for the demo's files (default: a new runs/demo-<time>).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for every random choice.")] = 0,
    device: Annotated[Device, typer.Option(
        "--device", help="Where to compute (the demo is sized for a CPU).")] = Device.CPU,
    threads: Annotated[int, typer.Option(
        min=1, help="CPU threads per operation: the demo's small network runs fastest on "
                    "one.")] = 1,
    output: Output,
) -> None:
    """Run the pipeline on the embedded digits dataset on CPU (about 35 s on 2 cores)."""
    configure_threads(threads)
    out = out_dir or default_out_dir()
    with output.progress() as progress:
        result = run_demo(out, force=output.force, device=device, seed=seed,
                          events=ProgressEvents(progress, not (output.quiet or output.json_out)))
    output.emit(result, lambda: _print_demo(result))


def _print_demo(result: dict[str, Any]) -> None:
    f = result["find"]
    console.print(rounds_table([Round.from_dict(r) for r in f["rounds"]], f["dense_accuracy"],
                               f["ticket_accuracy"], f["density"]))
    ticket_table(result["inspect"])
    v1 = result["v1"]
    console.print(
        f"Scheme V1: key of {v1['key_weights']:,} weights ({v1['score']}, "
        f"{100 * v1['key_ratio']:g}%); merge identical: {v1['identical']}; retrained "
        f"without the key {v1['nokey_accuracy']:.2f}% vs {v1['original_accuracy']:.2f}% "
        "with it", highlight=False)
    v2 = result["v2"]
    console.print(
        f"Scheme V2: version-{v2['qr_version']} code in {v2['layer']} of the "
        f"{100 * v2['density']:.1f}% ticket; after {v2['attack']}: "
        f"{'verified' if v2['verified'] else 'NOT verified'}, message "
        f"{plain(repr(v2['message']))}, "
        f"bit match {100 * v2['bit_match']:.1f}%, p = {v2['p_value']:.2g}", highlight=False)
    v3 = result["v3"]
    console.print(
        f"Scheme V3: retrained with a key-derived trigger set: test "
        f"{v3['test_accuracy']:.2f}%, trigger {v3['trigger_accuracy']:.0f}%; black box "
        f"p = {v3['local']['trigger_p_value']:.2g}, through --predict-cmd p = "
        f"{v3['predict_cmd']['trigger_p_value']:.2g}: "
        f"{'verified' if v3['verified'] else 'NOT verified'}", highlight=False)
    console.print(attacks_table(result["attacks"]))
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())
    console.print(f"files in {plain(result['out_dir'])} ({result['seconds']:.1f} s: {stages}): "
                  + ", ".join(plain(Path(p).name) for p in result["files"]), highlight=False)
