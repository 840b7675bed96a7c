"""Re-aligning a layer whose channels were permuted (a function-preserving attack), so the
code is read where the receipt put it. Each row (output unit) and column (input unit) of the
signed layer, a conv or a linear layer, has a fingerprint that does not depend on the order of
the other axis: its largest |w| and a description of its mask. For a conv the mask part is the
sorted kept-weight counts of its kernels and, for kernels of up to 9 weights, the histogram of
its kernels' 0/1 patterns. A linear layer (or a 1x1 conv) has one weight per kernel, so counts
and patterns only say how many weights a unit keeps; there the mask part is instead the sorted
degrees of the units it is connected to (how many weights each of them keeps), a fingerprint
of the unit's place in the mask's bipartite graph that no relabelling of either axis changes.
Retraining changes the weights but not the mask, so the mask part identifies a channel even
after the owner (or the thief) trained the model further. The receipt stores the fingerprints;
verification matches the suspect's channels to them by minimum-cost assignment (scipy), the
mask part dominating the cost."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ticketctl.errors import TicketctlError

TOP = 8
# a wide linear layer's neighbour degrees, sampled at this many ranks (signature.alignable)
QUANTILES = 64


def _counts(mask: torch.Tensor) -> np.ndarray:
    m = mask.reshape(mask.shape[0], mask.shape[1], -1) if mask.dim() > 2 else mask[..., None]
    return m.sum(-1).numpy().astype(np.float64)


def _pattern_histograms(mask: torch.Tensor, axis: int) -> np.ndarray | None:
    """Per channel of `axis`, how many of its kernels have each 0/1 pattern (None for
    kernels of more than 9 weights)."""
    m = mask.reshape(mask.shape[0], mask.shape[1], -1) if mask.dim() > 2 else mask[..., None]
    k = m.shape[-1]
    if k > 9:
        return None
    codes = (m.to(torch.int64) * (2 ** torch.arange(k))).sum(-1)  # out x in
    if axis == 1:
        codes = codes.T
    hist = np.zeros((codes.shape[0], 2 ** k), dtype=np.int64)
    for i, row in enumerate(codes.numpy()):
        hist[i] = np.bincount(row, minlength=2 ** k)
    return hist


def fingerprints(weight: torch.Tensor, mask: torch.Tensor,
                 quantiles: int | None = None) -> dict[str, list[list[float]]]:
    """Per output channel (row) and input channel (column). With `quantiles`, a linear (or
    1x1) layer's sorted neighbour degrees are sampled at that many evenly spaced ranks
    instead of kept whole: a wide layer's receipt stays small and its matching cheap."""
    w = (weight.detach().abs() * mask).to(torch.float64)
    w = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w[..., None]
    counts = _counts(mask)
    single = w.shape[-1] == 1  # a linear layer or a 1x1 conv

    def one(axis: int) -> list[list[float]]:
        vals = w.transpose(0, 1) if axis == 1 else w
        flat = vals.reshape(vals.shape[0], -1)
        top = torch.topk(flat, min(TOP, flat.shape[1]), dim=1).values.numpy()
        c = counts.T if axis == 1 else counts
        if single:  # each kept weight as the degree of the unit it connects to
            c = c * c.sum(0, keepdims=True)
        c = np.sort(c, axis=1)
        if single and quantiles is not None and c.shape[1] > quantiles:
            c = c[:, np.linspace(0, c.shape[1] - 1, quantiles).round().astype(np.int64)]
        return np.concatenate([top, c], axis=1).round(6).tolist()

    out = {"rows": one(0), "cols": one(1)}
    for axis, name in ((0, "row_patterns"), (1, "col_patterns")):
        hist = _pattern_histograms(mask.detach().cpu(), axis)
        if hist is not None:  # sparse: (channel, pattern, count) for nonzero counts
            nz = np.nonzero(hist)
            out[name] = np.stack([nz[0], nz[1], hist[nz]], 1).tolist()
    return out


def _dense(triples: list[list[int]], channels: int, k: int) -> np.ndarray:
    hist = np.zeros((channels, 2 ** k), dtype=np.float64)
    for c, p, n in triples:
        hist[c, p] = n
    return hist


