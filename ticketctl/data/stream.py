"""Image folders that stream: files read, decoded and augmented a batch at a time on a pool of
workers, a few batches ahead of the trainer, for data that does not fit in memory (or holds
images of mixed sizes). Data that fits stays resident (`Dataset`); `fits_in_memory` is the
rule that chooses.

What a batch holds depends on (seed, epoch, step) and the split alone: each epoch's order is a
permutation drawn from (seed, epoch) (`transforms.epoch_order`), each image's crop and flip
from (seed, epoch, index), so a resumed run replays the same batches from the epoch it resumes
at. Under data parallelism rank r of w takes the slice [r*b, (r+1)*b) of every global batch of
w*b images, as the resident trainer does: the ranks' slices are disjoint and together are the
one-process batch.

Batches are uint8 N x H x W x 3 (pinned when the device is a GPU, so the copy overlaps the
step; H x W x C is the channels_last layout the GPU trains in) and are normalised on the
device (`StreamedDataset.to_input`)."""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ticketctl.data.dataset import denormalize, describe, normalize
from ticketctl.data.transforms import epoch_order, read_eval, read_train
from ticketctl.errors import TicketctlError

PREFETCH = 4  # batches decoded ahead of the one training
SLOT_MIN_BYTES = 1 << 25  # a shared slot holds at least this (32 MB: 224-pixel batches of 220)
STATS_SAMPLE = 512  # training images the normalisation statistics are measured on
RESIDENT_SHARE = 0.5  # of free memory a resident dataset may take; the rest is the network's
AUGMENT = "random_resized_crop_flip"


