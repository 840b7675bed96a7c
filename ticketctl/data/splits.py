"""Deterministic index splits that depend only on ``split_seed`` (never on a training seed)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketctl.errors import TicketctlError


def holdout_indices(n: int, k: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(n)`` into (kept, held_out) with ``k`` held out, both sorted ascending.

    The held-out rows are the first ``k`` of a permutation drawn from ``split_seed``, so the same
    seed always holds out the same rows, and keeping both parts sorted preserves file order.
    """
    if k < 0 or k >= n:
        raise TicketctlError(
            f"cannot hold out {k} of {n} images: choose a size between 0 and {n - 1}"
        )
    generator = torch.Generator().manual_seed(split_seed)
    perm = torch.randperm(n, generator=generator)
    held, kept = perm[:k].sort().values, perm[k:].sort().values
    return kept, held


def default_val_size(n_train: int) -> int:
    """The default validation share when none is given: 10% of the training images."""
    return n_train // 10


@dataclass
class RawSplits:
    """What a loader hands to ``load_dataset``: un-normalised train/test data plus metadata.

    Images are N x C x H x W tensors (any device) whose values divided by ``scale`` lie in
    [0, 1]; uint8 is preferred so that moving them to the device is cheap.
    """

    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    scale: float
    augment: str
    default_val_size: int
    # Fixed per-channel (mean, std) on the [0, 1] scale, or None to compute from the train split.
    fixed_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