def _match(reference: list[list[float]], suspect: list[list[float]],
           patterns: tuple[np.ndarray, np.ndarray] | None = None,
           single: bool = False) -> np.ndarray:
    """For each reference channel, the suspect channel that best matches it; kernel
    patterns (or, for one weight per kernel, the neighbours' degrees), when both sides have
    them, dominate the cost (they survive retraining)."""
    from scipy.spatial.distance import cdist  # L1 distances without an n x n x d array

    a, b = np.asarray(reference, dtype=np.float64), np.asarray(suspect, dtype=np.float64)
    top = slice(0, TOP)
    scale = max(float(np.abs(a[:, top]).max()), 1e-12)
    mask_part = cdist(a[:, TOP:], b[:, TOP:], "cityblock")
    # degrees are integers: a unit whose neighbours differ costs at least 10, more than the
    # weights can add (at most 1 for each of the TOP values)
    mask_part = 10.0 * mask_part if single else mask_part / max(1.0, a.shape[1] - TOP)
    cost = cdist(a[:, top], b[:, top], "cityblock") / scale + mask_part
    if patterns is not None:
        pa, pb = patterns
        total = max(1.0, float(pa.sum(1).max()))
        cost = cost + 100.0 * cdist(pa, pb, "cityblock") / total
    from scipy.optimize import linear_sum_assignment  # seconds to import: only when used

    rows, cols = linear_sum_assignment(cost)
    order = np.empty(len(a), dtype=np.int64)
    order[rows] = cols
    return order


def check_patterns(reference: dict[str, list[list[Any]]], shape: tuple[int, ...],
                   layer: str = "") -> None:
    """A receipt's kernel-pattern histograms must name channels and patterns the layer has
    (checked whether or not a re-alignment runs: a bad receipt is bad input either way)."""
    k = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    for axis, key in ((0, "row_patterns"), (1, "col_patterns")):
        n = shape[axis]
        for c, p, _ in reference.get(key) or []:
            if c >= n or p >= 2 ** k:
                raise TicketctlError(
                    f"the receipt's field 'fingerprints[\"{layer}\"].{key}' names channel "
                    f"{c}, pattern {p}; the layer has {n} channels and {2 ** k} patterns")


def align(weight: torch.Tensor, mask: torch.Tensor,
          reference: dict[str, list[list[float]]], layer: str = "") -> torch.Tensor:
    """The suspect's mask with rows and columns put back in the receipt's order (for a
    linear layer, rows are output units and columns input units). The receipt's
    fingerprints (checked for types on reading) must fit the layer's shape: a
    mismatch is a receipt for another model, left as stored."""
    n_rows, n_cols = len(reference["rows"]), len(reference["cols"])
    if (n_rows, n_cols) != tuple(mask.shape[:2]):
        if 0 < mask.shape[0] <= n_rows and 0 < mask.shape[1] <= n_cols and \
                reference["rows"] and reference["cols"]:
            return align_removed(weight, mask, reference, layer)[0]
        return mask
    # the receipt's own form: whole degree vectors, or QUANTILES samples for a wide layer
    single = mask.dim() <= 2 or int(np.prod(mask.shape[2:])) == 1
    wide = single and bool(reference["rows"]) and len(reference["rows"][0]) == TOP + QUANTILES
    fp = fingerprints(weight, mask, QUANTILES if wide else None)
    for name in ("rows", "cols"):
        if reference[name] and len(reference[name][0]) != len(fp[name][0]):
            return mask
    check_patterns(reference, tuple(mask.shape), layer)
    k = int(np.prod(mask.shape[2:])) if mask.dim() > 2 else 1
    orders = []
    for axis, name in ((0, "rows"), (1, "cols")):
        key = f"{name[:-1]}_patterns"
        pats = None
        if key in reference and key in fp:
            n = mask.shape[axis]
            pats = (_dense(reference[key], n, k), _dense(fp[key], n, k))
        orders.append(torch.from_numpy(_match(reference[name], fp[name], pats, k == 1)))
    return mask[orders[0]][:, orders[1]]