# ---- the choice -------------------------------------------------------------------------------
def host_available() -> int | None:
    """RAM available to new allocations (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fits_in_memory(n_images: int, shape: tuple[int, int, int], device: torch.device, *,
                   device_free: int | None = None, host_free: int | None = None) -> bool:
    """Whether an image folder of `n_images` C x H x W images stays resident (one tensor on
    the device, as before streaming existed) rather than streaming. It does when its tensor
    in torch's default float dtype takes at most RESIDENT_SHARE of the device's free memory
    (a GPU's free memory as CUDA reports it; on the CPU the available RAM) and the uint8 copy
    read from the files first (twice: decoded, then stacked) takes at most that share of the
    available RAM (shared by the data-parallel ranks of this host, LOCAL_WORLD_SIZE). The other
    half is left to the network, its activations and the optimizer. `device_free`/`host_free`
    replace the measured amounts (tests)."""
    pixels = n_images * math.prod(shape)
    floats = pixels * torch.finfo(torch.get_default_dtype()).bits // 8
    host = host_free if host_free is not None else host_available()
    if host is not None and host_free is None:  # the ranks of this host each read a copy
        host //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if device.type == "cuda":
        free = device_free if device_free is not None else torch.cuda.mem_get_info(device)[0]
        if floats > RESIDENT_SHARE * free:
            return False
        return host is None or 2 * pixels <= RESIDENT_SHARE * host
    free = device_free if device_free is not None else host
    return free is None or floats + 2 * pixels <= RESIDENT_SHARE * free


# ---- decoding on workers ----------------------------------------------------------------------
# A worker process's view of the reader's shared-memory slots (set once, when it starts).
_SLOTS: list[torch.Tensor] = []


def _init_slots(slots: list[torch.Tensor]) -> None:
    global _SLOTS
    _SLOTS = slots


def _decode(files: list[str], indices: list[int], size: int, train: bool, seed: int,
            epoch: int, out: np.ndarray | None = None,
            slot: tuple[int, int] | None = None) -> np.ndarray | None:
    """Decode images into `out` (k x size x size x 3 uint8; a new array when None), or, in a
    worker process, into rows from `slot` = (slot, first row) of its shared slots (returns
    None: nothing to send back)."""
    if slot is not None:
        k, first = slot
        row = size * size * 3
        out = _SLOTS[k][first * row:(first + len(files)) * row].numpy().reshape(
            len(files), size, size, 3)
    elif out is None:
        out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for k, (path, index) in enumerate(zip(files, indices, strict=True)):
        out[k] = read_train(path, size, seed, epoch, index) if train else read_eval(path, size)
    return None if slot is not None else out


def _shared_slots(count: int, nbytes: int) -> list[torch.Tensor]:
    """`count` shared-memory buffers of `nbytes` for worker processes to decode into, or none
    (the workers then send their images back pickled) when /dev/shm could not hold them with
    room to spare (a container's is often 64 MB) or sharing fails."""
    try:
        import shutil

        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else None
        if free is not None and count * nbytes > free // 2:
            return []
        return [torch.empty(nbytes, dtype=torch.uint8).share_memory_() for _ in range(count)]
    except (OSError, RuntimeError):
        return []


def default_workers() -> int:
    """One decoding worker per core this process may use, shared with the other ranks on
    this host (torchrun's LOCAL_WORLD_SIZE), up to 32."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(32, cores // ranks))


@dataclass
class Batch:
    """A batch being decoded: its images (filled by the workers), labels and the work left."""

    x: torch.Tensor  # uint8 N x S x S x 3
    y: torch.Tensor  # int64 N
    parts: list[tuple[int, int, Future]]
    slot: int | None = None  # the shared slot worker processes decode it into
    slot_buf: torch.Tensor | None = None  # that slot (kept even if the reader is closed)
    generation: int = 0  # of the reader's pool and slots when the slot was taken


# From this many workers on, decode in processes. Threads share the GIL for everything
# around pillow's decode (crops, flips, copies): on a 32-core H200 host (2026-11-30, ResNet-50
# at 224, benchmarks/stream_speed.py) 32 threads fed 1,159 images/s and 32 processes 5,442,
# against 6,704 for the GPU alone. Below it (a laptop, CI's two cores) threads start at once.
PROCESSES_FROM = 4


class BatchReader:
    """Decodes batches on a pool of `workers` threads (pillow decodes and resizes without the
    GIL) or processes, keeping `prefetch` batches in flight ahead of the one in use.
    `processes` None: processes from `PROCESSES_FROM` workers on, else threads."""

    def __init__(self, workers: int | None = None, processes: bool | None = None,
                 prefetch: int = PREFETCH) -> None:
        if workers is not None and workers < 1:
            raise TicketctlError(f"a batch reader needs at least one worker, got {workers}")
        self.workers = workers or default_workers()
        self.processes = self.workers >= PROCESSES_FROM if processes is None else processes
        self.prefetch = max(1, prefetch)
        self._pool: Executor | None = None
        # Worker processes decode into shared slots, one per batch in flight, so a decoded
        # batch is not pickled back through a pipe (the parent's cost that capped processes
        # at 81% of an H200's ResNet-50 speed). A batch larger than the slots makes them grow
        # when none is in use (the statistics' small batches come first); otherwise, or
        # without shared memory, it goes the old way.
        self._slots: list[torch.Tensor] = []
        self._free: list[int] = []
        self._generation = 0  # the pool and slots a batch's slot belongs to
        self.shared_batches = 0  # batches that came back through shared memory

    def pool(self, nbytes: int = 0) -> Executor:
        """The worker pool, started at first use (`nbytes`: the first batch's size, for the
        shared slots of worker processes)."""
        if self._pool is None:
            if self.processes:
                self._start_processes(nbytes)
            else:
                self._pool = ThreadPoolExecutor(self.workers,
                                                thread_name_prefix="ticketctl-decode")
        assert self._pool is not None
        return self._pool

    def _start_processes(self, nbytes: int) -> None:
        self._generation += 1
        self._slots = _shared_slots(self.prefetch + 1, max(nbytes, SLOT_MIN_BYTES))
        self._free = list(range(len(self._slots)))
        self._pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"),
                                         initializer=_init_slots, initargs=(self._slots,))

    def close(self) -> None:
        """Stop the workers (a later batch starts them again)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._generation += 1  # a batch still holding an old slot does not give it back here
        self._slots, self._free = [], []

    def _take_slot(self, nbytes: int) -> int | None:
        """A free shared slot for a batch of `nbytes` (worker processes), or None."""
        if not self.processes or not self._slots:
            return None
        if nbytes > self._slots[0].numel() and len(self._free) == len(self._slots):
            # no batch in flight holds a slot: larger ones, and workers that map them
            assert self._pool is not None
            self._pool.shutdown(wait=True)  # (work still pending elsewhere completes first)
            self._pool = None
            self._start_processes(nbytes)
        if self._free and nbytes <= self._slots[0].numel():
            return self._free.pop()
        return None

    def _submit(self, split: StreamedSplit, idx: np.ndarray, size: int, train: bool, seed: int,
                epoch: int, pin: bool) -> Batch:
        n = len(idx)
        x = torch.empty((n, size, size, 3), dtype=torch.uint8, pin_memory=pin)
        self.pool(x.numel())
        slot = self._take_slot(x.numel())
        batch = Batch(x, split.labels[torch.from_numpy(idx)], [], slot,
                      self._slots[slot] if slot is not None else None, self._generation)
        pool = self.pool()
        chunk = max(1, math.ceil(n / self.workers))
        view = x.numpy()
        try:
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                rows = idx[a:b].tolist()
                files = [split.files[i] for i in rows]
                out = None if self.processes else view[a:b]  # threads write into the batch
                batch.parts.append((a, b, pool.submit(_decode, files, rows, size, train, seed,
                                                      epoch, out,
                                                      None if slot is None else (slot, a))))
        except BaseException:
            for _, _, future in batch.parts:
                future.cancel()
            self._release(batch)
            raise
        return batch

    def _finish(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            for a, b, future in batch.parts:
                got = future.result()  # a worker's error (an unreadable file) is raised here
                if self.processes and batch.slot is None:
                    batch.x[a:b] = torch.from_numpy(got)
            if batch.slot_buf is not None:
                batch.x.view(-1).copy_(batch.slot_buf[:batch.x.numel()])
                self.shared_batches += 1
        finally:
            self._release(batch)
        return batch.x, batch.y

    def _release(self, batch: Batch) -> None:
        """Give a batch's shared slot back once no worker can still write into it (and only
        to the pool it came from: `close` or larger slots may have replaced it)."""
        if batch.slot is None:
            return
        for _, _, future in batch.parts:
            if not future.cancel():
                future.exception()  # running: wait for it (its error is the batch's, unused)
        if batch.generation == self._generation:
            self._free.append(batch.slot)
        batch.slot, batch.slot_buf = None, None

    def batches(self, split: StreamedSplit, plan: Iterable[np.ndarray], size: int, *,
                train: bool, seed: int = 0, epoch: int = 0, pin: bool = False
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of `split` for each index array of `plan`, in order."""
        plan = iter(plan)
        pending: deque[Batch] = deque()

        def submit() -> None:
            idx = next(plan, None)
            if idx is not None:
                pending.append(self._submit(split, np.asarray(idx, dtype=np.int64), size,
                                            train, seed, epoch, pin))

        try:
            for _ in range(self.prefetch):
                submit()
            while pending:
                batch = pending.popleft()
                submit()
                yield self._finish(batch)
        finally:  # stopped early (an error, or the caller had enough): drop the work ahead
            for batch in pending:
                for _, _, future in batch.parts:
                    future.cancel()
                self._release(batch)


# ---- the dataset ------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamedSplit:
    """One split: its image files and their labels (int64, on the CPU)."""

    files: tuple[str, ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.files)


def step_indices(order: np.ndarray, step: int, global_batch: int, rank: int = 0,
                 per_rank: int | None = None) -> np.ndarray:
    """Rank `rank`'s images of global batch `step` of an epoch's `order`: the slice
    [step*global + rank*per_rank, + per_rank), the resident trainer's rule."""
    per_rank = global_batch if per_rank is None else per_rank
    start = step * global_batch + rank * per_rank
    return order[start:start + per_rank]


@dataclass
class StreamedDataset:
    """An image folder read from its files a batch at a time; the splits of a `Dataset`, as
    file lists. Labels are in memory (`train_y`, ...); the images are not, and a command that
    needs them all at once (`train_x`, ...) is refused with one line (`require_resident`)."""

    name: str
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]
    train: StreamedSplit
    val: StreamedSplit
    test: StreamedSplit
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    device: torch.device
    why: str = "it streams"  # why it streams, for the refusals
    val_size: int = 0
    split_seed: int = 0
    data_dir: str | None = None
    normalized: bool = True
    augment: str = AUGMENT
    reader: BatchReader = field(default_factory=BatchReader, repr=False)

    streamed = True

    def __post_init__(self) -> None:
        # to_input's x * scale + shift, made once here: a CUDA graph cannot copy them in
        dtype = torch.get_default_dtype()
        std = torch.tensor(self.std, dtype=torch.float64)
        mean = torch.tensor(self.mean, dtype=torch.float64)
        self._scale = (1 / (255 * std)).to(self.device, dtype).view(1, -1, 1, 1)
        self._shift = (-mean / std).to(self.device, dtype).view(1, -1, 1, 1)

    # ---- what a resident dataset has ---------------------------------------------------------
    def require_resident(self, what: str) -> None:
        """Refuse `what` (a command or an option), which needs every image in memory."""
        raise TicketctlError(
            f"{what} cannot use a streamed dataset (it needs every image in memory): "
            f"{self.name} in {self.data_dir} streams from its files ({self.why}); pass "
            "--no-stream (and --image-size N for images of mixed sizes) if it fits")

    @property
    def train_x(self) -> torch.Tensor:
        self.require_resident("this command")
        raise AssertionError  # unreachable: require_resident raises

    val_x = test_x = train_x

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def val_y(self) -> torch.Tensor:
        return self.val.labels

    @property
    def test_y(self) -> torch.Tensor:
        return self.test.labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise N x C x H x W images on the [0, 1] scale like this dataset's batches."""
        return normalize(images, self.mean, self.std)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Invert ``normalize``: back to the [0, 1] pixel scale."""
        return denormalize(images, self.mean, self.std)

    def info(self) -> dict[str, Any]:
        """A JSON-able description, for artifacts and ``--json`` output: a resident dataset's,
        with `stream` and `image_size`, so a later command reloads it the same way."""
        return {**describe(self, (len(self.train), len(self.val), len(self.test))),
                "stream": True, "image_size": self.image_size}

    # ---- batches -------------------------------------------------------------------------------
    def to_input(self, images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        """uint8 N x H x W x 3 images (on the device) as the network's normalised N x C x H x W
        input; in channels_last memory order (the batch's own, so no copy) or contiguous."""
        x = images.permute(0, 3, 1, 2).to(self._scale.dtype) * self._scale + self._shift
        return x if channels_last else x.contiguous()

    def split(self, name: str) -> StreamedSplit:
        """The files and labels of `train`, `val` or `test`."""
        if name not in ("train", "val", "test"):
            raise TicketctlError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)

    def train_batches(self, seed: int, epoch: int, steps: int, global_batch: int,
                      rank: int = 0, per_rank: int | None = None
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The augmented training batches of `epoch` (numbered from 1): `steps` global
        batches of `global_batch` images in the order of (seed, epoch), this rank's slice of
        each."""
        order = epoch_order(len(self.train), seed, epoch)
        plan = (step_indices(order, b, global_batch, rank, per_rank) for b in range(steps))
        return self.reader.batches(self.train, plan, self.image_size, train=True, seed=seed,
                                   epoch=epoch, pin=self.device.type == "cuda")

    def eval_batches(self, split: str, batch_size: int, part: tuple[int, int] | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A split's images in file order (those in [lo, hi) when `part` is given: a rank's
        share), resized and centre-cropped, `batch_size` at a time."""
        files = self.split(split)
        lo, hi = part if part is not None else (0, len(files))
        plan = (np.arange(a, min(hi, a + batch_size)) for a in range(lo, hi, batch_size))
        return self.reader.batches(files, plan, self.image_size, train=False,
                                   pin=self.device.type == "cuda")


def measure_stats(files: list[str], size: int, split_seed: int, reader: BatchReader
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std on the [0, 1] scale of up to STATS_SAMPLE
    training images (a sample drawn from `split_seed`), as evaluation shows them; a zero std
    becomes 1."""
    pick = np.sort(np.random.default_rng([split_seed]).permutation(len(files))[:STATS_SAMPLE])
    sample = StreamedSplit(tuple(files[i] for i in pick), torch.zeros(len(pick), dtype=torch.long))
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    plan = (np.arange(a, min(len(pick), a + 64)) for a in range(0, len(pick), 64))
    for x, _ in reader.batches(sample, plan, size, train=False):
        pixels = x.cpu().reshape(-1, 3).double() / 255  # (a GPU reader's batches: on the GPU)
        total += pixels.sum(0)
        squares += (pixels * pixels).sum(0)
        count += len(pixels)
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple(mean.tolist()), tuple(std.tolist())


def as_files(paths: Iterable[Path | str]) -> tuple[str, ...]:
    """Paths as the strings a split holds (they pickle small, for worker processes)."""
    return tuple(str(p) for p in paths)
