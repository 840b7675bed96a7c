"""`ticketctl data`: check that a dataset loads."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ticketctl.cli.common import console, plain
from ticketctl.cli.options import Output, Split, Streaming, command
from ticketctl.data import load_dataset


@command
def data(
    *,
    dataset: Annotated[str, typer.Argument(
        help="digits, cifar10, cifar100, imagefolder or synthetic.")] = "digits",
    data_dir: Annotated[Optional[Path], typer.Option(
        help="Folder holding cifar-10-batches-py/, cifar-100-python/ or train/ and test/.")] = None,
    split: Split,
    streaming: Streaming,
    output: Output,
) -> None:
    """Check that a dataset loads from its folder and show its splits.

    An image folder that streams is listed and its statistics measured, not decoded whole."""
    ds = load_dataset(dataset, data_dir, val_size=split.val_size,
                      split_seed=split.split_seed or 0, synthetic_size=5000,
                      stream=streaming.stream, image_size=streaming.image_size)

    def text() -> None:
        how = ", streamed from its files" if ds.streamed else ""
        table = Table(title=f"{plain(ds.name)}: {ds.num_classes} classes, input "
                            f"{ds.input_shape}{how}")
        for col in ("split", "images"):
            table.add_column(col, overflow="fold")
        for name, y in (("train", ds.train_y), ("val", ds.val_y), ("test", ds.test_y)):
            table.add_row(name, f"{len(y):,}")
        console.print(table)

    output.emit(ds.info(), text)
