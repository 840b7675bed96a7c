"""Where things sit in a level-H QR symbol (ISO/IEC 18004): function modules, the data
placement order, the mask, and the Reed-Solomon block structure.

The verifier of scheme V2 only embeds data-bearing modules and fills the function patterns in
itself, so it needs these maps without building a symbol; everything here is derived from the
standard's rules plus the ``qrcode`` package's tables (alignment centres, block structure,
mask conditions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import qrcode.base
import qrcode.constants
import qrcode.util

from ticketctl.errors import TicketctlError

EC_LEVEL = qrcode.constants.ERROR_CORRECT_H
"""The level scheme V2 uses: H tolerates the most damage (about 30% of codewords)."""

MIN_VERSION = 1
MAX_VERSION = 40


def check_version(version: int) -> int:
    """Reject anything but an int in 1..40 with a usable message (the tables stop there)."""
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)):
        raise TicketctlError(f"QR version must be an integer 1-40, got {version!r}; pass 1-40")
    if not MIN_VERSION <= int(version) <= MAX_VERSION:
        raise TicketctlError(f"QR version {version} is out of range; pass a version from 1 to 40")
    return int(version)


def check_mask_pattern(mask_pattern: int) -> int:
    """Reject anything but an int in 0..7 (the standard defines eight mask patterns)."""
    if isinstance(mask_pattern, bool) or not isinstance(mask_pattern, (int, np.integer)):
        raise TicketctlError(
            f"QR mask pattern must be an integer 0-7, got {mask_pattern!r}; pass 0-7"
        )
    if not 0 <= int(mask_pattern) <= 7:
        raise TicketctlError(f"QR mask pattern {mask_pattern} is out of range; pass 0-7")
    return int(mask_pattern)


def size(version: int) -> int:
    """Modules per side: 17 + 4 * version (no quiet zone)."""
    return 17 + 4 * check_version(version)


def _read_only(array: np.ndarray) -> np.ndarray:
    """Cached maps are shared between callers, so nobody may edit them in place."""
    array.setflags(write=False)
    return array


@cache
def _function_module_map(version: int) -> np.ndarray:
    n = size(version)
    fmap = np.zeros((n, n), dtype=bool)
    # Finder patterns (7x7) with their one-module separators: an 8x8 square at three corners.
    fmap[:8, :8] = True
    fmap[:8, n - 8:] = True
    fmap[n - 8:, :8] = True
    # Timing patterns: row 6 and column 6 between the finders (the rest is already marked).
    fmap[6, :] = True
    fmap[:, 6] = True
    # Alignment patterns: 5x5 around every pair of centre coordinates, except the ones that
    # would overlap a finder pattern.
    centres = qrcode.util.pattern_position(version)
    for row in centres:
        for col in centres:
            in_finder = (row < 8 or row >= n - 8) and (col < 8 or col >= n - 8)
            if in_finder and not (row >= n - 8 and col >= n - 8):
                continue
            fmap[row - 2:row + 3, col - 2:col + 3] = True
    # Format information: 15 bits twice (around the top-left finder, and split between the
    # top-right and bottom-left finders), plus the always-dark module at (4V + 9, 8).
    fmap[8, :9] = True
    fmap[:9, 8] = True
    fmap[8, n - 8:] = True
    fmap[n - 8:, 8] = True
    # Version information (version 7 and up): two 6x3 blocks next to the top-right and
    # bottom-left finders.
    if version >= 7:
        fmap[:6, n - 11:n - 8] = True
        fmap[n - 11:n - 8, :6] = True
    return _read_only(fmap)


def function_module_map(version: int) -> np.ndarray:
    """bool [n, n], True for function modules (finders with separators, timing, alignment,
    format and version information, dark module): the verifier fills these in itself, so only
    the other modules carry the owner's message."""
    return _function_module_map(check_version(version)).copy()


