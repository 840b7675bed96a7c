"""The in-memory dataset every training and pruning command works on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def describe(data: Any, sizes: tuple[int, int, int]) -> dict[str, Any]:
    """What `info` says of any dataset (resident or streamed), given its split sizes."""
    return {
        "name": data.name,
        "num_classes": data.num_classes,
        "input_shape": list(data.input_shape),
        "train_size": sizes[0],
        "val_size": sizes[1],
        "test_size": sizes[2],
        "split_seed": data.split_seed,
        "data_dir": data.data_dir,
        "augment": data.augment,
        "normalized": data.normalized,
        "mean": [float(m) for m in data.mean],
        "std": [float(s) for s in data.std],
    }


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
              ) -> torch.Tensor:
    """(images - mean) / std per channel, for N x C x H x W images on the [0, 1] scale."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device)
    s = torch.tensor(std, dtype=torch.float32, device=images.device)
    return (images.float() - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
                ) -> torch.Tensor:
    """Invert `normalize`: back to the [0, 1] pixel scale."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device)
    s = torch.tensor(std, dtype=torch.float32, device=images.device)
    return images.float() * s.view(1, -1, 1, 1) + m.view(1, -1, 1, 1)


@dataclass
class Dataset:
    """All splits of one dataset, already as normalised float32 tensors on one device.

    Keeping everything resident on the device avoids a data-loader pipeline: small image
    datasets (CIFAR is 600 MB as float32) fit on a GPU, and batches are plain index slices.
    """

    name: str
    num_classes: int
    class_names: list[str]
    input_shape: tuple[int, int, int]  # C, H, W
    train_x: torch.Tensor  # float32, normalised, N x C x H x W
    train_y: torch.Tensor  # int64
    val_x: torch.Tensor  # 0 rows when val_size == 0
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...]  # per channel, on the [0, 1] pixel scale
    std: tuple[float, ...]
    augment: str  # "crop_flip" or "none", for augment_batch
    val_size: int = 0
    split_seed: int = 0
    data_dir: str | None = None
    normalized: bool = True
    image_size: int | None = None  # images resized to this (None: their own size)

    streamed = False  # see `stream.StreamedDataset`

    @property
    def device(self) -> torch.device:
        """The device all split tensors live on."""
        return self.train_x.device

    def require_resident(self, what: str) -> None:
        """Every image is in memory: anything may use it (a streamed dataset refuses)."""

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise N x C x H x W images on the [0, 1] scale exactly like this dataset's splits.

        Use it for images from elsewhere (e.g. a trigger set) so a model sees them the same way.
        """
        return normalize(images, self.mean, self.std)

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Invert ``normalize``: back to the [0, 1] pixel scale."""
        return denormalize(images, self.mean, self.std)

    def info(self) -> dict[str, Any]:
        """A JSON-able description, for artifacts and ``--json`` output."""
        return {**describe(self, (int(self.train_x.shape[0]), int(self.val_x.shape[0]),
                                  int(self.test_x.shape[0]))),
                **({"image_size": self.image_size} if self.image_size is not None else {})}
