"""Scheme V2: write a QR code into the mask of a ticket, and read it back.

A layer's mask is read as a grid of modules, one per block of weights (protect/blocks.py): a
conv mask [out, in, kh, kw] is squeezed to its channel grid [out, in], one module per kernel
(the paper); a linear or 1x1 conv mask is cut into blocks of `support` weights, a depthwise
one into kernel rows. A module is dark when its block keeps any weight. Only the code's data
modules are written (the verifier fills in the function patterns itself). Unlike the
authors' code:

- a dark module keeps at least `support` weights of its block, so pruning one weight rarely
  flips it (a module backed by m weights flips under q pruning with probability ~q^m);
- the overall density stays exactly equal: whatever the region gained or lost is removed from
  the lowest-magnitude weights, or restored, outside the signed region;
- the layer and offset are chosen to need the fewest changes, and recorded, so verification
  never has to search."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ticketctl.artifacts import Kind, Mask, Ticket
from ticketctl.artifacts.mask import is_clean, kept_count, mark_clean, remember_floor
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.blocks import Blocks, auto_blocks, kernel_blocks
from ticketctl.protect.qr import QRCode, encode, function_module_map
from ticketctl.threads import map_on_cores


@dataclass(frozen=True)
class Placement:
    """Where a copy of the code sits: its top-left module in a layer's module grid, and the
    grid itself (`view` and `block`, see protect/blocks.py). Receipts written before blocks
    existed record neither: their grid is the layer's kernel grid."""

    layer: str
    row: int  # first module row of the region (an output channel in a kernel grid)
    col: int  # first module column (an input channel in a kernel grid)
    view: tuple[int, int] | None = None
    block: tuple[int, int] | None = None

    def region(self, n: int) -> tuple[slice, slice]:
        return slice(self.row, self.row + n), slice(self.col, self.col + n)

    def blocks(self, shape: Sequence[int]) -> Blocks:
        """The module grid this placement reads on a weight of `shape`."""
        if self.view is None or self.block is None:
            return kernel_blocks(shape)
        return Blocks(tuple(self.view), tuple(self.block))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "row": self.row, "col": self.col}
        if self.view is not None and self.block is not None:
            out.update(view=list(self.view), block=list(self.block))
        return out


@dataclass
class EmbedReport:
    placements: list[Placement]
    modules_changed: int  # data modules whose block changed state
    weights_added: int  # inside the regions (support and new dark modules)
    weights_removed: int  # inside the regions (new light modules)
    compensated: int  # weights removed (+) or restored (-) outside the regions
    density_before: float
    density_after: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placements"] = [p.to_json() for p in self.placements]
        return d


def grid(mask: torch.Tensor, blocks: Blocks | None = None) -> np.ndarray:
    """Kept-weight count per module: by default per kernel, [out, in] (a linear weight is its
    own 1x1 kernel)."""
    return (blocks or kernel_blocks(mask.shape)).counts(mask)


def candidate_layers(masks: Mapping[str, torch.Tensor], n: int,
                     support: int = 3) -> list[tuple[str, Blocks]]:
    """Every masked layer whose module grid (at its blocks for `support`) holds an n x n
    code, lowest layer first, with those blocks."""
    out = []
    for name, m in masks.items():
        b = auto_blocks(m.shape, support)
        if b is not None and b.holds(n):
            out.append((name, b))
    return out


def _largest_grid(masks: Mapping[str, torch.Tensor], support: int) -> str:
    """The masked layer with the largest module grid (by the code it could hold), in words."""
    grids = [(min(b.grid), b.grid[0] * b.grid[1], -i, name, b)
             for i, (name, m) in enumerate(masks.items())
             if (b := auto_blocks(m.shape, support)) is not None]
    if not grids:
        return "largest grid found: none (no masked layer has two dimensions)"
    *_, name, b = max(grids)
    return (f"largest grid found: {b.grid[0]}x{b.grid[1]} in {name} (blocks of "
            f"{b.block[0]}x{b.block[1]} weights)")


