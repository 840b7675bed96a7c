"""Any RGB image dataset laid out as ``<data_dir>/{train,test}/<class>/<image>``.

Classes are the sorted sub-folder names of ``train/``; ``test/`` must have the same ones.
Files ending in .png/.jpg/.jpeg/.bmp/.webp (any case) are read with pillow and converted to RGB,
each bounded in size before it is decoded (`images.py`); other files are ignored. All images
must share one size to be kept as a single tensor at their own size; with ``image_size`` each is
resized and centre-cropped to it as streamed evaluation does (`transforms.read_eval`). Folders
that do not fit in memory, or hold images of mixed sizes, stream instead (`stream.py`).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ticketctl.data.images import IMAGE_SUFFIXES, image_size, read_rgb
from ticketctl.data.splits import RawSplits, default_val_size
from ticketctl.data.transforms import read_eval
from ticketctl.errors import TicketctlError


def _class_dirs(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise TicketctlError(
            f"image folder {split_dir} does not exist; expected "
            f"{split_dir.parent}/{{train,test}}/<class>/<images>"
        )
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not names:
        raise TicketctlError(
            f"{split_dir} has no class sub-folders; expected {split_dir}/<class>/<images>"
        )
    return names


def _list_images(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(
            p
            for p in (split_dir / name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        files += found
        labels += [label] * len(found)
    return files, labels


@dataclass(frozen=True)
class Listing:
    """The classes of an image folder and its files, in label then name order."""

    classes: list[str]
    train_files: list[Path]
    train_labels: list[int]
    test_files: list[Path]
    test_labels: list[int]


def scan(data_dir: Path | None) -> Listing:
    """List ``data_dir/train`` and ``data_dir/test`` (nothing is decoded)."""
    if data_dir is None:
        raise TicketctlError("imagefolder needs its data folder: pass --data-dir DIR")
    if not data_dir.is_dir():
        raise TicketctlError(f"data folder {data_dir} does not exist")
    classes = _class_dirs(data_dir / "train")
    test_classes = _class_dirs(data_dir / "test")
    if test_classes != classes:
        only_train = sorted(set(classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(classes))
        raise TicketctlError(
            f"train and test class folders differ under {data_dir}: only in train: "
            f"{only_train or 'none'}; only in test: {only_test or 'none'}"
        )
    for name in classes:
        if not _list_images(data_dir / "train", [name])[0]:
            raise TicketctlError(f"class folder {data_dir / 'train' / name} has no images")
    train = _list_images(data_dir / "train", classes)
    test = _list_images(data_dir / "test", classes)
    if not test[0]:
        suffixes = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise TicketctlError(f"no images ({suffixes}) found under {data_dir / 'test'}/<class>/")
    return Listing(classes, train[0], train[1], test[0], test[1])


def _workers() -> int:
    return min(8, os.cpu_count() or 1)


def image_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """Every file's (width, height) from its header, read on a few threads."""
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        return list(pool.map(image_size, files))


def mixed_sizes(files: list[Path], sizes: list[tuple[int, int]]) -> str | None:
    """None when every image has the first one's size, else which one differs, and how."""
    for path, size in zip(files, sizes, strict=True):
        if size != sizes[0]:
            return (f"{path} is {size[0]}x{size[1]} but {files[0]} is "
                    f"{sizes[0][0]}x{sizes[0][1]} (width x height)")
    return None


def _read_split(files: list[Path], labels: list[int],
                size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every image of one split into (N x 3 x H x W uint8, N int64 labels); with `size`
    each is resized and centre-cropped to size x size as streamed evaluation does."""
    read = read_rgb if size is None else functools.partial(read_eval, size=size)
    with ThreadPoolExecutor(max_workers=_workers()) as pool:  # pillow decodes without the GIL
        arrays = list(pool.map(read, files))
    if size is None:
        problem = mixed_sizes(files, [(a.shape[1], a.shape[0]) for a in arrays])
        if problem:
            raise TicketctlError(f"all images must have one size: {problem}; resize them first "
                                 "or pass --image-size N")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def load(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int,
    image_size: int | None = None, listing: Listing | None = None,
) -> RawSplits:
    """Read ``data_dir/train`` and ``data_dir/test`` into memory (at ``image_size`` when
    given); per-channel stats come from train."""
    listing = listing or scan(data_dir)
    train_x, train_y = _read_split(listing.train_files, listing.train_labels, image_size)
    test_x, test_y = _read_split(listing.test_files, listing.test_labels, image_size)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise TicketctlError(
            f"train images are {train_x.shape[3]}x{train_x.shape[2]} but test images are "
            f"{test_x.shape[3]}x{test_x.shape[2]}; all images must have one size"
        )
    return RawSplits(
        class_names=listing.classes,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        scale=255.0,
        augment="crop_flip",
        default_val_size=default_val_size(len(train_y)),
    )
