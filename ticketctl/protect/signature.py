"""Scheme V2 end to end: sign a ticket (code, placement, embedding, receipt) and verify a
suspect model against a receipt, or scan it for any code when there is none."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from ticketctl import __version__
from ticketctl.artifacts import Ticket
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.align import align, fingerprints
from ticketctl.protect.embed import (
    EmbedReport,
    Placement,
    candidate_layers,
    choose_placements,
    embed,
    extract,
    grid,
    placement_costs,
)
from ticketctl.protect.qr import (
    QRCode,
    capacity_bytes,
    data_module_order,
    decode_matrix,
    encode,
    function_module_map,
)
from ticketctl.protect.qr.layout import mask_matrix
from ticketctl.protect.receipt import Receipt, sha256
from ticketctl.protect.stats import binomial_tail, precision_tail
from ticketctl.protect.verdict import ALPHA, SignatureReading, Verdict, decide, receipt_status


def _pack(matrix: np.ndarray) -> str:
    return np.packbits(matrix.astype(np.uint8).reshape(-1)).tobytes().hex()


def _unpack(hexbits: str, n: int) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), dtype=np.uint8))
    return bits[: n * n].reshape(n, n).astype(bool)


def best_code(ticket: Ticket, message: str, version: int | None, mask_pattern: int | None,
              layer: str | None, max_version: int) -> QRCode:
    """The code (over the 8 mask patterns unless one is given) that needs the fewest changes
    in the layers it may go to."""
    patterns = [mask_pattern] if mask_pattern is not None else list(range(8))
    best: tuple[int, QRCode] | None = None
    for pattern in patterns:
        qr = encode(message, version=version, mask_pattern=pattern, max_version=max_version)
        n = qr.matrix.shape[0]
        data = ~function_module_map(qr.version)
        layers = [layer] if layer else candidate_layers(ticket, n)[:1]  # the lowest layer
        costs = [int(placement_costs(grid(ticket.mask[k]) > 0, qr.matrix, data).min())
                 for k in layers if k in ticket.mask and ticket.mask[k].shape[0] >= n
                 and ticket.mask[k].shape[1] >= n]
        if costs and (best is None or min(costs) < best[0]):
            best = (min(costs), qr)
    if best is None:  # let choose_placements explain why nothing fits
        qr = encode(message, version=version, mask_pattern=patterns[0], max_version=max_version)
        choose_placements(ticket, qr, layer)
        raise AssertionError("unreachable")
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
    kept = torch.cat([ticket.state[k][m].abs().reshape(-1) for k, m in ticket.mask.items()])
    return float(kept.min()) if kept.numel() else 0.0


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
) -> tuple[Ticket, Receipt, EmbedReport, QRCode]:
    """Embed `message` as a QR code in the mask; returns the signed ticket, the receipt that
    commits to it (signed with `private_key` when given), what changed, and the code."""
    if not message:
        raise TicketctlError("--message must not be empty")
    if not len(ticket.mask):
        raise TicketctlError("this file has no mask to sign")
    qr = best_code(ticket, message, version, mask_pattern, layer, max_version)
    placements = choose_placements(ticket, qr, layer=layer, copies=copies)
    signed, report = embed(ticket, qr, placements, support=support, seed=seed, values=values)
    matrix_sha256 = sha256(qr.matrix.astype(np.uint8).tobytes())
    signed.extra = {**signed.extra, "receipt_matrix_sha256": matrix_sha256}
    receipt = Receipt(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        message_sha256=sha256(message), qr_version=qr.version, mask_pattern=qr.mask_pattern,
        error_correction="H", placements=list(placements), matrix=_pack(qr.matrix),
        matrix_sha256=matrix_sha256,
        data_modules=int((~function_module_map(qr.version)).sum()), support=support,
        signed_ticket_sha256=signed.tensors_sha256(), signed_masks_sha256=signed.mask.sha256(),
        magnitude_floor=magnitude_floor(signed), arch=signed.arch, ticketctl=__version__,
        # the owner's add-on defence: how many weights each signed layer keeps (retraining
        # never changes it; revived positions make it larger)
        kept_counts={p.layer: int(signed.mask[p.layer].sum()) for p in placements},
        fingerprints={p.layer: fingerprints(signed.state[p.layer], signed.mask[p.layer])
                      for p in placements})
    return signed, receipt.sign(private_key), report, qr


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
    """Decode at rising read thresholds: a kernel must keep 1, then 2, then 3 weights to read
    dark. Pruning only turns dark modules light, which the one-sided decoder expects; an
    add-on attack turns light modules dark with single small weights, which a higher
    threshold reads as light again. Last, plain two-sided RS at threshold 1."""
    version, pattern = int(r.qr_version), int(r.mask_pattern)
    support = int(r.support if r.support is not None else 3)
    # a kernel cannot back a module with more weights than it has: a receipt's larger support
    # (up to its bound) would only add thresholds at which every module reads light
    kernel = max(int(np.prod(masks[p.layer].shape[2:])) for p in placements)
    for t in range(1, max(1, min(support, kernel)) + 1):
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
    total = int(data.sum())
    views = [("as stored", masks)]
    if receipt.fingerprints and state is not None:  # channels may have been permuted
        aligned = dict(masks)
        for p in placements:
            if p.layer in receipt.fingerprints and p.layer in state:
                aligned[p.layer] = align(state[p.layer], masks[p.layer],
                                         receipt.fingerprints[p.layer], p.layer)
        views.append(("re-aligned", aligned))
    best = None
    for label, view in views:
        m, _ = extract(view, placements, version, int(receipt.mask_pattern))
        agree = int((m[data] == expected[data]).sum())
        if best is None or agree > best[0]:
            best = (agree, label, view, m)
    matches, alignment, masks, matrix = best
    # the better of the readings is a choice among len(views): Bonferroni
    p = min(1.0, len(views) * binomial_tail(matches, total, 0.5))
    obs_dark = int(matrix[data].sum())
    hits = int((matrix[data] & expected[data]).sum())
    p_prec = precision_tail(hits, obs_dark, int(expected[data].sum()), total)
    result, threshold = _decode_any(masks, placements, receipt)
    message_ok = result.message is not None and \
        sha256(result.message) == receipt.message_sha256
    return SignatureReading(
        message=result.message, bit_match=matches / total, p_value=p, receipt_valid=valid,
        data_modules=total, matches=matches, precision_p_value=p_prec,
        decoded_matches_receipt=message_ok, decode_method=result.method,
        decode_min_count=threshold,
        placements=[{"layer": q.layer, "row": q.row, "col": q.col} for q in placements],
        comparisons=len(views), alignment=alignment, floor_defence=floor_defence)


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


def _header_survivors(dark: np.ndarray, version: int, pattern: int, n: int,
                      slack: int = 0) -> np.ndarray:
    """Offsets whose first 12 data bits can be a byte-mode header (mode 0100, a length the
    version holds) under one-sided damage: no observed dark where the header needs light, at
    most `slack` lights where it needs dark. A cheap filter before full decoding."""
    order = data_module_order(version)[:12]
    mask = mask_matrix(version, pattern)
    h, w = dark.shape[0] - n + 1, dark.shape[1] - n + 1
    obs = np.stack([dark[r:r + h, c:c + w] for r, c in order])  # [12, h, w]
    keep = np.zeros((h, w), dtype=bool)
    for length in range(1, capacity_bytes(version) + 1):
        bits = [0, 1, 0, 0] + [(length >> (7 - i)) & 1 for i in range(8)]
        stored = np.array([b ^ int(mask[r, c]) for b, (r, c) in zip(bits, order, strict=True)],
                          dtype=bool)[:, None, None]
        impossible = (obs & ~stored).any(0)
        lost = (~obs & stored).sum(0)
        keep |= ~impossible & (lost <= slack)
    # a code's modules are about half dark; one-sided damage of up to half of them leaves at
    # least a quarter (the regions of sparse layers fail this at once)
    ii = np.pad(dark.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    count = ii[n:, n:] - ii[:-n, n:] - ii[n:, :-n] + ii[:-n, :-n]
    keep &= (count >= 0.25 * n * n) & (count <= 0.75 * n * n)
    return np.argwhere(keep)


def scan(masks: dict[str, torch.Tensor], versions: range = range(1, 5),
         patterns: range = range(8)) -> list[dict[str, Any]]:
    """Without a receipt: try every layer, version (1-4 by default: up to 50 bytes), mask
    pattern and offset, and report every message that decodes; the one-sided decoder never
    returns a wrong message, so a report is evidence even with no receipt at hand. The number
    of places tried is returned with each find for a multiple-comparison reading."""
    found = []
    tried = 0
    for version in versions:
        n = 17 + 4 * version
        func = function_module_map(version)
        for pattern in patterns:
            filler = encode("", version=version, mask_pattern=pattern).matrix
            for name, m in masks.items():
                dark = grid(m) > 0
                if dark.shape[0] < n or dark.shape[1] < n:
                    continue
                tried += (dark.shape[0] - n + 1) * (dark.shape[1] - n + 1)
                # intact headers get the full one-sided decoder; a damaged header only plain RS
                exact = {tuple(x) for x in _header_survivors(dark, version, pattern, n, 0)}
                for row, col in _header_survivors(dark, version, pattern, n, 1):
                    matrix = dark[row:row + n, col:col + n].copy()
                    matrix[func] = filler[func]
                    res = decode_matrix(matrix, version, pattern,
                                        one_sided=(int(row), int(col)) in exact)
                    if res.message is not None:
                        found.append({"message": res.message, "layer": name, "row": int(row),
                                      "col": int(col), "qr_version": version,
                                      "mask_pattern": pattern, "method": res.method})
    for f in found:
        f["places_tried"] = tried
    return found