def correlate(grid: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """out[r, c] = sum of grid[r + i, c + j] * kernel[i, j] at every offset where the kernel
    fits the grid, by FFT (numpy's: SciPy's signal module takes seconds to import). A
    circular correlation on the grid's own size: offsets that fit never wrap."""
    h, w = grid.shape
    kh, kw = kernel.shape
    spectrum = np.fft.rfft2(grid.astype(np.float64))
    kernel_spectrum = np.fft.rfft2(kernel.astype(np.float64), s=(h, w))
    return np.fft.irfft2(spectrum * np.conj(kernel_spectrum), s=(h, w))[:h - kh + 1,
                                                                         :w - kw + 1]


def placement_costs(dark: np.ndarray, code: np.ndarray, data: np.ndarray) -> np.ndarray:
    """For every offset, how many data modules differ between the grid and the code:
    wanted dark but light plus wanted light but dark, i.e. (wanted dark) + the grid
    correlated with (wanted light - wanted dark)."""
    want_dark = code & data
    kernel = (~code & data).astype(np.float64) - want_dark
    return np.rint(want_dark.sum() + correlate(dark, kernel)).astype(np.int64)


def layers_for(masks: Mapping[str, torch.Tensor], n: int, version: int, support: int = 3,
               layer: str | None = None, sized: bool = False) -> list[tuple[str, Blocks]]:
    """The layers an n x n code may go to (`layer` alone when given), with their blocks; a
    one-line error when none can hold it. `sized`: the code's version was asked for (else it
    is the smallest that holds the message)."""
    which = f"a version-{version} code" + ("" if sized else " (the smallest that holds the "
                                           "message)")
    if layer is not None:
        if layer not in masks:
            names = [k for k, _ in candidate_layers(masks, n, support)]
            raise TicketctlError(f"--layer {layer!r} is not a masked layer; candidates: "
                                 f"{', '.join(names) or 'none'}")
        b = auto_blocks(masks[layer].shape, support)
        if b is None or not b.holds(n):
            grid_words = b.describe() if b is not None else "no grid (fewer than 2 dimensions)"
            raise TicketctlError(f"--layer {layer!r} has {grid_words}, too small for {which} "
                                 f"({n}x{n} modules)")
        return [(layer, b)]
    layers = candidate_layers(masks, n, support)
    if not layers:
        raise TicketctlError(
            f"no layer can hold {which}: it needs a grid of {n}x{n} modules "
            f"({_largest_grid(masks, support)}); use a shorter message or a larger model")
    return layers


def choose_placements(masks: Mapping[str, torch.Tensor], qr: QRCode, layer: str | None = None,
                      copies: int = 1, support: int = 3, sized: bool = False
                      ) -> list[Placement]:
    """The cheapest offset in each of the `copies` lowest layers that hold the code at their
    block size."""
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    layers = layers_for(masks, n, qr.version, support, layer, sized)
    if copies > len(layers):
        raise TicketctlError(f"--copies {copies} needs {copies} layers with a grid of {n}x{n} "
                             f"modules; only {len(layers)} have one")
    best = []
    for depth, (name, b) in enumerate(layers[:copies]):
        cost = placement_costs(grid(masks[name], b) > 0, qr.matrix, data)
        r, c = np.unravel_index(int(np.argmin(cost)), cost.shape)
        best.append((int(cost[r, c]), depth, Placement(name, int(r), int(c), b.view, b.block)))
    # Lower layers first: under global magnitude pruning they lose fewest weights (larger
    # weights, fewer inputs per channel), so their code survives pruning best; within a
    # layer the offset needing the fewest changes.
    best.sort(key=lambda t: (t[1], t[0]))
    return [p for _, _, p in best[:copies]]


def _value_range(layer_w: torch.Tensor, kept: torch.Tensor) -> tuple[float, float]:
    """The layer's median and 90th-percentile kept |w|: where new connections' magnitudes lie
    when no true values are known (the paper's random connections, sized so the owner's
    magnitude-floor defence never removes them)."""
    mags = layer_w[kept].abs().double().numpy()
    if not mags.size:
        return 0.05, 0.1
    lo, hi = np.quantile(mags, [0.5, 0.9])  # numpy: no size limit, unlike torch.quantile
    return float(lo), float(hi)


def _new_values(lo: float, hi: float, count: int, gen: torch.Generator,
                dtype: torch.dtype) -> torch.Tensor:
    """Random signs, magnitudes uniform in [lo, hi]."""
    m = lo + (hi - lo) * torch.rand(count, generator=gen)
    s = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
    return (m * s).to(dtype)


def embed(ticket: Ticket, qr: QRCode, placements: list[Placement], support: int = 3,
          seed: int = 0, values: dict[str, torch.Tensor] | None = None,
          in_place: bool = False) -> tuple[Ticket, EmbedReport]:
    """Write the code's data modules into each placement; keep the density exactly equal.

    values: full (unpruned) weights to take new connections from, e.g. the rewind point of
    the `find` run; without them new connections get random weights.
    in_place: change `ticket`'s own tensors instead of copies of the layers that change (for
    a caller that has no further use for the unsigned ticket: a file read only to be signed,
    whose untouched pages then stay the file's)."""
    parent = ticket.tensors_sha256()
    state, masks, report = write_code(ticket.state, ticket.mask, qr, placements, support,
                                      seed, values, in_place=in_place)
    # the layers the code left alone are shared with `ticket`, not copied: write_code copies
    # a layer before it changes it (unless in place)
    signed = ticket.derive(state=state, mask=Mask(masks, copy=False), kind=Kind.SIGNED,
                           extra={**ticket.extra, "signed_from": parent})
    return signed, report


def _kept(masks: Mapping[str, torch.Tensor]) -> int:
    return sum(kept_count(m) for m in masks.values())


def write_code(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor],
               qr: QRCode, placements: list[Placement], support: int = 3, seed: int = 0,
               values: Mapping[str, torch.Tensor] | None = None, in_place: bool = False
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], EmbedReport]:
    """`embed` on weights and masks alone (any network): new dicts with the code written and
    the number of kept weights unchanged. A light module empties its block; a dark one keeps
    at least `support` weights of it (all of them when the block is smaller). A layer is
    copied before it is changed (changed where it is with `in_place`); the others are the
    caller's tensors, untouched."""
    if support < 1:
        raise TicketctlError(f"--support must be at least 1, got {support}")
    gen = torch.Generator().manual_seed(seed)
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    state, masks = dict(state), dict(masks)
    clean = {k for k in masks if is_clean(state[k], masks[k])}  # pruned weights +0.0
    owned: set[str] = set()

    def own(k: str) -> None:  # copy a layer (weights and mask) before its first change
        if k not in owned:
            if not in_place or not (state[k].is_contiguous() and masks[k].is_contiguous()):
                state[k], masks[k] = state[k].clone().contiguous(), masks[k].clone().contiguous()
            owned.add(k)

    for p in placements:
        own(p.layer)
    kept_before = _kept(masks)
    # the regions' blocks, in the signed layers
    protected = {p.layer: torch.zeros_like(masks[p.layer]) for p in placements}
    added = removed = changed = 0
    for p in placements:
        w, m = state[p.layer], masks[p.layer]
        b = p.blocks(m.shape)
        rows, cols = p.region(n)
        counts = b.counts(m)[rows, cols]
        b.modules(protected[p.layer])[rows, cols] = True
        flat_w, flat_m = w.view(-1), m.view(-1)
        lo, hi = _value_range(w, m)
        src = values[p.layer].reshape(-1) if values is not None else None
        for i, j in zip(*np.nonzero(data), strict=True):
            ids = b.indices(p.row + int(i), p.col + int(j))
            if qr.matrix[i, j]:
                need = min(support, len(ids)) - int(counts[i, j])
                if counts[i, j] == 0:
                    changed += 1
                if need > 0:
                    free = ids[~flat_m[ids]]
                    if src is not None:
                        pick = free[torch.argsort(src[free].abs(), descending=True,
                                                  stable=True)[:need]]
                        new = src[pick].to(w.dtype)
                    else:
                        pick = free[torch.randperm(len(free), generator=gen)[:need]]
                        new = _new_values(lo, hi, len(pick), gen, w.dtype)
                    flat_m[pick] = True
                    flat_w[pick] = new
                    added += len(pick)
            elif counts[i, j] > 0:
                removed += int(counts[i, j])
                changed += 1
                flat_m[ids] = False
                flat_w[ids] = 0
    delta = added - removed
    _compensate(state, masks, protected, delta, gen, values, own)
    if _kept(masks) != kept_before:
        raise RuntimeError("density compensation failed")  # a bug, not bad input
    for k in owned & clean:  # every change zeroed what it pruned: still +0.0 there
        mark_clean(state[k], masks[k])
    total = sum(m.numel() for m in masks.values())
    density = kept_before / total if total else 1.0
    return state, masks, EmbedReport(list(placements), changed, added, removed, delta,
                                     density, density)


