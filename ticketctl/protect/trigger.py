"""Scheme V3 trigger sets: secret images with labels only the owner predicts.

A set is uint8 images (N x H x W x C) with labels, stored as `.npz` (`images`, `labels`) like
`../shared/data/trigger-abstract-100.npz`, or read from an image folder with a labels file.
`generate` derives a fresh set from the owner's private key (abstract images and labels seeded
by a keyed hash), so it can be regenerated at will and is bound to that key.

A set from someone else is hostile until checked: every array's type, shape and size is read
from the `.npz`'s directory and `.npy` headers and bounded before it is decompressed, pixel and
label values are checked, and a folder's `labels.txt` may only name images inside the folder."""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ticketctl.artifacts.io import atomic_path
from ticketctl.data.images import MAX_PIXELS, MAX_SIDE, read_rgb
from ticketctl.errors import TicketctlError, first_line

MAX_SET_BYTES = 256 << 20  # a set's images as stored; the paper's 100 images are 300 kB
MAX_LABELS_FILE_BYTES = 1 << 20  # a folder's labels.txt (100 lines are about 2 kB)


@dataclass
class TriggerSet:
    images: np.ndarray  # uint8 [N, H, W, C]
    labels: np.ndarray  # int64 [N]

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise TicketctlError("the trigger set is empty")
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise TicketctlError("trigger images must be uint8 N x H x W x C")
        if self.labels.dtype.kind not in "ui" or self.labels.ndim != 1:
            raise TicketctlError("trigger labels must be N integers (class indices)")
        self.labels = self.labels.astype(np.int64)
        if len(self.labels) != len(self.images):
            raise TicketctlError(f"{len(self.images)} trigger images but {len(self.labels)} "
                                 "labels")
        if (self.labels < 0).any():
            raise TicketctlError(f"trigger label {int(self.labels.min())} is negative; labels "
                                 "are class indices 0, 1, ...")

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
    """A trigger set from an `.npz` (`images`, `labels`) or an image folder with `labels.txt`,
    checked and bounded before anything large is read (see the module's docstring)."""
    p = Path(path)
    if p.is_dir():
        return _load_folder(p)
    if not p.is_file():
        raise TicketctlError(f"{p}: no such trigger set (an .npz or an image folder)")
    try:
        with zipfile.ZipFile(p) as z:
            images = _read_npy(z, p, "images")
            labels = _read_npy(z, p, "labels")
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise TicketctlError(f"{p} is not a trigger set .npz with `images` and `labels` "
                             f"({first_line(e, 100)})") from None
    return _checked(images, labels, str(p))




def _read_npy(z: zipfile.ZipFile, p: Path, key: str) -> np.ndarray:
    """One array of an `.npz`: its size from the zip directory and its type and shape from
    the `.npy` header are checked before the data is decompressed (a small compressed file can
    claim gigabytes)."""
    try:
        info = z.getinfo(f"{key}.npy")
    except KeyError:
        raise TicketctlError(f"{p} is not a trigger set .npz: it has no `{key}` array "
                             "(it needs `images` and `labels`)") from None
    if info.file_size > MAX_SET_BYTES + 65536:  # the array and its header
        raise TicketctlError(f"{p}: `{key}` decompresses to {info.file_size:,} bytes, more "
                             f"than the {MAX_SET_BYTES >> 20} MiB a trigger set may hold")
    fmt = np.lib.format
    with z.open(info) as f:
        try:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            if version not in read:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read[version](f)
        except ValueError as e:
            raise TicketctlError(f"{p}: `{key}` is not a readable .npy array "
                                 f"({first_line(e, 100)})") from None
    if dtype.kind not in "ui":  # not float (NaN), complex, bool, strings or objects
        raise TicketctlError(f"{p}: `{key}` holds {dtype} values; trigger "
                             + ("images must be uint8 pixels 0..255" if key == "images"
                                else "labels must be integers (class indices)"))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_SET_BYTES:
        raise TicketctlError(f"{p}: `{key}` of shape {list(shape)} and type {dtype} would take "
                             f"{nbytes:,} bytes, more than the {MAX_SET_BYTES >> 20} MiB a "
                             "trigger set may hold")
    if key == "images" and (len(shape) not in (3, 4) or any(s < 1 for s in shape[1:])):
        raise TicketctlError(f"{p}: trigger images have shape {list(shape)}; they must be "
                             "N x H x W x C (or N x H x W for grey)")
    if key == "images" and shape[1] * shape[2] > MAX_PIXELS:
        raise TicketctlError(f"{p}: trigger images of {shape[2]}x{shape[1]} pixels are more "
                             f"than the {MAX_SIDE}x{MAX_SIDE} an image may have; resize them")
    if key == "labels" and len(shape) != 1:
        raise TicketctlError(f"{p}: trigger labels have shape {list(shape)}; they must be a "
                             "list of N integers")
    with z.open(info) as f:
        try:
            return fmt.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise TicketctlError(f"{p}: cannot read `{key}` ({first_line(e, 100)}); truncated?") \
                from None


