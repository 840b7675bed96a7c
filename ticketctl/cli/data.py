from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketctl.cli.common import DebugOpt, JsonOpt, QuietOpt, console, emit_json, handle_errors
from ticketctl.data import load_dataset


@handle_errors
def data(
    dataset: Annotated[str, typer.Argument(
        help="digits, cifar10, cifar100, imagefolder or synthetic.")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(
        help="Folder holding cifar-10-batches-py/, cifar-100-python/ or train/ and test/.")] = None,
    val_size: Annotated[Optional[int], typer.Option(
        help="Images held out of training for validation (default: per dataset).")] = None,
    split_seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check that a dataset loads from its folder and show its splits."""
    ds = load_dataset(dataset, data_dir, val_size=val_size, split_seed=split_seed,
                      synthetic_size=5000)
    info = ds.info()
    if json_out:
        emit_json(info)
    elif not quiet:
        table = Table(title=f"{ds.name}: {ds.num_classes} classes, input {ds.input_shape}")
        for col in ("split", "images"):
            table.add_column(col)
        for split, y in (("train", ds.train_y), ("val", ds.val_y), ("test", ds.test_y)):
            table.add_row(split, f"{len(y):,}")
        console.print(table)
