"""Dataset names -> loaders, and ``load_dataset``, which turns a loader's output into a Dataset.

Normalisation (``normalize=True``) subtracts a per-channel mean and divides by a per-channel std,
both on the [0, 1] pixel scale:

* cifar10 / cifar100: fixed, widely used constants of the original training sets
  (``cifar.CIFAR10_STATS`` / ``cifar.CIFAR100_STATS``), so every split and seed sees the same
  transform;
* digits, imagefolder, synthetic: computed from the training split after the validation
  images have been held out (population std; a zero std is replaced by 1).

``normalize=False`` keeps pixels on the raw [0, 1] scale and records mean 0 / std 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ticketctl.data import cifar, digits, imagefolder, synthetic
from ticketctl.data.dataset import Dataset
from ticketctl.data.splits import RawSplits, holdout_indices
from ticketctl.errors import TicketctlError

Loader = Callable[..., RawSplits]

DATASETS: dict[str, Loader] = {
    "digits": digits.load,
    "cifar10": cifar.load_cifar10,
    "cifar100": cifar.load_cifar100,
    "imagefolder": imagefolder.load,
    "synthetic": synthetic.load,
}
NEEDS_DATA_DIR = frozenset({"cifar10", "cifar100", "imagefolder"})


def _device(device: str | torch.device) -> torch.device:
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TicketctlError(f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise TicketctlError(f"device {device!r} asked for but CUDA is not available; use cpu")
    return resolved


def _to_unit(x: torch.Tensor, scale: float, device: torch.device) -> torch.Tensor:
    """Move to ``device`` (before widening, so uint8 travels) and scale to [0, 1] in torch's
    default float dtype (float32 unless a program, e.g. a float64 test, changes it)."""
    x = x.to(device).to(torch.get_default_dtype())
    return x.div_(scale) if scale != 1.0 else x


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int = 0,
    normalize: bool = True,
    synthetic_size: int = 50000,
) -> Dataset:
    """Load a dataset once into normalised tensors (torch's default float dtype) on ``device``.

    The validation split is held out of the training images by a permutation drawn from
    ``split_seed`` alone, so changing the training seed never changes it. ``val_size=None``
    picks the dataset's default: 5,000 for cifar10/100 (45k/5k), otherwise 10% of the
    training images.
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise TicketctlError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if key in NEEDS_DATA_DIR and data_dir is None:
        raise TicketctlError(f"dataset {key!r} needs its data folder: pass --data-dir DIR")
    if val_size is not None and val_size < 0:
        raise TicketctlError(f"val_size must be 0 or more (got {val_size})")
    dev = _device(device)
    folder = Path(data_dir).expanduser() if data_dir is not None else None

    raw = DATASETS[key](folder, split_seed=split_seed, device=dev, synthetic_size=synthetic_size)
    n_train = len(raw.train_y)
    k = raw.default_val_size if val_size is None else val_size
    if k >= n_train:
        raise TicketctlError(
            f"val_size {k} leaves no training images ({key} has {n_train} before the split); "
            f"pass a val_size below {n_train}"
        )
    kept, held = holdout_indices(n_train, k, split_seed)
    train_x = _to_unit(raw.train_x[kept.to(raw.train_x.device)], raw.scale, dev)
    val_x = _to_unit(raw.train_x[held.to(raw.train_x.device)], raw.scale, dev)
    test_x = _to_unit(raw.test_x, raw.scale, dev)
    train_y = raw.train_y[kept.to(raw.train_y.device)].to(dev, torch.int64)
    val_y = raw.train_y[held.to(raw.train_y.device)].to(dev, torch.int64)
    test_y = raw.test_y.to(dev, torch.int64)

    channels = train_x.shape[1]
    if not normalize:
        mean, std = (0.0,) * channels, (1.0,) * channels
    elif raw.fixed_stats is not None:
        mean, std = raw.fixed_stats
    else:
        std_t, mean_t = torch.std_mean(train_x.double(), dim=(0, 2, 3), correction=0)
        std_t = torch.where(std_t > 0, std_t, torch.ones_like(std_t))
        mean, std = tuple(mean_t.tolist()), tuple(std_t.tolist())
    if normalize:
        m = torch.tensor(mean, dtype=train_x.dtype, device=dev).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=train_x.dtype, device=dev).view(1, -1, 1, 1)
        for split in (train_x, val_x, test_x):
            split.sub_(m).div_(s)

    return Dataset(
        name=key,
        num_classes=len(raw.class_names),
        class_names=list(raw.class_names),
        input_shape=(int(train_x.shape[1]), int(train_x.shape[2]), int(train_x.shape[3])),
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        test_x=test_x,
        test_y=test_y,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        augment=raw.augment,
        val_size=k,
        split_seed=split_seed,
        data_dir=str(folder.resolve()) if folder is not None else None,
        normalized=normalize,
    )


def load_recorded_dataset(
    recorded: dict,
    name: str | None = None,
    data_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int | None = None,
) -> Dataset:
    """Load the dataset a ticket recorded (its metadata's `dataset`), unless told otherwise."""
    name = name or recorded.get("name") or "digits"
    same = name == recorded.get("name")
    folder = data_dir or (recorded.get("data_dir") if same else None)
    if val_size is None and same:
        val_size = recorded.get("val_size")
    if split_seed is None:
        split_seed = recorded.get("split_seed", 0) if same else 0
    return load_dataset(name, folder, device=device, val_size=val_size, split_seed=split_seed)
