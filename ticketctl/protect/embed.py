"""Scheme V2: write a QR code into the mask of a ticket, and read it back.

A conv mask [out, in, kh, kw] is squeezed to its channel grid [out, in]: a module is dark when
its kernel keeps any weight. Only the code's data modules are written (the verifier fills in
the function patterns itself). Unlike the authors' code:

- a dark module keeps at least `support` weights of its kernel, so pruning one weight rarely
  flips it (a module backed by m weights flips under q pruning with probability ~q^m);
- the overall density stays exactly equal: whatever the region gained or lost is removed from
  the lowest-magnitude weights, or restored, outside the signed region;
- the layer and offset are chosen to need the fewest changes, and recorded, so verification
  never has to search."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ticketctl.artifacts import Kind, Mask, Ticket
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.qr import QRCode, encode, function_module_map


@dataclass(frozen=True)
class Placement:
    layer: str
    row: int  # first output channel of the region
    col: int  # first input channel of the region

    def region(self, n: int) -> tuple[slice, slice]:
        return slice(self.row, self.row + n), slice(self.col, self.col + n)


@dataclass
class EmbedReport:
    placements: list[Placement]
    modules_changed: int  # data modules whose kernel changed state
    weights_added: int  # inside the regions (support and new dark modules)
    weights_removed: int  # inside the regions (new light modules)
    compensated: int  # weights removed (+) or restored (-) outside the regions
    density_before: float
    density_after: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["placements"] = [asdict(p) for p in self.placements]
        return d


def grid(mask: torch.Tensor) -> np.ndarray:
    """Kept-weight count per kernel: [out, in] (a linear weight is its own 1x1 kernel)."""
    m = mask.reshape(mask.shape[0], mask.shape[1], -1) if mask.dim() > 2 else \
        mask.reshape(*mask.shape, 1)
    return m.sum(-1).numpy().astype(np.int64)


def candidate_layers(ticket: Ticket, n: int) -> list[str]:
    """Masked layers whose channel grid holds an n x n code, lowest layer first."""
    return [k for k, m in ticket.mask.items() if m.dim() >= 2 and m.shape[0] >= n
            and m.shape[1] >= n]


def placement_costs(dark: np.ndarray, code: np.ndarray, data: np.ndarray) -> np.ndarray:
    """For every offset, how many data modules differ between the grid and the code."""
    want_dark = (code & data).astype(np.float64)
    want_light = (~code & data).astype(np.float64)
    g = dark.astype(np.float64)
    from scipy.signal import correlate  # seconds to import: only when signing

    # differ = wanted dark but light + wanted light but dark
    cost = want_dark.sum() - correlate(g, want_dark, mode="valid", method="fft") + \
        correlate(g, want_light, mode="valid", method="fft")
    return np.rint(cost).astype(np.int64)


def choose_placements(ticket: Ticket, qr: QRCode, layer: str | None = None,
                      copies: int = 1) -> list[Placement]:
    """The cheapest offset in each of the `copies` lowest layers that hold the code."""
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    layers = candidate_layers(ticket, n)
    if not layers:
        biggest = max((tuple(m.shape[:2]) for m in ticket.mask.values() if m.dim() >= 2),
                      default=None)
        raise TicketctlError(
            f"no layer has a channel grid of at least {n}x{n} for a version-{qr.version} code"
            f" (largest grid found: {'x'.join(map(str, biggest)) if biggest else 'none'}); "
            "use a shorter message or a larger model")
    if layer is not None:
        if layer not in ticket.mask:
            raise TicketctlError(f"--layer {layer!r} is not a masked layer; candidates: "
                                 f"{', '.join(layers)}")
        if layer not in layers:
            raise TicketctlError(f"--layer {layer!r} has grid {list(ticket.mask[layer].shape[:2])}"
                                 f", too small for a {n}x{n} code")
        layers = [layer]
    if copies > len(layers):
        raise TicketctlError(f"--copies {copies} needs {copies} layers with a {n}x{n} grid; "
                             f"only {len(layers)} have one")
    best = []
    for depth, name in enumerate(layers[:copies]):
        cost = placement_costs(grid(ticket.mask[name]) > 0, qr.matrix, data)
        r, c = np.unravel_index(int(np.argmin(cost)), cost.shape)
        best.append((int(cost[r, c]), depth, Placement(name, int(r), int(c))))
    # Lower layers first: under global magnitude pruning they lose fewest weights (larger
    # weights, fewer inputs per channel), so their code survives pruning best; within a
    # layer the offset needing the fewest changes.
    best.sort(key=lambda t: (t[1], t[0]))
    return [p for _, _, p in best[:copies]]


def _new_values(layer_w: torch.Tensor, kept: torch.Tensor, count: int,
                gen: torch.Generator) -> torch.Tensor:
    """Weights for new connections where no true values are known: random signs, magnitudes
    between the layer's median and 90th-percentile kept |w| (the paper's random connections,
    sized so the owner's magnitude-floor defence never removes them)."""
    mags = layer_w[kept].abs()
    lo, hi = (float(mags.quantile(0.5)), float(mags.quantile(0.9))) if mags.numel() else \
        (0.05, 0.1)
    m = lo + (hi - lo) * torch.rand(count, generator=gen)
    s = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
    return (m * s).to(layer_w.dtype)


