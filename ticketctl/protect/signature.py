"""Scheme V2 end to end: sign a ticket (code, placement, embedding, receipt) and verify a
suspect model against a receipt, or scan it for any code when there is none."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any

import numpy as np
import torch

from ticketctl import __version__
from ticketctl.artifacts import Ticket
from ticketctl.artifacts.mask import kept_floor
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.align import (
    QUANTILES,
    align,
    align_removed,
    check_patterns,
    fingerprints,
    pad_to,
    reference_shape,
)
from ticketctl.protect.blocks import candidate_blocks
from ticketctl.protect.embed import (
    EmbedReport,
    Placement,
    choose_placements,
    correlate,
    embed,
    extract,
    grid,
    layers_for,
    observed_region,
    placement_costs,
)
from ticketctl.protect.qr import (
    QRCode,
    block_layout,
    capacity_bytes,
    data_module_order,
    decode_matrix,
    encode,
    function_module_map,
)
from ticketctl.protect.qr.codec import PAD_BYTES
from ticketctl.protect.qr.layout import mask_matrix
from ticketctl.protect.receipt import Receipt, sha256
from ticketctl.protect.stats import binomial_tail, precision_tail
from ticketctl.protect.verdict import ALPHA, SignatureReading, Verdict, decide, receipt_status


def _pack(matrix: np.ndarray) -> str:
    return np.packbits(matrix.astype(np.uint8).reshape(-1)).tobytes().hex()


def _unpack(hexbits: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))
    return bits[: n * n].reshape(n, n).astype(bool)


def best_code(masks: Mapping[str, torch.Tensor], message: str, version: int | None,
              mask_pattern: int | None, layer: str | None, max_version: int,
              support: int = 3) -> QRCode:
    """The code (over the 8 mask patterns unless one is given) that needs the fewest changes
    in the layer it goes to first (the lowest that holds it, or `layer`)."""
    patterns = [mask_pattern] if mask_pattern is not None else list(range(8))
    best: tuple[int, QRCode] | None = None
    for pattern in patterns:
        qr = encode(message, version=version, mask_pattern=pattern, max_version=max_version)
        n = qr.matrix.shape[0]
        data = ~function_module_map(qr.version)
        name, b = layers_for(masks, n, qr.version, support, layer, sized=version is not None)[0]
        cost = int(placement_costs(grid(masks[name], b) > 0, qr.matrix, data).min())
        if best is None or cost < best[0]:
            best = (cost, qr)
    assert best is not None  # patterns is never empty
    return best[1]


def keep_largest(weight: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """`mask` reduced to its `count` largest-magnitude weights (unchanged if it has fewer)."""
    idx = torch.nonzero(mask.reshape(-1)).squeeze(1)
    if len(idx) <= count:
        return mask
    w = weight.reshape(-1)[idx].abs().float()
    keep = idx[torch.topk(w, count, sorted=False).indices]
    out = torch.zeros(mask.numel(), dtype=torch.bool, device=mask.device)
    out[keep] = True
    return out.reshape(mask.shape)


def magnitude_floor(ticket: Ticket) -> float:
    """The smallest kept |w| (layer by layer: no copy of the whole model; a layer whose
    floor signing already found is not scanned again)."""
    mins = [kept_floor(ticket.state[k], m) for k, m in ticket.mask.items()]
    return min((v for v in mins if v is not None), default=0.0)


def sign_ticket(
    ticket: Ticket,
    message: str,
    *,
    private_key: Any = None,
    version: int | None = None,
    mask_pattern: int | None = None,
    layer: str | None = None,
    copies: int = 1,
    support: int = 3,
    seed: int = 0,
    values: dict[str, torch.Tensor] | None = None,
    max_version: int = 10,
    in_place: bool = False,
) -> tuple[Ticket, Receipt, EmbedReport, QRCode]:
    """Embed `message` as a QR code in the mask; returns the signed ticket, the receipt that
    commits to it (signed with `private_key` when given), what changed, and the code. Only
    the ticket's weights and masks are read: any network whose masked layers can hold the
    code (see protect/blocks.py for which weights back a module). With `in_place` the
    ticket's own tensors are changed (see `embed`)."""
    if not message:
        raise TicketctlError("--message must not be empty")
    if not len(ticket.mask):
        raise TicketctlError("this file has no mask to sign")
    if support < 1:
        raise TicketctlError(f"--support must be at least 1, got {support}")
    qr = best_code(ticket.mask, message, version, mask_pattern, layer, max_version, support)
    placements = choose_placements(ticket.mask, qr, layer=layer, copies=copies,
                                   support=support, sized=version is not None)
    signed, report = embed(ticket, qr, placements, support=support, seed=seed, values=values,
                           in_place=in_place)
    signed.extra = {**signed.extra, "receipt_matrix_sha256": _matrix_sha256(qr)}
    return signed, make_receipt(signed, message, qr, placements, support, private_key), \
        report, qr