def _checked(images: np.ndarray, labels: np.ndarray, where: str) -> TriggerSet:
    """Integer pixels within 0..255 and integer labels at least 0, as the set's types."""
    if images.ndim == 3:
        images = images[..., None]
    if images.size and (int(images.min()) < 0 or int(images.max()) > 255):
        raise TicketctlError(f"{where}: trigger image pixels run from {int(images.min())} to "
                             f"{int(images.max())}; they must be 0..255")
    if labels.size and int(labels.min()) < 0:
        raise TicketctlError(f"{where}: trigger label {int(labels.min())} is negative; labels "
                             "are class indices 0, 1, ...")
    if labels.size and int(labels.max()) > np.iinfo(np.int64).max:
        raise TicketctlError(f"{where}: trigger label {int(labels.max())} is not a class index")
    return TriggerSet(images.astype(np.uint8), labels.astype(np.int64))


def _load_folder(folder: Path) -> TriggerSet:
    """Images in a folder plus `labels.txt` (one `filename label` per line), each name a file
    inside the folder (no absolute path, no `..`, no link leading out of it)."""
    labels_file = folder / "labels.txt"
    if not labels_file.is_file():
        raise TicketctlError(f"{folder} has no labels.txt (one 'filename label' per line)")
    root = folder.resolve()
    if not labels_file.resolve().is_relative_to(root):
        raise TicketctlError(f"{labels_file} is a link to a file outside the trigger folder; "
                             "put the labels file itself in the folder")
    if labels_file.stat().st_size > MAX_LABELS_FILE_BYTES:
        raise TicketctlError(f"{labels_file} holds more than {MAX_LABELS_FILE_BYTES >> 20} MiB; "
                             "it should hold one short 'filename label' line per image")
    try:
        text = labels_file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise TicketctlError(f"{labels_file} is not UTF-8 text") from None
    images: list[np.ndarray] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{labels_file} line {number}"
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise TicketctlError(f"{where}: expected 'filename label', got {line.strip()!r}")
        name, label = parts[0].strip(), parts[1]
        try:
            value = int(label)
        except ValueError:
            raise TicketctlError(f"{where}: label {label!r} is not an integer class index") \
                from None
        if value < 0:
            raise TicketctlError(f"{where}: label {value} is negative; labels are class "
                                 "indices 0, 1, ...")
        img = read_rgb(_inside(folder, root, name, where), f"{where} ({name})")
        if images and img.shape != images[0].shape:
            img = np.asarray(Image.fromarray(img).resize(images[0].shape[1::-1]))
        if (len(images) + 1) * img.nbytes > MAX_SET_BYTES:
            raise TicketctlError(f"{where}: the images so far take more than the "
                                 f"{MAX_SET_BYTES >> 20} MiB a trigger set may hold")
        images.append(img)
        labels.append(value)
    if not images:
        raise TicketctlError("the trigger set is empty")
    return TriggerSet(np.stack(images).astype(np.uint8), np.array(labels, dtype=np.int64))


def _inside(folder: Path, root: Path, name: str, where: str) -> Path:
    """The file `name` names in the folder, refused when it lies outside the folder."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise TicketctlError(f"{where}: {name!r} points outside the trigger folder; name the "
                             "images inside it (no absolute path, no '..')")
    target = (folder / rel).resolve()
    if not target.is_relative_to(root):
        raise TicketctlError(f"{where}: {name!r} is a link to a file outside the trigger "
                             "folder; copy the image into the folder")
    if not target.is_file():
        raise TicketctlError(f"{where}: no image file {name!r} in {folder}")
    return target


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
    if not 1 <= size <= MAX_SIDE:
        raise TicketctlError(f"--size must be 1..{MAX_SIDE} pixels, got {size}")
    if channels not in (1, 3):
        raise TicketctlError(f"--channels must be 1 (grey) or 3 (RGB), got {channels}")
    if num_classes < 2:
        raise TicketctlError(f"--classes must be at least 2, got {num_classes}")
    if n * size * size * channels > MAX_SET_BYTES:
        raise TicketctlError(f"{n} images of {size}x{size}x{channels} would take more than the "
                             f"{MAX_SET_BYTES >> 20} MiB a trigger set may hold; make fewer "
                             "or smaller ones")
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
