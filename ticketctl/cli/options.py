"""Options shared by the commands that train, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ticketctl.errors import TicketctlError

P_TRAIN = "Training (override the preset)"
P_DATA = "Data"
P_CUDA = "CUDA speed-ups (on by default on a GPU)"

Arch = Annotated[Optional[str], typer.Option(
    help="resnet20, resnet18, resnet50, vgg16 or digits_cnn.", rich_help_panel=P_DATA)]
DatasetOpt = Annotated[Optional[str], typer.Option(
    "--dataset", help="digits, cifar10, cifar100, imagefolder or synthetic.",
    rich_help_panel=P_DATA)]
DataDir = Annotated[Optional[Path], typer.Option(
    help="Folder holding cifar-10-batches-py/, cifar-100-python/ or train/ and test/.",
    rich_help_panel=P_DATA)]
ValSize = Annotated[Optional[int], typer.Option(
    help="Training images held out for validation (default 5,000 on CIFAR).",
    rich_help_panel=P_DATA)]
SplitSeed = Annotated[int, typer.Option(help="Seed of the validation split.",
                                        rich_help_panel=P_DATA)]
Epochs = Annotated[Optional[int], typer.Option(help="Epochs per training.",
                                               rich_help_panel=P_TRAIN)]
BatchSize = Annotated[Optional[int], typer.Option(rich_help_panel=P_TRAIN)]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate.", rich_help_panel=P_TRAIN)]
Momentum = Annotated[Optional[float], typer.Option(rich_help_panel=P_TRAIN)]
WeightDecay = Annotated[Optional[float], typer.Option(rich_help_panel=P_TRAIN)]
Nesterov = Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov",
                                                  rich_help_panel=P_TRAIN, show_default=False)]
Schedule = Annotated[Optional[str], typer.Option(help="multistep or cosine.",
                                                 rich_help_panel=P_TRAIN)]
Milestones = Annotated[Optional[str], typer.Option(
    help="Epochs where multistep divides the rate by 10, e.g. 91,136.", rich_help_panel=P_TRAIN)]
Warmup = Annotated[Optional[int], typer.Option("--warmup-epochs", rich_help_panel=P_TRAIN)]
Seed = Annotated[int, typer.Option(help="Seed for every random choice.", rich_help_panel=P_TRAIN)]
NoCompile = Annotated[bool, typer.Option("--no-compile", help="Do not torch.compile.",
                                         rich_help_panel=P_CUDA)]
NoGraph = Annotated[bool, typer.Option("--no-graph", help="Do not capture CUDA graphs.",
                                       rich_help_panel=P_CUDA)]
NoBf16 = Annotated[bool, typer.Option("--no-bf16", help="Train in fp32.",
                                      rich_help_panel=P_CUDA)]
NoChannelsLast = Annotated[bool, typer.Option("--no-channels-last", rich_help_panel=P_CUDA)]


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TicketctlError(f"{what} must be comma-separated numbers, got {text!r}") from None


def parse_ints(text: str | None, what: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TicketctlError(f"{what} must be comma-separated integers, got {text!r}") from None


def train_overrides(epochs, batch_size, lr, momentum, weight_decay, nesterov, schedule,
                    milestones, warmup_epochs, seed, no_compile, no_graph, no_bf16,
                    no_channels_last) -> dict:
    return dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
                weight_decay=weight_decay, nesterov=nesterov, schedule=schedule,
                milestones=parse_ints(milestones, "--milestones"), warmup_epochs=warmup_epochs,
                seed=seed, compile=False if no_compile else None,
                cuda_graph=False if no_graph else None, bf16=False if no_bf16 else None,
                channels_last=False if no_channels_last else None)

Pack = Annotated[Optional[int], typer.Option(
    "--pack", help="Train this many independent models in one packed network (default: 8 "
    "on CUDA, 1 on CPU; 1 turns packing off).", rich_help_panel=P_CUDA)]

P_DIST = "Distributed"
Nproc = Annotated[int, typer.Option(
    help="Data-parallel processes on this host (torchrun; NCCL on GPUs, gloo on CPUs); "
         "--batch-size stays the global batch.", rich_help_panel=P_DIST)]
Nnodes = Annotated[int, typer.Option(help="Hosts taking part (each runs the command).",
                                     rich_help_panel=P_DIST)]
RdzvEndpoint = Annotated[Optional[str], typer.Option(
    help="HOST:PORT where the hosts meet (several hosts).", rich_help_panel=P_DIST)]
DistTimeout = Annotated[float, typer.Option(
    help="Seconds before a stuck distributed run is stopped (exit 2).", rich_help_panel=P_DIST)]
