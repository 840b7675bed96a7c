"""Scheme V1: split a ticket into a small secret key and the locked rest, and merge them back.

The key takes the n = round(key_ratio x kept) most important kept weights by a score; the
locked part keeps everything else (including the layers that are not pruned), so it loads
and trains like any ticket. Both parts record the SHA-256 of the ticket they came from and its
metadata, so a merge can prove it rebuilt exactly that ticket."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ticketctl.artifacts import Kind, Mask, Ticket
from ticketctl.errors import CheckFailed, TicketctlError
from ticketctl.protect.scores import Progress, compute_scores, top_kept


def key_size(ticket: Ticket, key_ratio: float) -> int:
    if not 0.0 < key_ratio < 1.0:
        raise TicketctlError(f"--key-ratio must be in (0, 1), got {key_ratio}")
    kept = ticket.mask.num_kept
    n = round(key_ratio * kept)
    if n < 1:
        raise TicketctlError(f"--key-ratio {key_ratio} of {kept} kept weights is an empty key; "
                             "use a larger ratio")
    if n >= kept:
        raise TicketctlError(f"a key of {n} weights would take the whole ticket ({kept} kept)")
    return n


def split_ticket(
    ticket: Ticket, score: str, key_ratio: float, seed: int = 0,
    model: nn.Module | None = None, on_progress: Progress | None = None,
    **score_options: Any
) -> tuple[Ticket, Ticket]:
    """Return (key, locked). `model` is the ticket's network, for the path scores (by
    default its architecture); `on_progress(done, total)` follows a long score (exact
    betweenness on a large network)."""
    if not len(ticket.mask):
        raise TicketctlError("this file has no mask: nothing to split")
    if ticket.kind not in (Kind.TICKET, Kind.TRAINED, Kind.SIGNED):
        raise TicketctlError(f"cannot split a '{ticket.kind}' file; split a ticket")
    n = key_size(ticket, key_ratio)
    key_bits = top_kept(ticket, compute_scores(ticket, score, seed=seed, model=model,
                                               on_progress=on_progress, **score_options), n)
    key_mask = Mask(key_bits)
    locked_mask = Mask({k: ticket.mask[k] & ~key_bits[k] for k in ticket.mask})
    parent = ticket.metadata()
    origin = {
        "parent_sha256": parent["tensors_sha256"],
        "parent_masks_sha256": parent["masks_sha256"],
        "parent_metadata": parent,
        "score": score, "key_ratio": key_ratio, "seed": seed, "key_weights": n,
        "locked_weights": locked_mask.num_kept,
        **{f"score_{k}": v for k, v in score_options.items() if v is not None},
    }
    # The key holds only its weights: every other tensor is zero, so it is useless alone.
    key_state = {k: torch.zeros_like(v) for k, v in ticket.state.items()}
    for k in key_mask:
        key_state[k] = torch.where(key_mask[k], ticket.state[k], torch.zeros_like(key_state[k]))
    key = ticket.derive(state=key_state, mask=key_mask, kind=Kind.KEY,
                        extra={**origin, "part": "key"})
    locked = ticket.derive(state=locked_mask.apply_state(ticket.state), mask=locked_mask,
                           kind=Kind.LOCKED, extra={**origin, "part": "locked"})
    return key, locked


def merge_parts(locked: Ticket, key: Ticket) -> Ticket:
    """Rebuild the original ticket; raises CheckFailed when the parts do not belong together
    or the result is not bit-identical to the ticket both parts recorded."""
    kinds = (locked.kind, key.kind)
    if kinds != (Kind.LOCKED, Kind.KEY):
        if kinds == (Kind.KEY, Kind.LOCKED):
            raise TicketctlError("arguments in the wrong order: merge LOCKED KEY")
        raise TicketctlError(f"merge needs a locked file and a key file, got {kinds[0]} and "
                             f"{kinds[1]}")
    if (locked.arch, locked.num_classes, locked.arch_args) != \
            (key.arch, key.num_classes, key.arch_args) or set(locked.mask) != set(key.mask):
        raise TicketctlError(f"the parts do not have the same shapes: {locked.arch} and "
                             f"{key.arch} with different layers or classes")
    lp, kp = locked.extra.get("parent_sha256"), key.extra.get("parent_sha256")
    if not lp or not kp:
        raise TicketctlError("a part records no parent ticket: it was not made by split")
    if lp != kp:
        raise CheckFailed("the key belongs to another ticket (parent hashes differ: "
                          f"{kp[:12]}... vs {lp[:12]}...)")
    overlap = sum(int((locked.mask[k] & key.mask[k]).sum()) for k in key.mask)
    if overlap:
        raise CheckFailed(f"key and locked masks overlap in {overlap} weights: not a split pair")
    mask = Mask({k: locked.mask[k] | key.mask[k] for k in key.mask})
    state = dict(locked.state)
    for k in key.mask:
        state[k] = torch.where(key.mask[k], key.state[k], locked.state[k])
    meta = locked.extra.get("parent_metadata") or {}
    merged = locked.derive(
        state=state, mask=mask, kind=meta.get("kind", Kind.TICKET),
        class_names=meta.get("class_names", locked.class_names),
        dataset=meta.get("dataset", locked.dataset),
        rewind_epoch=meta.get("rewind_epoch", locked.rewind_epoch),
        seed=meta.get("seed", locked.seed), extra=meta.get("extra") or {},
    )
    got = merged.tensors_sha256()
    # (parts split from a ticket written before format version 3 record its older hash)
    if got != lp and merged.legacy_tensors_sha256() != lp:
        raise CheckFailed(f"the merged ticket does not match the recorded ticket hash "
                          f"({got[:12]}... vs {lp[:12]}...): a part was altered")
    return merged