def _matrix_sha256(qr: QRCode) -> str:
    return sha256(qr.matrix.astype(np.uint8).tobytes())


# A linear (or 1x1) layer's fingerprints hold each unit's sorted neighbour degrees: whole up
# to out x in x (out + in) of this many numbers (what receipts always held), sampled at
# align.QUANTILES ranks beyond it (a ViT-B's 3072 x 768 layers), up to ALIGN_MAX_UNITS units a
# side (re-alignment solves an assignment of that size). Kernel grids always get them.
ALIGN_BUDGET = 1 << 25
ALIGN_MAX_UNITS = 8192


def wide(shape: Sequence[int]) -> bool:
    """A linear or 1x1 layer whose fingerprints are sampled rather than whole."""
    out, inputs = shape[0], shape[1]
    kernel_grid = len(shape) > 2 and math.prod(shape[2:]) > 1 and inputs > 1
    return not kernel_grid and out * inputs * (out + inputs) > ALIGN_BUDGET


def alignable(shape: Sequence[int]) -> bool:
    """Whether a signed layer of `shape` gets channel fingerprints in the receipt."""
    return not wide(shape) or max(shape[0], shape[1]) <= ALIGN_MAX_UNITS


def make_receipt(signed: Ticket, message: str, qr: QRCode, placements: list[Placement],
                 support: int, private_key: Any = None) -> Receipt:
    """The receipt that commits to `signed` carrying `qr` at `placements` (signed with
    `private_key` when given)."""
    floor = magnitude_floor(signed)
    fingerprints_of = {p.layer: fingerprints(signed.state[p.layer], signed.mask[p.layer],
                                             QUANTILES if wide(signed.mask[p.layer].shape)
                                             else None)
                       for p in placements if alignable(signed.mask[p.layer].shape)}
    receipt = Receipt(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        message_sha256=sha256(message), qr_version=qr.version, mask_pattern=qr.mask_pattern,
        error_correction="H", placements=list(placements), matrix=_pack(qr.matrix),
        matrix_sha256=_matrix_sha256(qr),
        data_modules=int((~function_module_map(qr.version)).sum()), support=support,
        signed_ticket_sha256=signed.tensors_sha256(), signed_masks_sha256=signed.mask.sha256(),
        magnitude_floor=floor, arch=signed.arch, ticketctl=__version__,
        # the owner's add-on defence: how many weights each signed layer keeps (retraining
        # never changes it; revived positions make it larger)
        kept_counts={p.layer: int(signed.mask[p.layer].sum()) for p in placements},
        fingerprints=fingerprints_of)
    return receipt.sign(private_key)


def masks_of(state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor] | None = None
             ) -> dict[str, torch.Tensor]:
    """A mask for every weight with a channel grid: the file's where it has one, else
    `weight != 0` (a plain or fine-tuned state dict)."""
    out = {}
    for k, v in state.items():
        if v.dim() >= 2 and v.is_floating_point():
            out[k] = masks[k] if masks and k in masks else v != 0
    return out


def _decode_any(masks: dict[str, torch.Tensor], placements: list[Placement],
                r: Receipt) -> tuple[Any, int | None]:
    """Decode at rising read thresholds: a block must keep 1, then 2, then 3 weights to read
    dark. Pruning only turns dark modules light, which the one-sided decoder expects; an
    add-on attack turns light modules dark with single small weights, which a higher
    threshold reads as light again. Last, plain two-sided RS at threshold 1."""
    version, pattern = int(r.qr_version), int(r.mask_pattern)
    support = int(r.support if r.support is not None else 3)
    # a block cannot back a module with more weights than it has: a receipt's larger support
    # (up to its bound) would only add thresholds at which every module reads light
    block = max(p.blocks(masks[p.layer].shape).size for p in placements)
    for t in range(1, max(1, min(support, block)) + 1):
        matrix, _ = extract(masks, placements, version, pattern, min_count=t)
        result = decode_matrix(matrix, version, pattern)
        if result.message is not None:
            return result, t
    matrix, _ = extract(masks, placements, version, pattern)
    result = decode_matrix(matrix, version, pattern, one_sided=False)
    return result, (1 if result.message is not None else None)


