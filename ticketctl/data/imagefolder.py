"""Any RGB image dataset laid out as ``<data_dir>/{train,test}/<class>/<image>``.

Classes are the sorted sub-folder names of ``train/``; ``test/`` must have the same ones.
Files ending in .png/.jpg/.jpeg/.bmp/.webp (any case) are read with pillow and converted to RGB,
each bounded in size before it is decoded (`images.py`); other files are ignored. All images
must share one size, since the dataset is kept as a single tensor (resize them beforehand).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ticketctl.data.images import IMAGE_SUFFIXES, read_rgb
from ticketctl.data.splits import RawSplits, default_val_size
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


def _read_split(split_dir: Path, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read every image of one split into (N x 3 x H x W uint8, N int64 labels)."""
    files, labels = _list_images(split_dir, classes)
    if not files:
        suffixes = "/".join(sorted(s.lstrip(".") for s in IMAGE_SUFFIXES))
        raise TicketctlError(f"no images ({suffixes}) found under {split_dir}/<class>/")
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # pillow decodes without the GIL
        arrays = list(pool.map(read_rgb, files))
    first_shape = arrays[0].shape
    for path, array in zip(files, arrays, strict=True):
        if array.shape != first_shape:
            raise TicketctlError(
                f"all images must have one size: {path} is {array.shape[1]}x{array.shape[0]} "
                f"but {files[0]} is {first_shape[1]}x{first_shape[0]} (width x height); "
                "resize them first"
            )
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def load(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int
) -> RawSplits:
    """Read ``data_dir/train`` and ``data_dir/test``; per-channel stats come from train."""
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
    train_x, train_y = _read_split(data_dir / "train", classes)
    test_x, test_y = _read_split(data_dir / "test", classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise TicketctlError(
            f"train images are {train_x.shape[3]}x{train_x.shape[2]} but test images are "
            f"{test_x.shape[3]}x{test_x.shape[2]}; all images must have one size"
        )
    return RawSplits(
        class_names=classes,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        scale=255.0,
        augment="crop_flip",
        default_val_size=default_val_size(len(train_y)),
    )
