"""`ticketctl find`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import save_ticket
from ticketctl.artifacts.io import all_or_nothing
from ticketctl.cli.common import console, plain
from ticketctl.cli.options import (
    Architecture,
    Compute,
    DataOptions,
    Devices,
    Distributed,
    Output,
    Pack,
    Split,
    Training,
    command,
    group,
    option,
    parse_floats,
)
from ticketctl.cli.render import ProgressEvents, rounds_table
from ticketctl.device import resolve_device
from ticketctl.distributed import init_from_env, shutdown
from ticketctl.errors import TicketctlError
from ticketctl.plots import plot_search, search_title
from ticketctl.prune import Scope, SearchOverrides, default_run_dir, find_ticket, resolve_settings
from ticketctl.prune.rundir import RESULT

P_SEARCH = "Search"


@group(panel=P_SEARCH)
class Search:
    """The extreme-ticket search, or fixed-rate IMP with --rounds and --rate."""

    rates: Optional[str] = option(
        help="Decreasing pruning rates of the extreme search [0.2,0.1,0.05,0.01].")
    tolerance: Optional[float] = option(help="Accuracy points below dense a ticket may lose [1.0].")
    rewind_epoch: Optional[int] = option(
        help="Rewind to the weights after this epoch (0 = initialisation) [3].")
    rounds: Optional[int] = option(help="Fixed-rate IMP: this many rounds at --rate (no search).")
    rate: Optional[float] = option(help="The rate of fixed-rate IMP.")
    scope: Scope = option(default=Scope.GLOBAL, help="Rank weights globally or per layer.")
    trials: int = option(
        default=1, help="Accept a round on the mean test accuracy of this many retrainings.")
    max_rounds: int = option(
        default=200, help="Stop after this many rounds (0: train the dense model only).")
    prune_linear: bool = option(default=False, help="Prune linear layers too.")
    prunable: Optional[str] = option(
        help="Prune the weights whose names this regular expression matches (re.search), "
             "instead of every convolution but the first.")

    def overrides(self) -> SearchOverrides:
        fixed = self.rounds is not None or self.rate is not None
        return SearchOverrides(
            rates=([self.rate if self.rate is not None else 0.2] if fixed
                   else parse_floats(self.rates, "--rates")),
            tolerance=self.tolerance, rewind_epoch=self.rewind_epoch,
            mode="fixed" if fixed else None, rounds=self.rounds if fixed else None,
            scope=self.scope.value, trials=self.trials, max_rounds=self.max_rounds,
            prune_linear=self.prune_linear)


@command
def find(
    *,
    out: Annotated[Path, typer.Option("--out", "-o", help="The ticket: rewind weights + mask.")],
    trained: Annotated[Optional[Path], typer.Option(
        help="Also write the trained sparse model here.")] = None,
    network: Architecture,
    data: DataOptions,
    split: Split,
    search: Search,
    training: Training,
    pack: Pack = None,
    devices: Devices = None,
    dist: Distributed,
    run_dir: Annotated[Optional[Path], typer.Option(
        help="Run folder (default: runs/find-<arch>-<dataset>-<settings hash>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir.")] = False,
    checkpoint_every: Annotated[float, typer.Option(
        help="Save the training in progress to the run folder at most this often, in "
             "seconds (and after each training); 0 saves after every epoch. A kill loses "
             "at most this much training.")] = 60.0,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write a PNG of accuracy against density.")] = None,
    output: Output,
    compute: Compute,
) -> None:
    """Find a ticket: dense training, then IMP with rewinding and the extreme-ticket search."""
    settings = resolve_settings(
        training.preset, arch=network.name, dataset=data.dataset,
        data_dir=str(data.data_dir) if data.data_dir else None, val_size=split.val_size,
        split_seed=split.split_seed, search=search.overrides(),
        train=dist.train_overrides(training.overrides()),
        stream=data.streaming.stream, image_size=data.streaming.image_size)
    settings.arch_args, settings.prunable = network.args, search.prunable
    settings.validate()
    output.check(out, trained, plot)  # fail now, not after an hour of training
    folder = run_dir or default_run_dir(settings)
    finished = resume and (folder / RESULT).exists()
    if not output.quiet and not output.json_out:
        if not finished and training.preset is None and training.epochs is None and \
                settings.dataset != "digits" and resolve_device(compute.device).type == "cpu":
            console.print(f"[yellow]warning:[/] with no --preset, {plain(settings.dataset)} "
                          f"uses the paper's schedule, {settings.train.epochs} epochs for "
                          "every training, which takes days on a CPU; pass --preset fast or "
                          "--epochs N", highlight=False)
    if devices is not None and dist.nproc > 1:  # before torchrun starts anything
        raise TicketctlError("--devices spreads a round's trials over devices from one "
                             "process; it cannot be combined with --nproc")
    if dist.launched():
        return
    ctx = init_from_env(resolve_device(compute.device))
    if ctx is not None and not ctx.is_main:  # only rank 0 writes files and output
        try:
            find_ticket(settings, folder, resume=resume, force=output.force,
                        device=compute.device, dist=ctx, checkpoint_seconds=checkpoint_every)
        finally:
            shutdown()
        return
    try:
        with output.progress() as progress:
            result = find_ticket(settings, folder, resume=resume, force=output.force,
                                 device=compute.device,
                                 events=ProgressEvents(progress, not output.quiet), pack=pack,
                                 dist=ctx, checkpoint_seconds=checkpoint_every,
                                 devices=devices)
    finally:
        shutdown()
    with all_or_nothing(out, trained, plot, force=output.force):
        save_ticket(result.ticket, out, force=output.force)
        if trained:
            save_ticket(result.trained, trained, force=output.force)
        if plot:
            plot_search(result.rounds, result.dense_accuracy, plot, force=output.force,
                        tolerance=settings.search.tolerance
                        if settings.search.mode == "extreme" else None,
                        title=search_title(settings.arch, settings.dataset, settings.search))

    def text() -> None:
        if finished:
            console.print(f"note: the run in {plain(folder)} had finished; this is its result",
                          highlight=False)
        console.print(rounds_table(result.rounds, result.dense_accuracy, result.ticket_accuracy,
                                   result.density))
        spec = ", ".join(f"{k}: {v}" for k, v in result.spec.items())
        total = result.search_seconds  # more than this process's time when it resumed
        over = f" (its trainings over every run of the folder: {total:.1f} s)" \
            if total is not None and total > result.seconds + 1 else ""
        console.print(f"pruning specification (accepted rounds per rate): {spec}; "
                      f"{result.seconds:.1f} s{over}; run folder {plain(result.run_dir)}",
                      highlight=False)
        console.print(f"wrote {plain(out)}" + (f" and {plain(trained)}" if trained else ""),
                      highlight=False)

    output.emit({**result.summary(), "ticket": str(out),
                 "trained": str(trained) if trained else None,
                 "plot": str(plot) if plot else None, "settings": settings.to_dict()}, text)
