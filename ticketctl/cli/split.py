"""`ticketctl split` and `ticketctl merge` (Scheme V1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.artifacts.io import all_or_nothing
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import NetworkSource, OldSpelling, Output, command
from ticketctl.errors import TicketctlError
from ticketctl.protect import Score, merge_parts, split_ticket

SAMPLE_HINT = 5000  # source channels from which exact betweenness takes minutes on a CPU


@command
def split(
    *,
    ticket_path: Annotated[Path, typer.Argument(metavar="TICKET", help="The ticket to lock.")],
    score: Annotated[Score, typer.Option(help="How to rank the kept weights for the key.")],
    key_ratio: Annotated[float, typer.Option(
        help="Key size as a fraction of the ticket's kept weights, e.g. 0.1.")],
    key: Annotated[Path, typer.Option(
        "--key-mask", help="Write the secret key mask (the V1 key file) here."),
        OldSpelling("--key")],
    locked: Annotated[Path, typer.Option(help="Write the locked ticket (to distribute) here.")],
    seed: Annotated[int, typer.Option(help="Seed of random choices (ewp walks, random).")] = 0,
    walks: Annotated[int, typer.Option(help="ewp: number of random walks.")] = 10_000,
    pivots: Annotated[Optional[int], typer.Option(
        help="betweenness: sample this many source channels (default: exact).")] = None,
    network: NetworkSource,
    output: Output,
) -> None:
    """Scheme V1: split a ticket into a small secret key and the locked rest."""
    if key.resolve() == locked.resolve():
        raise TicketctlError("--key-mask and --locked must be different files")
    output.check(key, locked)
    ticket = load_ticket(ticket_path)
    options = {"walks": walks} if score == Score.EWP else {"pivots": pivots} \
        if score == Score.BETWEENNESS else {}
    channels = sum(int(m.shape[0]) for m in ticket.mask.values())  # the graph's, about
    if score == Score.BETWEENNESS and pivots is None and channels > SAMPLE_HINT \
            and not (output.quiet or output.json_out):
        console.print(f"exact betweenness from all {channels:,} channels; --pivots 256 "
                      "samples 256 of them instead", highlight=False)
    with output.progress() as progress:
        task: list[Any] = []  # made at the first report: only betweenness reports

        def on_progress(done: int, total: int) -> None:  # shown in percent of the work
            if not task:
                task.append(progress.add_task(f"{score.value} (% done)", total=100, info=""))
            progress.update(task[0], completed=round(100 * done / max(total, 1)))

        key_t, locked_t = split_ticket(ticket, score.value, key_ratio, seed=seed,
                                       on_progress=on_progress, **options)
    with all_or_nothing(key, locked, force=output.force):  # never a key without its lock
        save_ticket(key_t, key, force=output.force)
        save_ticket(locked_t, locked, force=output.force)
    result = {"key_ratio": key_ratio, "key_weights": key_t.mask.num_kept,
              "locked_weights": locked_t.mask.num_kept, "key": str(key), "locked": str(locked),
              "score": score.value, "seed": seed, "ticket_sha256": key_t.extra["parent_sha256"],
              "density_locked": locked_t.density}
    output.emit(result, lambda: console.print(
        f"key: {result['key_weights']:,} weights ({score}) -> {plain(key)}; locked: "
        f"{result['locked_weights']:,} weights -> {plain(locked)}", highlight=False))


@command
def merge(
    *,
    locked: Annotated[Path, typer.Argument(metavar="LOCKED", help="The locked ticket.")],
    key: Annotated[Path, typer.Argument(metavar="KEY", help="Its key.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the rebuilt ticket here.")],
    output: Output,
) -> None:
    """Join a locked ticket and its key back into the exact original ticket."""
    output.check(out)
    merged = merge_parts(load_ticket(locked), load_ticket(key))
    save_ticket(merged, out, force=output.force)
    output.emit({"out": str(out), "identical": True, "ticket_sha256": merged.tensors_sha256(),
                 "density": merged.density},
                lambda: console.print(f"wrote {plain(out)}: identical to the original ticket "
                                      f"(sha256 {merged.tensors_sha256()[:16]}...)",
                                      highlight=False))