def embed(ticket: Ticket, qr: QRCode, placements: list[Placement], support: int = 3,
          seed: int = 0, values: dict[str, torch.Tensor] | None = None) -> tuple[Ticket,
                                                                                   EmbedReport]:
    """Write the code's data modules into each placement; keep the density exactly equal.

    values: full (unpruned) weights to take new connections from, e.g. the rewind point of
    the `find` run; without them new connections get random weights."""
    if support < 1:
        raise TicketctlError(f"--support must be at least 1, got {support}")
    gen = torch.Generator().manual_seed(seed)
    n = qr.matrix.shape[0]
    data = ~function_module_map(qr.version)
    state = {k: v.clone() for k, v in ticket.state.items()}
    masks = {k: v.clone() for k, v in ticket.mask.items()}
    protected = {k: torch.zeros_like(v) for k, v in masks.items()}  # the regions' kernels
    added = removed = changed = 0
    for p in placements:
        rows, cols = p.region(n)
        w, m = state[p.layer], masks[p.layer]
        counts = grid(m)[rows, cols]
        protected[p.layer][rows, cols] = True
        for i, j in zip(*np.nonzero(data), strict=True):
            o, c = p.row + int(i), p.col + int(j)
            kernel_m = m[o, c].reshape(-1)
            kernel_w = w[o, c].reshape(-1)
            if qr.matrix[i, j]:
                need = min(support, kernel_m.numel()) - int(counts[i, j])
                if counts[i, j] == 0:
                    changed += 1
                if need > 0:
                    free = torch.nonzero(~kernel_m).squeeze(1)
                    if values is not None:
                        src = values[p.layer][o, c].reshape(-1)
                        pick = free[torch.argsort(src[free].abs(), descending=True,
                                                  stable=True)[:need]]
                        new = src[pick].to(kernel_w.dtype)
                    else:
                        pick = free[torch.randperm(len(free), generator=gen)[:need]]
                        new = _new_values(w, m, len(pick), gen)
                    kernel_m[pick] = True
                    kernel_w[pick] = new
                    added += len(pick)
                    m[o, c] = kernel_m.reshape(m[o, c].shape)
                    w[o, c] = kernel_w.reshape(w[o, c].shape)
            elif counts[i, j] > 0:
                removed += int(counts[i, j])
                changed += 1
                m[o, c] = False
                w[o, c] = 0
    delta = added - removed
    _compensate(state, masks, protected, delta, gen, values)
    signed_mask = Mask(masks)
    if signed_mask.num_kept != ticket.mask.num_kept:
        raise RuntimeError("density compensation failed")  # a bug, not bad input
    report = EmbedReport(placements, changed, added, removed, delta, ticket.density,
                         signed_mask.density)
    signed = ticket.derive(state=state, mask=signed_mask, kind=Kind.SIGNED,
                           extra={**ticket.extra, "signed_from": ticket.tensors_sha256()})
    return signed, report


def _compensate(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                protected: dict[str, torch.Tensor], delta: int, gen: torch.Generator,
                values: dict[str, torch.Tensor] | None) -> None:
    """Remove `delta` lowest-magnitude kept weights outside the regions (delta > 0), or
    restore -delta pruned ones there (delta < 0): by largest true value when known, else at
    random positions with random weights."""
    if delta == 0:
        return
    names = list(masks)

    flat_out = torch.cat([~protected[k].reshape(-1) for k in names])
    flat_m = torch.cat([masks[k].reshape(-1) for k in names])
    flat_w = torch.cat([state[k].reshape(-1) for k in names])
    if delta > 0:
        cand = torch.nonzero(flat_m & flat_out).squeeze(1)
        if len(cand) < delta:
            raise TicketctlError(
                f"the ticket is too sparse to carry this code: keeping its density needs "
                f"{delta} kept weights outside the code and it has {len(cand)}; sign a denser "
                "ticket (an earlier round) or lower --support")
        pick = cand[torch.topk(flat_w[cand].abs(), delta, largest=False, sorted=False).indices]
        flat_m[pick] = False
        flat_w[pick] = 0
    else:
        cand = torch.nonzero(~flat_m & flat_out).squeeze(1)
        if values is not None:
            flat_v = torch.cat([values[k].reshape(-1) for k in names]).to(flat_w.dtype)
            pick = cand[torch.topk(flat_v[cand].abs(), -delta, sorted=False).indices]
            flat_w[pick] = flat_v[pick]
        else:
            pick = cand[torch.randint(0, len(cand), (4 * -delta,), generator=gen).unique()]
            pick = pick[torch.randperm(len(pick), generator=gen)[:-delta]]
            if len(pick) < -delta:  # tiny layers: fall back to an exact draw
                pick = cand[torch.randperm(len(cand), generator=gen)[:-delta]]
            scale = float(flat_w[flat_m].abs().median()) if bool(flat_m.any()) else 0.05
            flat_w[pick] = (torch.randn(len(pick), generator=gen) * scale).to(flat_w.dtype)
        flat_m[pick] = True
    start = 0
    for k in names:
        size = masks[k].numel()
        masks[k] = flat_m[start:start + size].reshape(masks[k].shape).clone()
        state[k] = flat_w[start:start + size].reshape(state[k].shape).clone()
        start += size


def observed_region(mask: torch.Tensor, placement: Placement, n: int) -> np.ndarray:
    """Kept-weight counts of the region's kernels (a module reads dark when > 0)."""
    rows, cols = placement.region(n)
    g = grid(mask)
    if g.shape[0] < placement.row + n or g.shape[1] < placement.col + n:
        raise CheckFailed(f"the receipt is for another ticket: layer {placement.layer} "
                          f"({g.shape[0]}x{g.shape[1]}) cannot hold the recorded region at "
                          f"({placement.row}, {placement.col})")
    return g[rows, cols]


def extract(masks: dict[str, torch.Tensor], placements: list[Placement], version: int,
            mask_pattern: int, min_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Module matrix read from the placements (module-wise majority over copies; a tie reads
    dark, since pruning only ever turns dark modules light), with the function patterns
    filled in from the standard. A module reads dark when its kernel keeps at least
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
