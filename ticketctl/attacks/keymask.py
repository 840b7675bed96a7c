"""Scheme V1 attacks: retraining the locked ticket without its key (`nokey`) and with a forged
random key of the same size (`fake1`, the paper's ambiguity attack of Figure 5)."""

from __future__ import annotations

from typing import Any

import torch

from ticketctl.artifacts import Kind, Mask, Ticket
from ticketctl.attacks.runner import AttackReport, AttackRow, AttackRunner, compare
from ticketctl.errors import TicketctlError
from ticketctl.protect import merge_parts


def _check_locked(locked: Ticket) -> None:
    if locked.kind != Kind.LOCKED:
        raise TicketctlError(f"this attack takes a locked file (from split), not a "
                             f"'{locked.kind}' file")


def reference_accuracy(
    runner: AttackRunner, locked: Ticket, key: Ticket | None, given: float | None
) -> tuple[float | None, str]:
    """The owner's accuracy: the merged ticket retrained the same way when the key is at hand,
    else a number the user gives, else what `find` recorded for the ticket."""
    if key is not None:
        original = merge_parts(locked, key)
        return runner.retrain(original, "original").accuracy, "original ticket retrained"
    if given is not None:
        return given, "given"
    recorded = ((locked.extra.get("parent_metadata") or {}).get("extra") or {}).get(
        "ticket_accuracy")
    if recorded is not None:
        return float(recorded), "recorded by find (its own schedule)"
    return None, "none"


def nokey(runner: AttackRunner, locked: Ticket, key: Ticket | None = None,
          reference: float | None = None) -> AttackReport:
    _check_locked(locked)
    if key is not None:  # the reference and the attack in one packed network
        runner.retrain_many([merge_parts(locked, key), locked], ["original", "locked"])
    ref, how = reference_accuracy(runner, locked, key, reference)
    res = runner.retrain(locked, "locked")
    row = AttackRow(strength=locked.extra.get("key_ratio"), accuracy=res.accuracy,
                    details={"density": locked.density, "score": locked.extra.get("score"),
                             "key_weights": locked.extra.get("key_weights")})
    compare([row], ref)
    return AttackReport("nokey", ref, how, [row], {"train": runner.cfg.to_dict()})


def forge_key(locked: Ticket, n: int, seed: int = 0) -> Ticket:
    """The attacker's guess: n random pruned positions of the locked ticket turned on, with
    weights drawn from a normal of each layer's kept-weight spread."""
    gen = torch.Generator().manual_seed(seed)
    names = list(locked.mask)
    free = torch.cat([~locked.mask[k].reshape(-1) for k in names])
    idx = torch.nonzero(free).squeeze(1)
    if n > len(idx):
        raise TicketctlError(f"a forged key of {n} weights does not fit in the {len(idx)} "
                             "pruned positions")
    pick = idx[torch.randperm(len(idx), generator=gen)[:n]]
    flat = torch.zeros(len(free), dtype=torch.bool)
    flat[pick] = True
    state, masks, start = dict(locked.state), {}, 0
    for k in names:
        size = locked.mask[k].numel()
        forged = flat[start:start + size].reshape(locked.mask[k].shape)
        start += size
        kept = locked.state[k][locked.mask[k]]
        std = float(kept.std()) if kept.numel() > 1 else 0.05
        noise = torch.randn(locked.mask[k].shape, generator=gen) * std
        state[k] = torch.where(forged, noise.to(state[k].dtype), locked.state[k])
        masks[k] = locked.mask[k] | forged
    return locked.derive(state=state, mask=Mask(masks), kind=Kind.TICKET, seed=seed,
                         extra={"forged_from": locked.tensors_sha256(), "forged_weights": n})


def forged_size(locked: Ticket, key_ratio: float) -> int:
    """n = round(key_ratio x the ticket's kept weights), as the owner's key was sized."""
    if not 0.0 < key_ratio < 1.0:
        raise TicketctlError(f"--key-ratios must be in (0, 1), got {key_ratio}")
    parent_kept = (locked.extra.get("parent_metadata") or {}).get("kept")
    if parent_kept is None:  # the locked part is (1 - ratio) of the ticket
        parent_kept = locked.mask.num_kept / (1.0 - key_ratio)
    return max(1, round(key_ratio * parent_kept))


def fake1(runner: AttackRunner, locked: Ticket, key_ratios: list[float],
          key: Ticket | None = None, reference: float | None = None,
          seed: int = 0) -> AttackReport:
    _check_locked(locked)
    rows: list[AttackRow] = []
    sizes = [forged_size(locked, ratio) for ratio in key_ratios]
    forged = [forge_key(locked, n, seed=seed) for n in sizes]
    labels = [f"forged {r:g}" for r in key_ratios]
    if key is not None:  # the reference packs with the forged tickets
        runner.retrain_many([merge_parts(locked, key), *forged], ["original", *labels])
    ref, how = reference_accuracy(runner, locked, key, reference)
    results = runner.retrain_many(forged, labels)
    for ratio, n, f, res in zip(key_ratios, sizes, forged, results, strict=True):
        rows.append(AttackRow(strength=ratio, accuracy=res.accuracy,
                              details={"forged_weights": n, "density": f.density}))
    compare(rows, ref)
    return AttackReport("fake1", ref, how, rows, {"train": runner.cfg.to_dict(), "seed": seed})


def summary_rows(report: AttackReport) -> list[dict[str, Any]]:
    return [{"attack": report.attack, **{k: v for k, v in r.__dict__.items() if k != "details"},
             **r.details} for r in report.rows]
