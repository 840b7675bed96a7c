"""Streamed batches decoded on the GPU: the worker threads only read each file (its size and
header checked first, as `images.read_image` does), the JPEGs of a batch are decoded together
by nvJPEG (`torchvision.io.decode_jpeg` on a CUDA device), and the crop, resize and flip are
tensor operations on the device. Other formats are decoded by pillow on the threads.

The boxes and flips are the pillow reader's (`transforms.crop_box`, `eval_box`, one generator
per (seed, epoch, image)), so the order, resume and sharding guarantees hold unchanged. The
pixels differ a little: a box is widened to whole pixels before it is resized, and the
bilinear resize (antialiased, as pillow's is when it shrinks) is torch's, not pillow's."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ticketctl.data.images import read_image
from ticketctl.data.stream import Batch, BatchReader, StreamedSplit
from ticketctl.data.transforms import crop_box, eval_box, sample_rng

# bytes of a JPEG file -> uint8 3 x H x W on the device, for every file of a batch at once
Decode = Callable[[list[bytes], torch.device], list[torch.Tensor]]
JPEG_MAGIC = b"\xff\xd8"


def nvjpeg_available(device: torch.device) -> bool:
    """Whether this machine can decode on `device`: a CUDA device and a torchvision with
    batched GPU decoding."""
    if device.type != "cuda":
        return False
    try:
        import torchvision
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    major, minor = (int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2])
    return (major, minor) >= (0, 19)  # batched decoding of a list on the GPU


def nvjpeg_decode(datas: list[bytes], device: torch.device) -> list[torch.Tensor]:
    """A batch of JPEG files decoded together on the GPU, as RGB."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def _pillow_decode(data: bytes, device: torch.device) -> torch.Tensor:
    """One JPEG decoded by pillow (already size-checked when it was read), 3 x H x W."""
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
        pixels = np.array(image.convert("RGB"))
    return torch.from_numpy(pixels).permute(2, 0, 1).to(device)


def _read(path: str) -> tuple[bytes | None, np.ndarray | None]:
    """(the file's bytes, None) for a JPEG; (None, H x W x 3 pixels) for any other format."""

    def process(image) -> tuple[bytes | None, np.ndarray | None]:
        if image.format == "JPEG":
            return Path(path).read_bytes(), None
        return None, np.array(image.convert("RGB"))  # a writable copy: torch takes it

    return read_image(path, process)


def resized_crop(image: torch.Tensor, box: tuple[float, float, float, float], size: int,
                 flip: bool = False) -> torch.Tensor:
    """`box` (left, top, right, bottom; widened to whole pixels) of a uint8 3 x H x W image,
    resized to size x size with antialiased bilinear filtering and mirrored where `flip`; uint8
    size x size x 3, on the image's device."""
    _, h, w = image.shape
    left, top = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    right, bottom = min(w, math.ceil(box[2])), min(h, math.ceil(box[3]))
    crop = image[:, top:bottom, left:right].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False,
                        antialias=True)[0]
    if flip:
        out = out.flip(-1)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0)


@dataclass
class _Reading(Batch):
    """A batch whose files are being read: its images' rows in the split and how to
    transform them."""

    rows: list[int] = field(default_factory=list)
    how: tuple[int, bool, int, int] = (0, False, 0, 0)  # size, train, seed, epoch


class TensorBatchReader(BatchReader):
    """A `BatchReader` whose batches come out on `device` (uint8 N x S x S x 3): files read
    by the threads, JPEGs decoded by `decode` (default nvJPEG), the rest by pillow, the
    transforms done with tensor operations there."""

    def __init__(self, device: torch.device, workers: int | None = None,
                 prefetch: int = 4, decode: Decode | None = None) -> None:
        super().__init__(workers, processes=False, prefetch=prefetch)
        self.device = device
        self.decode = decode or nvjpeg_decode

    def _submit(self, split: StreamedSplit, idx: np.ndarray, size: int, train: bool, seed: int,
                epoch: int, pin: bool) -> Batch:
        rows = idx.tolist()
        parts = [(i, i + 1, self.pool().submit(_read, split.files[r]))
                 for i, r in enumerate(rows)]
        return _Reading(torch.empty(0, dtype=torch.uint8), split.labels[torch.from_numpy(idx)],
                        parts, rows=rows, how=(size, train, seed, epoch))

    def _finish(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(batch, _Reading)
        size, train, seed, epoch = batch.how
        read = [future.result() for _, _, future in batch.parts]  # an unreadable file: here
        jpegs = [k for k, (data, _) in enumerate(read) if data is not None]
        images: list[torch.Tensor | None] = [None] * len(read)
        if jpegs:
            try:
                decoded = self.decode([read[k][0] for k in jpegs], self.device)
            except RuntimeError:  # one the GPU decoder refuses (CMYK, progressive...):
                decoded = [_pillow_decode(read[k][0], self.device) for k in jpegs]
            for k, image in zip(jpegs, decoded, strict=True):
                images[k] = image
        for k, (_, pixels) in enumerate(read):
            if pixels is not None:
                images[k] = torch.from_numpy(pixels).permute(2, 0, 1).to(self.device)
        out = []
        for index, image in zip(batch.rows, images, strict=True):
            assert image is not None
            h, w = image.shape[1:]
            if train:
                rng = sample_rng(seed, epoch, index)
                left, top, cw, ch = crop_box(rng, w, h)
                flip = bool(rng.random() < 0.5)
                out.append(resized_crop(image, (left, top, left + cw, top + ch), size, flip))
            else:
                out.append(resized_crop(image, eval_box(w, h, size), size))
        return torch.stack(out), batch.y
