"""Dataset names -> loaders, and ``load_dataset``, which turns a loader's output into a Dataset.

Normalisation (``normalize=True``) subtracts a per-channel mean and divides by a per-channel std,
both on the [0, 1] pixel scale:

* cifar10 / cifar100: fixed, widely used constants of the original training sets
  (``cifar.CIFAR10_STATS`` / ``cifar.CIFAR100_STATS``), so every split and seed sees the same
  transform;
* digits, imagefolder, synthetic: computed from the training split after the validation
  images have been held out (population std; a zero std is replaced by 1).

``normalize=False`` keeps pixels on the raw [0, 1] scale and records mean 0 / std 1.

An imagefolder that does not fit in memory, or holds images of mixed sizes, streams from its
files instead (``stream.StreamedDataset``; ``stream=True`` forces it, ``stream=False`` forbids
it): its statistics come from a fixed sample of its training images, and are recorded so a
later command can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ticketctl.data import cifar, digits, imagefolder, synthetic
from ticketctl.data.dataset import Dataset
from ticketctl.data.images import MAX_SIDE
from ticketctl.data.splits import RawSplits, default_val_size, holdout_indices
from ticketctl.data.stream import (
    BatchReader,
    StreamedDataset,
    StreamedSplit,
    as_files,
    fits_in_memory,
    measure_stats,
)
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
CAN_STREAM = frozenset({"imagefolder"})
Stats = tuple[tuple[float, ...], tuple[float, ...]]


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
    stream: bool | None = None,
    image_size: int | None = None,
    stats: Stats | None = None,
    reader: BatchReader | None = None,
) -> Dataset | StreamedDataset:
    """Load a dataset once into normalised tensors (torch's default float dtype) on ``device``,
    or, for an image folder that does not fit or mixes sizes, as a `StreamedDataset`.

    The validation split is held out of the training images by a permutation drawn from
    ``split_seed`` alone, so changing the training seed never changes it. ``val_size=None``
    picks the dataset's default: 5,000 for cifar10/100 (45k/5k), otherwise 10% of the
    training images. ``stream``: None chooses (`stream.fits_in_memory`), True streams, False
    keeps every image in memory. ``image_size``: the side images are trained and evaluated
    at (image folders; needed to stream images of mixed sizes). ``stats``: the (mean, std) of
    a streamed dataset as recorded earlier, instead of measuring them. ``reader``: the
    streamed dataset's decoding pool (default: a thread per core).
    """
    key = name.strip().lower()
    if key not in DATASETS:
        raise TicketctlError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if key in NEEDS_DATA_DIR and data_dir is None:
        raise TicketctlError(f"dataset {key!r} needs its data folder: pass --data-dir DIR")
    if val_size is not None and val_size < 0:
        raise TicketctlError(f"val_size must be 0 or more (got {val_size})")
    if image_size is not None and not 1 <= image_size <= MAX_SIDE:
        raise TicketctlError(f"--image-size must be between 1 and {MAX_SIDE}, got {image_size}")
    if key not in CAN_STREAM and (stream or image_size is not None):
        what = "--stream" if stream else "--image-size"
        raise TicketctlError(f"{what} is for image folders (--dataset imagefolder); {key} is "
                             "always held in memory at its own size")
    dev = _device(device)
    folder = Path(data_dir).expanduser() if data_dir is not None else None

    if key == "imagefolder":
        listing = imagefolder.scan(folder)
        streams, why, image_size = _choose(listing, stream, image_size, dev)
        if streams:
            assert folder is not None
            return _streamed(key, folder, listing, image_size, why, dev, val_size, split_seed,
                             normalize, stats, reader or BatchReader())
        raw = imagefolder.load(folder, split_seed=split_seed, device=dev,
                               synthetic_size=synthetic_size, image_size=image_size,
                               listing=listing)
    else:
        raw = DATASETS[key](folder, split_seed=split_seed, device=dev,
                            synthetic_size=synthetic_size)
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
        image_size=image_size,
    )


def _choose(listing: imagefolder.Listing, stream: bool | None, image_size: int | None,
            device: torch.device) -> tuple[bool, str, int | None]:
    """Whether an image folder streams, why (for the refusals of commands that cannot), and
    the size it is used at. Image headers are read only where the answer depends on them."""
    files = listing.train_files + listing.test_files
    if stream and image_size is not None:
        return True, "--stream", image_size
    sizes = imagefolder.image_sizes(files)
    mixed = imagefolder.mixed_sizes(files, sizes)
    if stream is False:
        if mixed and image_size is None:
            raise TicketctlError(f"all images must have one size to be held in memory: "
                                 f"{mixed}; pass --image-size N to resize them")
        return False, "", image_size
    if stream is None and not mixed:
        w, h = sizes[0]
        shape = (3, h, w) if image_size is None else (3, image_size, image_size)
        if _everywhere(fits_in_memory(len(files), shape, device), device):
            return False, "", image_size
        why = f"{len(files):,} images of {shape[2]}x{shape[1]} do not fit in memory"
    else:
        why = "--stream" if stream else "images of mixed sizes"
    if image_size is None:
        if mixed:
            raise TicketctlError(f"images of mixed sizes stream at one size: {mixed}; pass "
                                 "--image-size N")
        image_size = min(sizes[0])
    return True, why, image_size


def _everywhere(fits: bool, device: torch.device) -> bool:
    """Whether the data fit on every rank of a data-parallel run (on one process: here). The
    ranks measure their own free memory, so without agreeing one could hold a folder that
    another streams; all hold it only if it fits on each."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return fits
    flag = torch.tensor([int(fits)], device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _streamed(key: str, folder: Path, listing: imagefolder.Listing, image_size: int, why: str,
              device: torch.device, val_size: int | None, split_seed: int, normalize: bool,
              stats: Stats | None, reader: BatchReader) -> StreamedDataset:
    """An image folder as file lists, split and normalised like a resident one."""
    n_train = len(listing.train_files)
    k = default_val_size(n_train) if val_size is None else val_size
    if k >= n_train:
        raise TicketctlError(
            f"val_size {k} leaves no training images ({key} has {n_train} before the split); "
            f"pass a val_size below {n_train}"
        )
    kept, held = holdout_indices(n_train, k, split_seed)
    files = as_files(listing.train_files)
    labels = torch.tensor(listing.train_labels, dtype=torch.int64)

    def split(rows: torch.Tensor) -> StreamedSplit:
        return StreamedSplit(tuple(files[i] for i in rows.tolist()), labels[rows])

    train, val = split(kept), split(held)
    test = StreamedSplit(as_files(listing.test_files),
                         torch.tensor(listing.test_labels, dtype=torch.int64))
    if not normalize:
        stats = ((0.0,) * 3, (1.0,) * 3)
    elif stats is None:
        stats = measure_stats(list(train.files), image_size, split_seed, reader)
    return StreamedDataset(
        name=key, num_classes=len(listing.classes), class_names=list(listing.classes),
        input_shape=(3, image_size, image_size), train=train, val=val, test=test,
        mean=tuple(float(v) for v in stats[0]), std=tuple(float(v) for v in stats[1]),
        image_size=image_size, device=device, why=why, val_size=k, split_seed=split_seed,
        data_dir=str(folder.resolve()), normalized=normalize, reader=reader)


def load_recorded_dataset(
    recorded: dict,
    name: str | None = None,
    data_dir: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    val_size: int | None = None,
    split_seed: int | None = None,
    stream: bool | None = None,
    image_size: int | None = None,
) -> Dataset | StreamedDataset:
    """Load the dataset a ticket recorded (its metadata's `dataset`), unless told otherwise:
    an image folder the same way (streamed or in memory, at the recorded size, a streamed
    one with its recorded statistics)."""
    name = name or recorded.get("name") or "digits"
    same = name == recorded.get("name")
    folder = data_dir or (recorded.get("data_dir") if same else None)
    if val_size is None and same:
        val_size = recorded.get("val_size")
    if split_seed is None:
        split_seed = recorded.get("split_seed", 0) if same else 0
    stats, recorded_stream = None, False
    if same and name in CAN_STREAM:
        if stream is None:
            stream = recorded_stream = bool(recorded.get("stream", False))
        if image_size is None:
            image_size = recorded.get("image_size")
        if stream and recorded.get("stream") and recorded.get("mean") and recorded.get("std") \
                and image_size == recorded.get("image_size") \
                and split_seed == recorded.get("split_seed", 0):
            stats = (tuple(recorded["mean"]), tuple(recorded["std"]))
    data = load_dataset(name, folder, device=device, val_size=val_size, split_seed=split_seed,
                        stream=stream, image_size=image_size, stats=stats)
    if recorded_stream and isinstance(data, StreamedDataset):
        data.why = "it was streamed when the model was made"
    return data
