"""Module matrices as pictures: a PNG for people and a pyzbar read-back as an independent
cross-check of our own decoder (a second reader that shares none of our code)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from ticketctl.artifacts.io import atomic_path
from ticketctl.errors import TicketctlError


def _check_args(matrix: np.ndarray, scale: int, border: int) -> np.ndarray:
    """Reject shapes and sizes that cannot make a QR picture, with a usable message."""
    grid = np.asarray(matrix)
    if grid.ndim != 2 or grid.shape[0] != grid.shape[1] or grid.shape[0] < 21:
        raise TicketctlError(f"QR matrix must be square and at least 21x21, got shape "
                             f"{grid.shape}; pass the module matrix without a quiet zone")
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise TicketctlError(f"QR image scale must be a positive integer, got {scale!r}")
    if isinstance(border, bool) or not isinstance(border, int) or border < 0:
        raise TicketctlError(f"QR image border must be a non-negative integer, got {border!r}")
    return grid != 0


def _to_image(matrix: np.ndarray, scale: int, border: int) -> Image.Image:
    """Grey-scale picture, black = dark module, with a light quiet zone of ``border`` modules."""
    grid = _check_args(matrix, scale, border)
    padded = np.pad(grid, border, constant_values=False)
    pixels = np.where(padded, 0, 255).astype(np.uint8)
    pixels = np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))
    return Image.fromarray(pixels, mode="L")


def render_png(matrix: np.ndarray, path: str | Path, scale: int = 8, border: int = 4,
               force: bool = False) -> Path:
    """Write the matrix as a PNG (``scale`` pixels per module, ``border`` quiet-zone modules;
    the standard asks for 4), atomically and not over an existing file without ``force``."""
    image = _to_image(matrix, scale, border)
    out = Path(path)
    try:
        with atomic_path(out, force) as tmp:
            image.save(tmp, format="PNG")
    except OSError as exc:
        raise TicketctlError(f"cannot write QR image {out}: {exc}; check the directory exists "
                             "and is writable") from exc
    return out


def _zbar():
    """Import pyzbar lazily: it loads the system libzbar, which may be missing."""
    try:
        from pyzbar import pyzbar
    except (ImportError, OSError) as exc:
        raise TicketctlError(
            "pyzbar cannot load the system library libzbar; install it (Debian: apt-get install "
            f"libzbar0, macOS: brew install zbar) or skip the zbar cross-check ({exc})"
        ) from exc
    return pyzbar


def zbar_decode(matrix: np.ndarray, scale: int = 8, border: int = 4) -> str | None:
    """Decode the rendered matrix with zbar; the text of the single QR symbol found, else None
    (no symbol, several symbols, or bytes that are not UTF-8)."""
    pyzbar = _zbar()
    image = _to_image(matrix, scale, border)
    symbols = [s for s in pyzbar.decode(image) if s.type == "QRCODE"]
    if len(symbols) != 1:
        return None
    try:
        return symbols[0].data.decode("utf-8")
    except UnicodeDecodeError:
        return None
