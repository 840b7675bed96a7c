"""The per-image transforms of streamed image folders, done in pillow on the decoding worker
(numpy and pillow only, so a worker process needs nothing else):

* training: a random resized crop (a box of 8-100% of the image's area with an aspect ratio
  between 3:4 and 4:3, the ImageNet recipe) scaled to size x size, mirrored with probability
  1/2. Every draw comes from a generator seeded by (seed, epoch, index) alone, so an image gets
  the same crop whichever batch, rank or resumed run decodes it;
* evaluation: the shorter side scaled to round(size / 0.875), then the centre size x size.

Both are one `Image.resize` from a box of the original image, and JPEGs are decoded at the
smallest of pillow's DCT scales (1/2, 1/4, 1/8) that still covers the box at the output size
(`Image.draft`), so a large photo is never decoded in full to produce a small crop."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ticketctl.data.images import read_image

SCALE = (0.08, 1.0)  # share of the image's area a training crop covers
RATIO = (3 / 4, 4 / 3)  # its width / height
CROP_TRIES = 10  # boxes drawn before falling back to the centre crop
EVAL_CROP = 0.875  # evaluation keeps the centre 87.5% of the resized image
_ORDER, _AUGMENT = 0x0DE5, 0xA06  # keep the order and the crops on different random streams

Box = tuple[float, float, float, float]  # left, top, right, bottom in the image's pixels


def _entropy(*words: int) -> list[int]:
    return [w % (1 << 63) for w in words]  # SeedSequence takes non-negative integers


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) an epoch trains in, drawn from (seed, epoch) alone, so a
    resumed run replays it without any saved generator state."""
    return np.random.default_rng(_entropy(_ORDER, seed, epoch)).permutation(n)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of image `index`'s crop and flip in `epoch`."""
    return np.random.default_rng(_entropy(_AUGMENT, seed, epoch, index))


def crop_box(rng: np.random.Generator, width: int, height: int) -> tuple[int, int, int, int]:
    """A random resized crop's box (left, top, w, h) in a width x height image: up to
    CROP_TRIES draws of an area share in SCALE and a log-uniform ratio in RATIO until the box
    fits; else the largest centred box whose ratio is within RATIO."""
    area = width * height
    low, high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(CROP_TRIES):
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * rng.random())
        ratio = math.exp(low + (high - low) * rng.random())
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, w, h
    # fallback: the whole image, narrowed to the nearest allowed ratio
    w, h = width, height
    if width / height < RATIO[0]:
        h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(height * RATIO[1])
    return (width - w) // 2, (height - h) // 2, w, h


def eval_box(width: int, height: int, size: int) -> Box:
    """The part of a width x height image that evaluation shows: after scaling the shorter
    side to round(size / EVAL_CROP), the centre size x size, in the original's pixels."""
    short = round(size / EVAL_CROP)
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    left, top = round((new_w - size) / 2), round((new_h - size) / 2)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def _resized(image: Image.Image, box: Box, size: int, flip: bool = False) -> np.ndarray:
    """`box` of the image (in its full-size pixels) scaled to size x size RGB."""
    full_w, full_h = image.size
    scale = min((box[2] - box[0]) / size, (box[3] - box[1]) / size)
    if scale >= 2 and image.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 where that suffices
        image.draft(None, (math.ceil(full_w / scale), math.ceil(full_h / scale)))
    sx, sy = image.size[0] / full_w, image.size[1] / full_h
    if image.mode != "RGB":
        image = image.convert("RGB")
    out = image.resize((size, size), Image.Resampling.BILINEAR,
                       box=(box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def read_train(path: str | Path, size: int, seed: int, epoch: int, index: int) -> np.ndarray:
    """Image `index` as a size x size x 3 uint8 training sample of `epoch`."""

    def process(image: Image.Image) -> np.ndarray:
        rng = sample_rng(seed, epoch, index)
        left, top, w, h = crop_box(rng, *image.size)
        flip = bool(rng.random() < 0.5)
        return _resized(image, (left, top, left + w, top + h), size, flip)

    return read_image(path, process)


def read_eval(path: str | Path, size: int) -> np.ndarray:
    """An image as a size x size x 3 uint8 evaluation sample."""
    return read_image(path, lambda image: _resized(image, eval_box(*image.size, size), size))
