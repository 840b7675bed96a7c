"""Random CIFAR-shaped data generated on the device, for speed benchmarks without any files.

Pixels are uniform in [0, 1] and labels uniform over 10 classes, so nothing is learnable; use it
to time training and pruning, never to judge accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ticketctl.data.splits import RawSplits, default_val_size
from ticketctl.errors import TicketctlError

SHAPE = (3, 32, 32)
NUM_CLASSES = 10
TEST_SIZE = 10_000


def load(
    data_dir: Path | None, *, split_seed: int, device: torch.device, synthetic_size: int
) -> RawSplits:
    """Generate ``synthetic_size`` train and 10,000 test images from ``split_seed``."""
    if synthetic_size < 2:
        raise TicketctlError(f"synthetic_size must be at least 2 (got {synthetic_size})")
    generator = torch.Generator(device=device).manual_seed(split_seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.rand((n, *SHAPE), generator=generator, device=device)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=generator, device=device)
        return x, y

    train_x, train_y = draw(synthetic_size)
    test_x, test_y = draw(TEST_SIZE)
    return RawSplits(
        class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        scale=1.0,
        augment="crop_flip",
        default_val_size=default_val_size(synthetic_size),
    )