def read_signature(masks: dict[str, torch.Tensor], receipt: Receipt, public_key: Any = None,
                   floor_defence: bool = False,
                   state: dict[str, torch.Tensor] | None = None) -> SignatureReading:
    """Check the receipt, read the code where it says, decode it, and test the bits against
    the committed matrix.

    floor_defence: the owner's answer to add-on attacks (needs `state`): prune weights below
    the receipt's magnitude floor, then keep only the recorded number of largest weights in
    each signed layer, which removes small revived weights the floor alone lets through."""
    valid = receipt.check(public_key)
    if not receipt.has_code:
        raise TicketctlError("the receipt commits no QR code (only a trigger set): check the "
                             "model with --trigger")
    for p in receipt.placements:
        if p.layer not in masks:
            raise CheckFailed(f"the receipt is for another ticket: this model has no layer "
                              f"{p.layer!r} (receipt for a {receipt.arch} model)")
    version = int(receipt.qr_version)
    n = 17 + 4 * version
    placements = receipt.placements
    if floor_defence:
        if state is None:
            raise TicketctlError("the magnitude-floor defence needs the model's weights")
        floor = float(receipt.magnitude_floor)
        masks = {k: m & (state[k].abs() >= floor) if k in state else m for k, m in masks.items()}
        for k, count in (receipt.kept_counts or {}).items():
            if k in masks and k in state:
                masks[k] = keep_largest(state[k], masks[k], int(count))
    expected = _unpack(receipt.matrix, n)
    data = ~function_module_map(version)
    # A layer that lost channels (structured pruning) is read in the receipt's shape: as
    # stored, its channels where they are, or re-aligned; either way the modules of missing
    # channels were not observed, so they are left out of the test (neither match nor miss).
    shrunk = {k: masks[k] for k in shrunk_layers(masks, receipt)}
    masks = dict(masks)  # the caller's stay as they are
    seen: dict[str, torch.Tensor] = {}
    for k, m in shrunk.items():
        masks[k], seen[k] = pad_to(m, reference_shape(receipt.fingerprints[k], tuple(m.shape)))

    def observed(where: dict[str, torch.Tensor]) -> np.ndarray:
        """The data modules every copy of the code saw whole."""
        ok = data.copy()
        for q in placements:
            if q.layer in where:
                ok &= observed_region(~where[q.layer], q, n) == 0
        return ok

    def reading(label: str, view: dict[str, torch.Tensor],
                where: dict[str, torch.Tensor]) -> tuple[Any, ...]:
        m, _ = extract(view, placements, version, int(receipt.mask_pattern))
        ok = observed(where)
        matches, total = int((m[ok] == expected[ok]).sum()), int(ok.sum())
        return binomial_tail(matches, total, 0.5), matches, total, ok, label, view, m

    best = reading("as stored", masks, seen)
    comparisons = 1
    if receipt.fingerprints and state is not None:  # channels may have been permuted
        comparisons = 2
        for p in placements:
            if p.layer in receipt.fingerprints and p.layer in state and \
                    len(receipt.fingerprints[p.layer]["rows"]) == masks[p.layer].shape[0] and \
                    len(receipt.fingerprints[p.layer]["cols"]) == masks[p.layer].shape[1]:
                check_patterns(receipt.fingerprints[p.layer], tuple(masks[p.layer].shape),
                               p.layer)
        # a reading as stored that matches every module cannot be beaten (a tie keeps it):
        # the re-alignment (seconds on a wide layer) is then skipped, the choice and its
        # correction the same
        if best[1] < int(data.sum()):
            aligned, aligned_seen = dict(masks), {}
            for p in placements:
                if p.layer in receipt.fingerprints and p.layer in state:
                    fp = receipt.fingerprints[p.layer]
                    if p.layer in shrunk:
                        aligned[p.layer], aligned_seen[p.layer] = align_removed(
                            state[p.layer], shrunk[p.layer], fp, p.layer)
                    else:
                        aligned[p.layer] = align(state[p.layer], masks[p.layer], fp, p.layer)
            other = reading("re-aligned", aligned, aligned_seen)
            best = other if other[0] < best[0] else best
    tail, matches, total, ok, alignment, masks, matrix = best
    # the better of the readings is a choice among `comparisons`: Bonferroni
    p = min(1.0, comparisons * tail)
    obs_dark = int(matrix[ok].sum())
    hits = int((matrix[ok] & expected[ok]).sum())
    p_prec = precision_tail(hits, obs_dark, int(expected[ok].sum()), total)
    result, threshold = _decode_any(masks, placements, receipt)
    message_ok = result.message is not None and \
        sha256(result.message) == receipt.message_sha256
    return SignatureReading(
        message=result.message, bit_match=matches / max(1, total), p_value=p,
        receipt_valid=valid, data_modules=total, matches=matches, precision_p_value=p_prec,
        decoded_matches_receipt=message_ok, decode_method=result.method,
        decode_min_count=threshold,
        placements=[q.to_json() for q in placements],
        comparisons=comparisons, alignment=alignment, floor_defence=floor_defence,
        unobserved_modules=int(data.sum()) - total)