def reference_shape(reference: dict[str, list[list[float]]],
                    shape: tuple[int, ...]) -> tuple[int, ...]:
    """The signed layer's shape as the receipt's fingerprints record it (channels), with the
    suspect's own kernel size."""
    return (len(reference["rows"]), len(reference["cols"]), *shape[2:])


def pad_to(mask: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A channel-pruned layer's mask read as stored: its channels where they are, the missing
    ones empty, in the receipt's shape; and which positions the suspect has at all."""
    out = torch.zeros(shape, dtype=torch.bool)
    out[: mask.shape[0], : mask.shape[1]] = mask.bool()
    seen = torch.zeros(shape, dtype=torch.bool)
    seen[: mask.shape[0], : mask.shape[1]] = True
    return out, seen


def _removed_cost(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Reference channel i (histogram row a[i]) against suspect channel j (b[j]) when the
    suspect may have lost some of the other axis' channels: what the suspect has beyond the
    reference (impossible for the right pair) costs three times what it lacks (the lost
    kernels). Empty kernels (column 0) are left out: most of a sparse layer's are, and they
    are what the removal takes."""
    from scipy.spatial.distance import cdist

    a, b = a[:, 1:], b[:, 1:]
    l1 = cdist(a, b, "cityblock")
    sa, sb = a.sum(1)[:, None], b.sum(1)[None, :]
    excess, lack = (l1 + sb - sa) / 2, (l1 - sb + sa) / 2
    return 3.0 * excess + lack


def _count_histograms(counts: np.ndarray, k: int) -> np.ndarray:
    """Per channel, how many of its kernels keep 0..k weights (from the sorted counts)."""
    c = np.clip(np.rint(counts), 0, k).astype(np.int64)
    return np.stack([np.bincount(row, minlength=k + 1) for row in c]).astype(np.float64)


def align_removed(weight: torch.Tensor, mask: torch.Tensor,
                  reference: dict[str, list[list[float]]], layer: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-align a layer that lost channels (structured pruning, perhaps also permuted): each
    suspect channel is matched to a distinct reference channel (a rectangular minimum-cost
    assignment), and the receipt's channels that found no match read as empty. A conv's
    channels are matched by their kernels' 0/1 patterns (or kept-weight counts, for kernels
    of more than 9 weights) with the tolerance of `_removed_cost`, and their largest |w|;
    a linear layer's (one weight per kernel) by their largest |w| alone, since its mask
    fingerprint, the neighbours' degrees, changes with every removed neighbour. Returns the
    mask in the receipt's shape and the positions matched to a suspect channel on both axes
    (the rest were not observed: they are missing, not light)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial.distance import cdist

    shape = reference_shape(reference, tuple(mask.shape))
    check_patterns(reference, shape, layer)
    k = int(np.prod(mask.shape[2:])) if mask.dim() > 2 else 1
    fp = fingerprints(weight, mask)
    sources = []
    for axis, name in ((0, "rows"), (1, "cols")):
        a = np.asarray(reference[name], dtype=np.float64)
        b = np.asarray(fp[name], dtype=np.float64)
        scale = max(float(np.abs(a[:, :TOP]).max()), 1e-12)
        cost = cdist(a[:, :TOP], b[:, :TOP], "cityblock") / scale
        if k > 1:
            key = f"{name[:-1]}_patterns"
            if key in reference and key in fp:
                ha = _dense(reference[key], shape[axis], k)
                hb = _dense(fp[key], mask.shape[axis], k)
            else:
                ha, hb = _count_histograms(a[:, TOP:], k), _count_histograms(b[:, TOP:], k)
            cost = cost + 100.0 * _removed_cost(ha, hb) / max(1.0, float(ha.sum(1).max()))
        ref, sus = linear_sum_assignment(cost)
        sources.append((torch.from_numpy(ref), torch.from_numpy(sus)))
    (r_ref, r_sus), (c_ref, c_sus) = sources
    out = torch.zeros(shape, dtype=torch.bool)
    out[r_ref[:, None], c_ref[None, :]] = mask.bool()[r_sus[:, None], c_sus[None, :]]
    seen = torch.zeros(shape, dtype=torch.bool)
    seen[r_ref[:, None], c_ref[None, :]] = True
    return out, seen