def _extremes(layers: list[str],
              candidates: Callable[[str], tuple[torch.Tensor, torch.Tensor]], k: int,
              largest: bool, left: dict[str, float | None] | None = None
              ) -> dict[str, torch.Tensor]:
    """Per layer, the flat positions among the k largest (smallest) scores over all layers;
    `candidates(layer)` gives a layer's candidate positions and their scores. Each layer's
    own k best hold the overall k best, so nothing the size of the whole model is
    concatenated, and the layers are scanned on every core (their gathers free the GIL).
    `left`, when given, gets for each layer the best score it has left outside the chosen
    (None when nothing is left), where its k + 1 best tell."""
    def best_of(name: str) -> tuple[str, torch.Tensor, torch.Tensor, int]:
        where, score = candidates(name)
        top = torch.topk(score, min(k + 1, len(score)), largest=largest, sorted=False).indices
        return name, where[top], score[top].double(), len(score)

    tops = map_on_cores(best_of, layers)
    names, pos, vals, spans = [], [], [], {}
    for name, where, score, total in tops:
        spans[name] = (len(names), len(score), total)
        names += [name] * len(score)
        pos.append(where)
        vals.append(score)
    every = torch.cat(vals)
    best = torch.topk(every, k, largest=largest, sorted=False).indices.tolist()
    flat_pos = torch.cat(pos)
    out: dict[str, list[int]] = {}
    for i in best:
        out.setdefault(names[i], []).append(int(flat_pos[i]))
    if left is not None:
        chosen = torch.zeros(len(every), dtype=torch.bool)
        chosen[best] = True
        for name, (start, n, total) in spans.items():
            rest = every[start:start + n][~chosen[start:start + n]]
            if len(rest):
                left[name] = float(rest.max() if largest else rest.min())
            elif n == total:  # every candidate the layer had was chosen
                left[name] = None
    return {name: torch.tensor(p, dtype=torch.long) for name, p in out.items()}


