"""Reading an image file that may be hostile: a 17 kB PNG can claim 12000 x 12000 pixels and
decode to gigabytes. The file's size and the pixel count its header claims are bounded before
anything is decoded, and only plain raster formats are opened (never EPS and the like, which
Pillow hands to an external interpreter)."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from ticketctl.errors import TicketctlError, first_line

T = TypeVar("T")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # the paper's trigger images are 32 x 32, CIFAR's too
MAX_FILE_BYTES = 64 << 20  # a 4096 x 4096 RGB bitmap is 48 MiB

# Pillow's own bound, checked when a header is read, is ours: it refuses images over twice
# the bound and only warns between; make that warning an error too (`read_rgb` also checks the
# size itself, for a caller whose warning filters were reset).
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def _too_large(where: str, what: str) -> TicketctlError:
    return TicketctlError(f"{where}: {what}, more than the {MAX_SIDE}x{MAX_SIDE} pixels (or "
                          f"{MAX_FILE_BYTES >> 20} MiB) an image may have; resize it")


def read_image(path: str | Path, process: Callable[[Image.Image], T],
               where: str | None = None) -> T:
    """Open an image file, its size checked before anything is decoded, and return
    `process(image)` (decoding happens there, inside the same error handling). `where` names
    it in errors (default: the path)."""
    p = Path(path)
    where = where or str(p)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _too_large(where, f"the file holds {size:,} bytes")
        with Image.open(p, formats=FORMATS) as image:
            w, h = image.size
            if w * h > MAX_PIXELS:
                raise _too_large(where, f"the image claims {w}x{h} pixels")
            return process(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        claimed = re.search(r"\((\d+) pixels\)", str(e))  # Pillow names the pixel count
        raise _too_large(where, f"the image claims {int(claimed[1]):,} pixels" if claimed
                         else "the image claims too many pixels") from None
    except Image.UnidentifiedImageError:
        raise TicketctlError(f"{where} is not a readable image ({', '.join(FORMATS)})") \
            from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt data
        raise TicketctlError(f"cannot read image {where}: {first_line(e)}") from None


def read_rgb(path: str | Path, where: str | None = None) -> np.ndarray:
    """An image file as H x W x 3 uint8, its size checked before it is decoded. `where` names
    it in errors (default: the path)."""
    return read_image(path, lambda image: np.asarray(image.convert("RGB")), where)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels."""
    return read_image(path, lambda image: image.size)