def shrunk_layers(masks: Mapping[str, torch.Tensor], receipt: Receipt
                  ) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """The signed layers with fewer channels than the receipt records (a channel-pruned copy,
    or a narrower model): layer -> ((rows, cols) found, (rows, cols) recorded)."""
    out = {}
    for p in receipt.placements:
        fp = (receipt.fingerprints or {}).get(p.layer)
        m = masks.get(p.layer)
        if not fp or not fp["rows"] or not fp["cols"] or m is None or m.dim() < 2:
            continue
        have, want = (m.shape[0], m.shape[1]), (len(fp["rows"]), len(fp["cols"]))
        if have != want and have[0] <= want[0] and have[1] <= want[1]:
            out[p.layer] = (have, want)
    return out


def verify_with_receipt(masks: dict[str, torch.Tensor], receipt: Receipt,
                        public_key: Any = None, alpha: float = ALPHA,
                        floor_defence: bool = False,
                        state: dict[str, torch.Tensor] | None = None) -> Verdict:
    """The white-box verdict alone: `read_signature`, decided at `alpha`."""
    verdict = decide(alpha, signature=read_signature(masks, receipt, public_key,
                                                     floor_defence=floor_defence, state=state))
    verdict.receipt = receipt_status(receipt, public_key)
    return verdict


def read_code(masks: dict[str, torch.Tensor], receipt: Receipt) -> np.ndarray:
    """The module matrix where the receipt placed the code (for a picture of it)."""
    if not receipt.has_code:
        raise TicketctlError("the receipt commits no QR code to draw")
    matrix, _ = extract(masks, receipt.placements, int(receipt.qr_version),
                        int(receipt.mask_pattern))
    return matrix


@cache
def _message_modules(version: int) -> np.ndarray:
    """[8 x data codewords, 2]: the module of each data bit in message order (blocks
    de-interleaved: data codeword j of the message is not stream byte j when the version has
    several blocks)."""
    order = data_module_order(version)
    layout = block_layout(version)
    stream = [pos for block, count in zip(layout.positions, layout.data_counts, strict=True)
              for pos in block[:count]]
    return np.array([order[8 * s + b] for s in stream for b in range(8)], dtype=np.int64)