def _random_free(masks: dict[str, torch.Tensor], protected: dict[str, torch.Tensor],
                 count: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """`count` distinct pruned positions outside the regions, uniformly over the model: drawn
    over every position and kept when free (most are, in a ticket), exact when that falls
    short."""
    names = list(masks)
    bounds = torch.tensor([0] + [masks[k].numel() for k in names]).cumsum(0)
    draw = torch.randint(0, int(bounds[-1]), (4 * count,), generator=gen).unique()
    draw = draw[torch.randperm(len(draw), generator=gen)]
    layer = torch.searchsorted(bounds, draw, right=True) - 1
    ok = torch.zeros(len(draw), dtype=torch.bool)
    for i, k in enumerate(names):
        sel = layer == i
        local = draw[sel] - bounds[i]
        ok[sel] = ~masks[k].view(-1)[local]
        if k in protected:
            ok[sel] &= ~protected[k].view(-1)[local]
    draw, layer = draw[ok][:count], layer[ok][:count]
    if len(draw) < count:  # tiny or dense layers: an exact draw
        every = torch.cat([torch.nonzero(
            (~masks[k] & ~protected[k] if k in protected else ~masks[k]).view(-1)).squeeze(1) +
            bounds[i] for i, k in enumerate(names)])
        draw = every[torch.randperm(len(every), generator=gen)[:count]]
        layer = torch.searchsorted(bounds, draw, right=True) - 1
    return {k: draw[layer == i] - bounds[i] for i, k in enumerate(names)
            if bool((layer == i).any())}


def _compensate(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                protected: dict[str, torch.Tensor], delta: int, gen: torch.Generator,
                values: Mapping[str, torch.Tensor] | None,
                own: Callable[[str], None] = lambda k: None) -> None:
    """Remove `delta` lowest-magnitude kept weights outside the regions (delta > 0), or
    restore -delta pruned ones there (delta < 0): by largest true value when known, else at
    random positions with random weights. Changes `state` and `masks` (contiguous) in
    place, calling `own(layer)` before it changes a layer."""
    if delta == 0:
        return

    def free(k: str, kept: bool) -> torch.Tensor:  # kept (or pruned) outside the regions
        m = masks[k] if kept else ~masks[k]
        return m & ~protected[k] if k in protected else m

    if delta > 0:
        have = sum(int(torch.count_nonzero(free(k, True))) for k in masks)
        if have < delta:
            raise TicketctlError(
                f"the ticket is too sparse to carry this code: keeping its density needs "
                f"{delta} kept weights outside the code and it has {have}; sign a denser "
                "ticket (an earlier round) or lower --support")

        def smallest(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            where = torch.nonzero(free(k, True).view(-1)).squeeze(1)
            return where, state[k].view(-1)[where].abs()

        # each layer's smallest kept |w| left outside the regions: its magnitude floor for
        # the receipt, so the floor needs no second pass over the model
        floors: dict[str, float | None] = {}
        for k, pos in _extremes(list(masks), smallest, delta, largest=False,
                                left=floors).items():
            own(k)
            masks[k].view(-1)[pos] = False
            state[k].view(-1)[pos] = 0
        for k, value in floors.items():
            if k not in protected:
                remember_floor(state[k], masks[k], value)
        return
    need = -delta
    have = sum(int(torch.count_nonzero(free(k, False))) for k in masks)
    if have < need:
        raise TicketctlError(
            f"the ticket is too dense to carry this code: keeping its density needs {need} "
            f"pruned weights outside the code and it has {have}; sign a sparser ticket")
    if values is not None:
        def largest(k: str) -> tuple[torch.Tensor, torch.Tensor]:
            where = torch.nonzero(free(k, False).view(-1)).squeeze(1)
            return where, values[k].reshape(-1)[where].abs()

        for k, pos in _extremes(list(masks), largest, need, largest=True).items():
            own(k)
            state[k].view(-1)[pos] = values[k].reshape(-1)[pos].to(state[k].dtype)
            masks[k].view(-1)[pos] = True
        return
    # their scale: the median kept |w|, read on every step-th weight (about a million)
    step = max(1, sum(m.numel() for m in masks.values()) >> 20)
    kept = torch.cat([state[k].view(-1)[::step][masks[k].view(-1)[::step]].abs()
                      for k in masks])
    scale = float(kept.median()) if kept.numel() else 0.05
    for k, pos in _random_free(masks, protected, need, gen).items():
        own(k)
        state[k].view(-1)[pos] = (torch.randn(len(pos), generator=gen) * scale).to(
            state[k].dtype)
        masks[k].view(-1)[pos] = True


def observed_region(mask: torch.Tensor, placement: Placement, n: int) -> np.ndarray:
    """Kept-weight counts of the region's modules (a module reads dark when > 0)."""
    b = placement.blocks(mask.shape)
    if not b.fits(mask.shape):
        raise CheckFailed(f"the receipt is for another ticket: layer {placement.layer} has "
                          f"{mask.numel()} weights, the receipt reads it as a "
                          f"{b.view[0]}x{b.view[1]} matrix")
    g = b.counts(mask)
    if g.shape[0] < placement.row + n or g.shape[1] < placement.col + n:
        raise CheckFailed(f"the receipt is for another ticket: layer {placement.layer} "
                          f"({g.shape[0]}x{g.shape[1]}) cannot hold the recorded region at "
                          f"({placement.row}, {placement.col})")
    rows, cols = placement.region(n)
    return g[rows, cols]


def extract(masks: dict[str, torch.Tensor], placements: list[Placement], version: int,
            mask_pattern: int, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Module matrix read from the placements (module-wise majority over copies; a tie reads
    dark, since pruning only ever turns dark modules light), with the function patterns
    filled in from the standard. A module reads dark when its block keeps at least
    `min_count` weights: a signed dark module has `support` of them, a weight revived by an
    add-on attack only one. Returns (matrix, per-module dark votes)."""
    filler = encode("", version=version, mask_pattern=mask_pattern).matrix
    n = filler.shape[0]
    votes = np.zeros((n, n), dtype=np.int64)
    for p in placements:
        if p.layer not in masks:
            raise TicketctlError(f"the model has no masked layer {p.layer!r}")
        votes += observed_region(masks[p.layer], p, n) >= min_count
    matrix = 2 * votes >= len(placements)
    func = function_module_map(version)
    matrix[func] = filler[func]
    return matrix, votes
