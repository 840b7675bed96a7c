"""Batched data augmentation done with tensor ops on the batch's own device.

``crop_flip`` is the standard CIFAR recipe: zero-pad 4 pixels on each side, take a random
H x W crop and mirror it horizontally with probability 1/2, independently per sample. It is one
gather over index grids, so a GPU batch never leaves the GPU and there is no per-sample loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ticketctl.errors import TicketctlError

PAD = 4
KINDS = ("crop_flip", "none")


def crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int = PAD
) -> torch.Tensor:
    """Crop each sample of ``x`` zero-padded by ``pad`` at (dy, dx) and mirror it where ``flip``.

    ``dy``/``dx`` are per-sample offsets in [0, 2*pad] into the padded image (``pad`` means no
    shift); ``flip`` is a per-sample bool. Output has the shape of ``x``.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    width = w + 2 * pad
    device = x.device
    rows = dy.to(device).long().view(n, 1) + torch.arange(h, device=device).view(1, h)
    cols = dx.to(device).long().view(n, 1) + torch.arange(w, device=device).view(1, w)
    cols = torch.where(flip.to(device).bool().view(n, 1), cols.flip(1), cols)
    index = (rows.view(n, h, 1) * width + cols.view(n, 1, w)).view(n, 1, h * w)
    out = padded.reshape(n, c, -1).gather(2, index.expand(n, c, h * w))
    return out.view(n, c, h, w)


def augment_batch(
    x: torch.Tensor, kind: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Augment a normalised N x C x H x W batch; ``"none"`` returns ``x`` itself.

    For ``"crop_flip"`` the random draws, in this order, are ``dy``, ``dx`` (each
    ``randint(0, 2*PAD+1, (N,))``) and ``flip`` (``randint(0, 2, (N,))``), made on the
    generator's device (x's device when no generator is given), so a seeded generator
    reproduces the same crops. Padding is zero in normalised space (the mean colour).
    """
    if kind == "none":
        return x
    if kind != "crop_flip":
        raise TicketctlError(f"unknown augmentation {kind!r}; choose one of {', '.join(KINDS)}")
    if x.dim() != 4:
        raise TicketctlError(
            f"augment_batch needs an N x C x H x W batch, got shape {tuple(x.shape)}"
        )
    n = x.shape[0]
    draw_device = generator.device if generator is not None else x.device
    high = 2 * PAD + 1
    dy = torch.randint(0, high, (n,), generator=generator, device=draw_device)
    dx = torch.randint(0, high, (n,), generator=generator, device=draw_device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=draw_device)
    return crop_flip(x, dy, dx, flip)
