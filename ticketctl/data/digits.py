"""scikit-learn's bundled 8x8 handwritten digits: a tiny dataset that needs no download.

1,797 one-channel 8x8 images with values 0..16. There is no official test split, so one is
drawn from ``split_seed``: a sixth of the images (like CIFAR's 10k of 60k) become the test set;
``load_dataset`` then holds validation images out of the rest (10% by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ticketctl.data.splits import RawSplits, default_val_size, holdout_indices

CLASS_NAMES = [str(d) for d in range(10)]
PIXEL_MAX = 16.0


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


def num_test_images(n: int) -> int:
    """How many of ``n`` images form the test split (one sixth, rounded down)."""
    return n // 6


def split_indices(split_seed: int = 0, val_size: int | None = None) -> dict[str, torch.Tensor]:
    """Indices into ``sklearn.datasets.load_digits()`` of the train/val/test splits.

    ``load_dataset("digits", ...)`` uses exactly these rows, in this order; exposed so the split
    can be checked or reproduced outside ticketctl.
    """
    n = len(_raw_digits()[1])
    rest, test = holdout_indices(n, num_test_images(n), split_seed)
    k = default_val_size(len(rest)) if val_size is None else val_size
    kept, held = holdout_indices(len(rest), k, split_seed)
    return {"train": rest[kept], "val": rest[held], "test": test}


def load(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int
) -> RawSplits:
    """Load the digits with a test split drawn from ``split_seed`` (``data_dir`` is unused)."""
    images, labels = _raw_digits()
    x = torch.from_numpy(images).unsqueeze(1)  # N x 1 x 8 x 8, values 0..16
    y = torch.from_numpy(labels)
    rest, test = holdout_indices(len(y), num_test_images(len(y)), split_seed)
    return RawSplits(
        class_names=list(CLASS_NAMES),
        train_x=x[rest],
        train_y=y[rest],
        test_x=x[test],
        test_y=y[test],
        scale=PIXEL_MAX,
        augment="none",
        default_val_size=default_val_size(len(rest)),
    )