@cache
def _data_module_order(version: int) -> np.ndarray:
    n = size(version)
    fmap = _function_module_map(version)
    order: list[tuple[int, int]] = []
    upward = True
    right = n - 1
    while right > 0:
        if right == 6:  # the vertical timing pattern is skipped as a whole column
            right = 5
        rows = range(n - 1, -1, -1) if upward else range(n)
        for row in rows:
            for col in (right, right - 1):
                if not fmap[row, col]:
                    order.append((row, col))
        upward = not upward
        right -= 2
    return _read_only(np.asarray(order, dtype=np.int64).reshape(-1, 2))


def data_module_order(version: int) -> np.ndarray:
    """int [num_data_modules, 2]: (row, col) of every data module (remainder bits included, at
    the end) in placement order, a two-column zigzag from the bottom-right that skips the
    vertical timing column 6; bit k of the codeword stream (MSB first) sits at entry k."""
    return _data_module_order(check_version(version)).copy()


@cache
def _mask_matrix(version: int, mask_pattern: int) -> np.ndarray:
    n = size(version)
    condition = qrcode.util.mask_func(mask_pattern)
    rows, cols = np.indices((n, n))
    out = np.vectorize(condition, otypes=[bool])(rows, cols)
    return _read_only(out)


def mask_matrix(version: int, mask_pattern: int) -> np.ndarray:
    """bool [n, n], True where the mask pattern inverts a data module (function modules are
    never masked by the standard; this map simply ignores that distinction)."""
    return _mask_matrix(check_version(version), check_mask_pattern(mask_pattern)).copy()


@dataclass(frozen=True)
class BlockLayout:
    """Reed-Solomon block structure at level H: which stream positions belong to which block,
    so a reader can de-interleave and a writer can re-interleave."""

    version: int
    data_counts: tuple[int, ...]
    ec_count: int
    positions: tuple[tuple[int, ...], ...]  # per block: stream index of each codeword
    total_codewords: int
    remainder_bits: int

    @property
    def data_codewords(self) -> int:
        """Data codewords in the whole symbol (capacity before the mode header)."""
        return sum(self.data_counts)


@cache
def _block_layout(version: int) -> BlockLayout:
    blocks = qrcode.base.rs_blocks(version, EC_LEVEL)
    data_counts = tuple(b.data_count for b in blocks)
    ec_counts = {b.total_count - b.data_count for b in blocks}
    if len(ec_counts) != 1:  # the standard uses one EC count per version and level
        raise TicketctlError(f"QR version {version}: inconsistent EC block table; report a bug")
    ec_count = ec_counts.pop()
    # Interleaving: data codeword i of every block in turn (blocks that are one codeword
    # shorter drop out at the end), then EC codeword i of every block in turn.
    slots: list[list[int]] = [[] for _ in blocks]
    index = 0
    for i in range(max(data_counts)):
        for b, count in enumerate(data_counts):
            if i < count:
                slots[b].append(index)
                index += 1
    for _ in range(ec_count):
        for b in range(len(blocks)):
            slots[b].append(index)
            index += 1
    n = size(version)
    data_modules = n * n - int(_function_module_map(version).sum())
    remainder = data_modules - 8 * index
    if not 0 <= remainder < 8:
        raise TicketctlError(f"QR version {version}: layout does not add up; report a bug")
    return BlockLayout(version, data_counts, ec_count, tuple(tuple(s) for s in slots), index,
                       remainder)


def block_layout(version: int) -> BlockLayout:
    """The level-H block structure of a version (from ``qrcode.base.rs_blocks``)."""
    return _block_layout(check_version(version))


def count_bits(version: int) -> int:
    """Width of the byte-mode character count: 8 bits for versions 1-9, 16 for 10-40."""
    return qrcode.util.length_in_bits(qrcode.util.MODE_8BIT_BYTE, check_version(version))


def capacity_bytes(version: int) -> int:
    """Byte-mode capacity at level H: data bits minus the 4-bit mode and the count field."""
    layout = block_layout(version)
    return (8 * layout.data_codewords - 4 - count_bits(version)) // 8
