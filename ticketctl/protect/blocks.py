"""Which weights back a QR module: a layer's weight read as a grid of blocks.

Scheme V2 writes one module per block of weights; a module reads dark when its block keeps
weights. Any weight tensor has one 2-D view: flattened in row-major order, its first
`rows x cols` elements read as a `rows x cols` matrix, cut into `block rows x block cols`
blocks from the top left (a remainder that fills no whole block is outside the grid). The
mapping is chosen from the shape alone, so the owner, a verifier and a blind scan agree on it:

- a conv with kernels of k > 1 weights and more than one input channel (a 3x3 conv): the
  view is [out, in x k] and a block is one kernel [1, k], so the grid is the channel grid
  [out, in] of the paper and of receipts written before blocks existed;
- a linear weight or a 1x1 conv [out, in]: the view is [out, in] and a block holds exactly
  `support` weights ([1, s], [s, 1] or another factorisation), the one whose grid holds the
  largest code, so a dark module can be backed by `support` weights as in a kernel;
- a depthwise conv [C, 1, kh, kw] (one input channel): a block is a kernel row (kw weights)
  when it holds `support` of them, else the whole kernel; the channels are folded, f to a
  view row ([C // f, f x kh x kw]), with f chosen to make the grid as square as possible.
  The last C mod f channels are outside the grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Blocks:
    """A layer's weight as a grid of modules: the 2-D `view` [rows, cols] of the flattened
    weight, cut into blocks of `block` [rows, cols] weights."""

    view: tuple[int, int]
    block: tuple[int, int]

    @property
    def grid(self) -> tuple[int, int]:
        """The module grid [rows, cols]."""
        return self.view[0] // self.block[0], self.view[1] // self.block[1]

    @property
    def size(self) -> int:
        """Weights per block: the most a module can be backed by."""
        return self.block[0] * self.block[1]

    def holds(self, n: int) -> bool:
        """Whether an n x n code fits the grid."""
        return min(self.grid) >= n

    def fits(self, shape: Sequence[int]) -> bool:
        """Whether a weight of `shape` has the elements the view reads."""
        return self.view[0] * self.view[1] <= math.prod(shape)

    def modules(self, t: torch.Tensor) -> torch.Tensor:
        """[grid rows, grid cols, block rows, block cols]: a view of `t`'s storage when `t` is
        contiguous (writes through it change `t`), a copy otherwise."""
        (rows, cols), (br, bc) = self.view, self.block
        gr, gc = self.grid
        flat = t.reshape(-1)[: rows * cols].view(rows, cols)
        return flat[: gr * br, : gc * bc].unflatten(1, (gc, bc)).unflatten(0, (gr, br)) \
            .permute(0, 2, 1, 3)

    def indices(self, row: int, col: int) -> torch.Tensor:
        """Flat positions in the weight of module (row, col)'s weights, block row by block
        row (for a kernel grid: the kernel's own order)."""
        (br, bc), cols = self.block, self.view[1]
        r = torch.arange(row * br, row * br + br)
        c = torch.arange(col * bc, col * bc + bc)
        return (r[:, None] * cols + c[None, :]).reshape(-1)

    def counts(self, mask: torch.Tensor) -> np.ndarray:
        """Kept weights per module, [grid rows, grid cols]."""
        return self.modules(mask).sum((2, 3), dtype=torch.int64).numpy()

    def describe(self) -> str:
        """A few words for messages: the grid and what one module is."""
        return (f"{self.grid[0]}x{self.grid[1]} modules of {self.block[0]}x{self.block[1]} "
                "weights")

    def to_json(self) -> dict[str, list[int]]:
        return {"view": list(self.view), "block": list(self.block)}


def _kernel(shape: Sequence[int]) -> int:
    return math.prod(shape[2:]) if len(shape) > 2 else 1


def kernel_blocks(shape: Sequence[int]) -> Blocks:
    """One module per kernel ([out, in] channel grid; a linear weight's module is one weight):
    the mapping of receipts that record none."""
    out = max(1, shape[0])
    return Blocks((out, math.prod(shape) // out), (1, _kernel(shape)))


def auto_blocks(shape: Sequence[int], support: int) -> Blocks | None:
    """The mapping for a weight of `shape` when dark modules keep `support` weights (see the
    module docstring); None for a tensor of fewer than two dimensions."""
    if support < 1:
        raise ValueError(f"support must be at least 1, got {support}")
    if len(shape) < 2 or min(shape) < 1:
        return None
    out, inputs, k = shape[0], shape[1], _kernel(shape)
    if k > 1 and inputs > 1:
        return kernel_blocks(shape)
    if k == 1:
        blocks = [Blocks((out, inputs), (a, support // a))
                  for a in range(1, support + 1) if support % a == 0]
        # the largest code, then the most modules, then blocks along a row (contiguous)
        return max(blocks, key=lambda b: (min(b.grid), b.grid[0] * b.grid[1], b.block[1]))
    kw = shape[-1]
    unit = kw if kw >= support else k  # a kernel row, or the whole kernel

    def folded(f: int) -> Blocks:  # grid [out // f, f x (modules per channel)]
        return Blocks((out // f, f * k), (1, unit))

    return max((folded(f) for f in range(1, out + 1)),
               key=lambda b: (min(b.grid), b.grid[0] * b.grid[1], -b.view[1]))


def candidate_blocks(shape: Sequence[int], supports: Sequence[int]) -> list[Blocks]:
    """The distinct mappings a scan tries on a layer: the automatic one at each support (at
    support 1 a linear or 1x1 conv weight is its kernel grid, one weight per module)."""
    out: list[Blocks] = []
    for b in (auto_blocks(shape, s) for s in supports):
        if b is not None and b not in out:
            out.append(b)
    return out
