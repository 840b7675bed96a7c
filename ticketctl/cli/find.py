from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.artifacts import save_ticket
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
from ticketctl.cli.render import ProgressEvents, rounds_table
from ticketctl.device import resolve_device
from ticketctl.distributed import init_from_env, shutdown
from ticketctl.plots import plot_search
from ticketctl.prune import default_run_dir, find_ticket, resolve_settings

P_SEARCH = "Search"


@handle_errors
def find(
    out: Annotated[Path, typer.Option("--out", "-o", help="The ticket: rewind weights + mask.")],
    trained: Annotated[Optional[Path], typer.Option(
        help="Also write the trained sparse model here.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        help="demo (digits, CPU), fast (short GPU schedule) or paper (182 epochs). "
             "Default: demo on digits, paper otherwise.")] = None,
    arch: o.Arch = None,
    dataset: o.DatasetOpt = None,
    data_dir: o.DataDir = None,
    val_size: o.ValSize = None,
    split_seed: o.SplitSeed = 0,
    rates: Annotated[Optional[str], typer.Option(
        help="Decreasing pruning rates of the extreme search [0.2,0.1,0.05,0.01].",
        rich_help_panel=P_SEARCH)] = None,
    tolerance: Annotated[Optional[float], typer.Option(
        help="Accuracy points below dense a ticket may lose [1.0].",
        rich_help_panel=P_SEARCH)] = None,
    rewind_epoch: Annotated[Optional[int], typer.Option(
        help="Rewind to the weights after this epoch (0 = initialisation) [3].",
        rich_help_panel=P_SEARCH)] = None,
    rounds: Annotated[Optional[int], typer.Option(
        help="Fixed-rate IMP: this many rounds at --rate (no search).",
        rich_help_panel=P_SEARCH)] = None,
    rate: Annotated[Optional[float], typer.Option(
        help="The rate of fixed-rate IMP.", rich_help_panel=P_SEARCH)] = None,
    scope: Annotated[str, typer.Option(help="global or layer.",
                                       rich_help_panel=P_SEARCH)] = "global",
    trials: Annotated[int, typer.Option(
        help="Accept a round on the mean test accuracy of this many retrainings.",
        rich_help_panel=P_SEARCH)] = 1,
    pack: o.Pack = None,
    nproc: o.Nproc = 1,
    nnodes: o.Nnodes = 1,
    rdzv_endpoint: o.RdzvEndpoint = None,
    dist_timeout: o.DistTimeout = 3600.0,
    max_rounds: Annotated[int, typer.Option(
        help="Stop after this many rounds (0: train the dense model only).",
                                            rich_help_panel=P_SEARCH)] = 200,
    prune_linear: Annotated[bool, typer.Option(help="Prune linear layers too.",
                                               rich_help_panel=P_SEARCH)] = False,
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
    run_dir: Annotated[Optional[Path], typer.Option(
        help="Run folder (default: runs/find-<arch>-<dataset>-<settings hash>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Write a PNG of accuracy against density.")] = None,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    force: ForceOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Find a ticket: dense training, then IMP with rewinding and the extreme-ticket search."""
    search = dict(rates=o.parse_floats(rates, "--rates"), tolerance=tolerance,
                  rewind_epoch=rewind_epoch, scope=scope, trials=trials, max_rounds=max_rounds,
                  prune_linear=prune_linear)
    if rounds is not None or rate is not None:
        search.update(mode="fixed", rounds=rounds, rates=[rate] if rate is not None else [0.2])
    settings = resolve_settings(
        preset, arch=arch, dataset=dataset, data_dir=str(data_dir) if data_dir else None,
        val_size=val_size, split_seed=split_seed, search=search,
        train=o.train_overrides(epochs, batch_size, lr, momentum, weight_decay, nesterov,
                                schedule, milestones, warmup_epochs, seed, no_compile, no_graph,
                                no_bf16, no_channels_last))
    settings.validate()
    for path in (out, trained, plot):  # fail now, not after an hour of training
        if path is not None:
            check_output_path(path, force)
    folder = run_dir or default_run_dir(settings)
    if launch_ranks(nproc, nnodes, rdzv_endpoint, dist_timeout):
        return
    ctx = init_from_env(resolve_device(device))
    if ctx is not None and not ctx.is_main:  # only rank 0 writes files and output
        try:
            find_ticket(settings, folder, resume=resume, force=force, device=device, dist=ctx)
        finally:
            shutdown()
        return
    try:
        with progress_bar(quiet or json_out) as progress:
            result = find_ticket(settings, folder, resume=resume, force=force, device=device,
                                 events=ProgressEvents(progress, not quiet), pack=pack,
                                 dist=ctx)
    finally:
        shutdown()
    save_ticket(result.ticket, out, force=force)
    if trained:
        save_ticket(result.trained, trained, force=force)
    if plot:
        plot_search(result.rounds, result.dense_accuracy, plot, force=force,
                    tolerance=settings.search.tolerance if settings.search.mode == "extreme"
                    else None,
                    title=f"{settings.arch} on {settings.dataset}: extreme-ticket search")
    if json_out:
        emit_json({**result.summary(), "ticket": str(out),
                   "trained": str(trained) if trained else None,
                   "plot": str(plot) if plot else None, "settings": settings.to_dict()})
    elif not quiet:
        console.print(rounds_table(result.rounds, result.dense_accuracy, result.ticket_accuracy,
                                   result.density))
        spec = ", ".join(f"{k}: {v}" for k, v in result.spec.items())
        console.print(f"pruning specification (accepted rounds per rate): {spec}; "
                      f"{result.seconds:.1f} s; run folder {result.run_dir}", highlight=False)
        console.print(f"wrote {out}" + (f" and {trained}" if trained else ""), highlight=False)