@cache
def _known(version: int, pattern: int, length: int) -> tuple[int, np.ndarray, np.ndarray]:
    """What a code holding a message of `length` bytes is known to store, whatever the
    message: its 12 header modules as a number (bit i set: the module of header bit i is
    dark; mode 0100 and the length), and the modules after the message (terminator, zero
    fill, pad codewords 0xEC 0x11) as positions [k, 2] and stored values [k]."""
    modules = _message_modules(version)
    mask = mask_matrix(version, pattern)
    header = [0, 1, 0, 0] + [(length >> (7 - i)) & 1 for i in range(8)]
    code = sum((b ^ int(mask[r, c])) << i
               for i, (b, (r, c)) in enumerate(zip(header, modules[:12], strict=True)))
    data = len(modules)
    end = 12 + 8 * length
    aligned = -(-(end + min(4, data - end)) // 8) * 8
    tail = [0] * (aligned - end) + [(PAD_BYTES[j % 2] >> (7 - b)) & 1
                                    for j in range((data - aligned) // 8) for b in range(8)]
    where = modules[end:]
    return code, where, np.array(tail, dtype=bool) ^ mask[where[:, 0], where[:, 1]]


_ONES = np.array([bin(i).count("1") for i in range(1 << 12)])


def _code_candidates(dark: np.ndarray, offsets: np.ndarray, codes: np.ndarray, version: int,
                     pattern: int) -> tuple[np.ndarray, np.ndarray]:
    """The offsets where a code of this version and mask pattern can sit, and whether its
    header is intact there: the header reads as a byte-mode header of some length, intact or
    with one dark module lost (one-sided damage), and of the modules that length leaves known
    after the message at most a quarter differ. Cheap filters before full decoding; a code
    damaged enough to fail them would not decode either, short of damage aimed at them."""
    near = np.zeros(len(codes), dtype=bool)
    intact = np.zeros(len(codes), dtype=bool)
    for length in range(1, capacity_bytes(version) + 1):
        code, where, stored = _known(version, pattern, length)
        exact = codes == code
        sel = np.nonzero(exact | ((codes & ~code) == 0) & (_ONES[code & ~codes] == 1))[0]
        if len(sel) and len(where):
            seen = dark[offsets[sel, 0, None] + where[None, :, 0],
                        offsets[sel, 1, None] + where[None, :, 1]]
            sel = sel[(seen != stored).sum(1) <= len(where) // 4]
        near[sel] = True
        intact[sel] |= exact[sel]
    return offsets[near], intact[near]


def _header_readings(dark: np.ndarray, version: int) -> tuple[np.ndarray, np.ndarray]:
    """The offsets where a code could sit, and the 12-bit reading of its header modules at
    each. A code's data modules are about half dark; one-sided damage of up to half of them
    leaves at least a quarter (the regions of sparse layers fail this at once). Only data
    modules count: the function patterns are never written, so they keep whatever the
    layer had (mostly dark in a dense layer)."""
    data = ~function_module_map(version)
    count = np.rint(correlate(dark, data))
    total = int(data.sum())
    offsets = np.argwhere((count >= 0.25 * total) & (count <= 0.75 * total))
    codes = np.zeros(len(offsets), dtype=np.int64)
    for i, (r, c) in enumerate(_message_modules(version)[:12]):
        codes |= dark[offsets[:, 0] + r, offsets[:, 1] + c].astype(np.int64) << i
    return offsets, codes


SCAN_SUPPORTS = (1, 3)  # the mappings a scan tries: one weight per module, and the default


def scan(masks: dict[str, torch.Tensor], versions: range = range(1, 5),
         patterns: range = range(8), supports: Sequence[int] = SCAN_SUPPORTS
         ) -> list[dict[str, Any]]:
    """Without a receipt: try every layer, module grid (the kernel grid and the blocks of
    each of `supports`), version (1-4 by default: up to 50 bytes), mask pattern and offset,
    and report every message that decodes; the one-sided decoder never returns a wrong
    message, so a report is evidence even with no receipt at hand. The number of places
    tried is returned with each find for a multiple-comparison reading."""
    found = []
    tried = 0
    grids = [(name, b, b.counts(m) > 0) for name, m in masks.items()
             for b in candidate_blocks(m.shape, supports) if b.fits(m.shape)]
    for version in versions:
        n = 17 + 4 * version
        func = function_module_map(version)
        readings = [(name, b, dark, *_header_readings(dark, version))
                    for name, b, dark in grids if min(dark.shape) >= n]
        for pattern in patterns:
            filler = encode("", version=version, mask_pattern=pattern).matrix
            for name, b, dark, offsets, codes in readings:
                tried += (dark.shape[0] - n + 1) * (dark.shape[1] - n + 1)
                # intact headers get the full one-sided decoder; a damaged header only plain RS
                places, intacts = _code_candidates(dark, offsets, codes, version, pattern)
                for (row, col), intact in zip(places, intacts, strict=True):
                    matrix = dark[row:row + n, col:col + n].copy()
                    matrix[func] = filler[func]
                    res = decode_matrix(matrix, version, pattern, one_sided=bool(intact))
                    if res.message is not None:
                        found.append({"message": res.message, "layer": name, "row": int(row),
                                      "col": int(col), "qr_version": version,
                                      "mask_pattern": pattern, "method": res.method,
                                      **b.to_json()})
    for f in found:
        f["places_tried"] = tried
    return found
