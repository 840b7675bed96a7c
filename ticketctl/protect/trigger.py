"""Scheme V3 trigger sets: secret images with labels only the owner predicts.

A set is uint8 images (N x H x W x C) with labels, stored as `.npz` (`images`, `labels`) like
`../shared/data/trigger-abstract-100.npz`, or read from an image folder with a labels file.
`generate` derives a fresh set from the owner's private key (abstract images and labels seeded
by a keyed hash), so it can be regenerated at will and is bound to that key."""

from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ticketctl.artifacts.io import atomic_path
from ticketctl.errors import TicketctlError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class TriggerSet:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise TicketctlError("the trigger set is empty")
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TicketctlError("trigger images must be uint8 N x H x W x C")
        if len(self.labels) != len(self.images):
            raise TicketctlError(f"{len(self.images)} trigger images but {len(self.labels)} "
                                 "labels")

    def sha256(self) -> str:
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.images).tobytes())
        h.update(np.ascontiguousarray(self.labels.astype(np.int64)).tobytes())
        return h.hexdigest()

    def check_classes(self, num_classes: int) -> None:
        bad = self.labels[(self.labels < 0) | (self.labels >= num_classes)]
        if len(bad):
            raise TicketctlError(f"trigger label {int(bad[0])} is outside the model's "
                                 f"{num_classes} classes")

    def tensor(self, shape: tuple[int, int, int], mean: tuple[float, ...],
               std: tuple[float, ...], device: str | torch.device = "cpu") -> torch.Tensor:
        """Images resized to the model's input (bilinear) and normalised like its training
        data; a channel mismatch is an error (except RGB to one channel, as grey)."""
        c, h, w = shape
        x = torch.from_numpy(self.images).permute(0, 3, 1, 2)
        x = x.to(torch.get_default_dtype()) / 255.0
        if x.shape[1] != c:
            if c == 1 and x.shape[1] == 3:
                x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
            else:
                raise TicketctlError(f"trigger images have {x.shape[1]} channels but the model "
                                     f"takes {c}")
        if tuple(x.shape[2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False,
                              antialias=True)
        m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
        return ((x - m) / s).to(device)


def load_trigger_set(path: str | Path) -> TriggerSet:
    p = Path(path)
    if p.is_dir():
        return _load_folder(p)
    if not p.is_file():
        raise TicketctlError(f"{p}: no such trigger set (an .npz or an image folder)")
    try:
        with np.load(p, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (ValueError, KeyError, OSError) as e:
        raise TicketctlError(f"{p} is not a trigger set .npz with `images` and `labels` "
                             f"({str(e).splitlines()[0][:100]})") from None
    if images.ndim == 3:
        images = images[..., None]
    return TriggerSet(images.astype(np.uint8), labels.astype(np.int64).reshape(-1))


def _load_folder(folder: Path) -> TriggerSet:
    """Images in a folder plus `labels.txt` (one `filename label` per line)."""
    labels_file = folder / "labels.txt"
    if not labels_file.exists():
        raise TicketctlError(f"{folder} has no labels.txt (one 'filename label' per line)")
    images, labels = [], []
    for line in labels_file.read_text().splitlines():
        if not line.strip():
            continue
        name, label = line.rsplit(maxsplit=1)
        img = np.asarray(Image.open(folder / name).convert("RGB"))
        if images and img.shape != images[0].shape:
            img = np.asarray(Image.fromarray(img).resize(images[0].shape[1::-1]))
        images.append(img)
        labels.append(int(label))
    return TriggerSet(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64))


def save_trigger_set(ts: TriggerSet, path: str | Path, force: bool = False) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=ts.images, labels=ts.labels)
    with atomic_path(path, force) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def generate(key_material: bytes, n: int = 100, size: int = 32, channels: int = 3,
             num_classes: int = 10) -> TriggerSet:
    """Abstract images (random smooth colour fields with stripes and blobs) and uniform
    labels, from a seed that is an HMAC of the owner's private key: the same key always gives
    the same set, another key another one."""
    if n < 1:
        raise TicketctlError(f"-n must be at least 1, got {n}")
    seed = hmac.new(key_material, b"ticketctl trigger set v1", hashlib.sha256).digest()
    rng = np.random.default_rng(int.from_bytes(seed[:16], "little"))
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        img = np.zeros((size, size, channels))
        for _ in range(rng.integers(3, 7)):
            fx, fy, ph = rng.uniform(1, 8), rng.uniform(1, 8), rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
            cx, cy, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.1, 0.4)]
            blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
            img += (wave * rng.uniform(0.3, 1.0) + blob * rng.uniform(-1, 1))[..., None] \
                * rng.uniform(-1, 1, channels)
        img = (img - img.min()) / (np.ptp(img) + 1e-9)
        images[i] = (img * 255).astype(np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    return TriggerSet(images, labels)
