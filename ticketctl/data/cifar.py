"""CIFAR-10 and CIFAR-100 from the standard "python version" folders.

CIFAR-10:  ``<data_dir>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``
CIFAR-100: ``<data_dir>/cifar-100-python/{train, test, meta}``

``data_dir`` may also be the ``cifar-10-batches-py`` / ``cifar-100-python`` folder itself.
The files are pickles; they are read with ``safe_pickle`` so a tampered file cannot run code.
Both python-3 pickles (str keys) and the original python-2 release (bytes keys) are accepted.
Normalisation uses fixed, widely used per-channel constants (see ``CIFAR10_STATS``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketctl.data.safe_pickle import safe_load
from ticketctl.data.splits import RawSplits
from ticketctl.errors import TicketctlError

# Per-channel mean and (population) std of the 50,000 original training images, [0, 1] scale.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
CIFAR_VAL_SIZE = 5000  # the paper's 45k/5k train/validation split

_CIFAR10_DIR = "cifar-10-batches-py"
_CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR10_FILES = [*_CIFAR10_TRAIN, "test_batch", "batches.meta"]
_CIFAR100_DIR = "cifar-100-python"
_CIFAR100_FILES = ["train", "test", "meta"]


def _find_folder(data_dir: Path, folder: str, files: list[str], hint: str) -> Path:
    """Return the folder holding ``files``: ``data_dir/folder`` or ``data_dir`` itself."""
    candidates = [data_dir / folder, data_dir]
    for candidate in candidates:
        if all((candidate / f).is_file() for f in files):
            return candidate
    if not data_dir.is_dir():
        raise TicketctlError(f"data folder {data_dir} does not exist; {hint}")
    where = data_dir if data_dir.name == folder else data_dir / folder
    missing = [f for f in files if not (where / f).is_file()]
    raise TicketctlError(
        f"CIFAR files not found: expected folder {where} with {', '.join(files)} "
        f"(missing: {', '.join(missing)}); {hint}"
    )


def _get(record: Any, key: str, source: Path) -> Any:
    """Look ``key`` up in an unpickled dict whose keys may be str (py3) or bytes (py2)."""
    if isinstance(record, dict):
        for k in (key, key.encode()):
            if k in record:
                return record[k]
    raise TicketctlError(f"{source} has no '{key}' entry; is it a CIFAR python-version file?")


def _names(values: Any, source: Path) -> list[str]:
    if not isinstance(values, (list, tuple)):
        raise TicketctlError(f"{source}: class names are not a list")
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Read one batch file into (N x 3 x 32 x 32 uint8 images, N int64 labels)."""
    record = safe_load(path)
    data = np.asarray(_get(record, "data", path))
    labels = np.asarray(_get(record, label_key, path))
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise TicketctlError(f"{path}: 'data' has shape {data.shape}, expected N x 3072")
    if data.dtype != np.uint8:
        if (
            not np.issubdtype(data.dtype, np.integer)
            or data.min(initial=0) < 0
            or (data.max(initial=0) > 255)
        ):
            raise TicketctlError(f"{path}: 'data' must hold uint8 pixel values (got {data.dtype})")
        data = data.astype(np.uint8)
    if labels.shape != (data.shape[0],):
        raise TicketctlError(
            f"{path}: {labels.shape[0] if labels.ndim else 0} labels for {data.shape[0]} images"
        )
    if not np.issubdtype(labels.dtype, np.integer) or (
        labels.size and (labels.min() < 0 or labels.max() >= num_classes)
    ):
        raise TicketctlError(f"{path}: labels must be integers in 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _assemble(
    train: list[tuple[np.ndarray, np.ndarray]],
    test: tuple[np.ndarray, np.ndarray],
    class_names: list[str],
    stats: tuple[tuple[float, ...], tuple[float, ...]],
) -> RawSplits:
    train_x = np.concatenate([b[0] for b in train])
    train_y = np.concatenate([b[1] for b in train])
    return RawSplits(
        class_names=class_names,
        train_x=torch.from_numpy(train_x),
        train_y=torch.from_numpy(train_y),
        test_x=torch.from_numpy(np.ascontiguousarray(test[0])),
        test_y=torch.from_numpy(test[1]),
        scale=255.0,
        augment="crop_flip",
        default_val_size=CIFAR_VAL_SIZE,
        fixed_stats=stats,
    )


def load_cifar10(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int
) -> RawSplits:
    """Read CIFAR-10 (50,000 train + 10,000 test 32x32 RGB images, 10 classes)."""
    if data_dir is None:
        raise TicketctlError("cifar10 needs its data folder: pass --data-dir DIR")
    hint = (
        "create it with `python ../shared/data/make_cifar10.py OUTDIR` and pass --data-dir OUTDIR,"
        " or unpack the official CIFAR-10 python-version archive (cifar-10-python.tar.gz) there"
    )
    root = _find_folder(data_dir, _CIFAR10_DIR, _CIFAR10_FILES, hint)
    names = _names(
        _get(safe_load(root / "batches.meta"), "label_names", root / "batches.meta"),
        root / "batches.meta",
    )
    train = [_read_batch(root / f, "labels", len(names)) for f in _CIFAR10_TRAIN]
    test = _read_batch(root / "test_batch", "labels", len(names))
    return _assemble(train, test, names, CIFAR10_STATS)


def load_cifar100(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int
) -> RawSplits:
    """Read CIFAR-100 with its 100 fine labels (50,000 train + 10,000 test images)."""
    if data_dir is None:
        raise TicketctlError("cifar100 needs its data folder: pass --data-dir DIR")
    hint = "unpack the official CIFAR-100 python-version archive (cifar-100-python.tar.gz) there"
    root = _find_folder(data_dir, _CIFAR100_DIR, _CIFAR100_FILES, hint)
    names = _names(_get(safe_load(root / "meta"), "fine_label_names", root / "meta"), root / "meta")
    train = [_read_batch(root / "train", "fine_labels", len(names))]
    test = _read_batch(root / "test", "fine_labels", len(names))
    return _assemble(train, test, names, CIFAR100_STATS)
