"""The demo pipeline on the embedded digits dataset, runnable on any CPU in under a minute."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from cryptography.hazmat.primitives import serialization

from ticketctl.artifacts import Ticket, load_ticket, save_ticket
from ticketctl.artifacts.describe import describe_file
from ticketctl.artifacts.io import all_or_nothing, write_text_atomic
from ticketctl.attacks import AttackRunner, nokey
from ticketctl.attacks.checks import owner_checks
from ticketctl.attacks.degrade import quantized
from ticketctl.attacks.removal import added, pruned, sweep
from ticketctl.data import load_dataset
from ticketctl.device import resolve_device
from ticketctl.errors import TicketctlError
from ticketctl.plots import plot_search
from ticketctl.protect import merge_parts, split_ticket
from ticketctl.protect.receipt import (
    load_private_key,
    load_public_key,
    load_receipt,
    save_receipt,
    write_keypair,
)
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.suspect import Suspect
from ticketctl.protect.trigger import generate as trigger_generate
from ticketctl.protect.trigger import load_trigger_set, save_trigger_set
from ticketctl.protect.verify import Marks, check_suspect, verify
from ticketctl.prune import Events, FindResult, find_ticket, magnitude_prune, resolve_settings
from ticketctl.prune.imp import ticket_at_round
from ticketctl.train.config import TrainOverrides
from ticketctl.train.retrain import retrain_ticket


def _scheme_v1(ticket: Ticket, out_dir: Path, settings: Any, device: str,
               force: bool) -> dict[str, Any]:
    """Lock the ticket with a 10% betweenness key, merge it back, and retrain the locked part
    without the key against the original retrained the same way."""
    key, locked = split_ticket(ticket, "betweenness", 0.1)
    with all_or_nothing(force=force):
        key_path = save_ticket(key, out_dir / "digits.key.safetensors", force=force)
        locked_path = save_ticket(locked, out_dir / "digits.locked.safetensors", force=force)
    merged = merge_parts(load_ticket(locked_path), load_ticket(key_path))
    merged_path = save_ticket(merged, out_dir / "digits.merged.safetensors", force=force)
    data = load_dataset("digits", device=resolve_device(device))
    report = nokey(AttackRunner(data, settings.train), load_ticket(locked_path),
                   key=load_ticket(key_path))
    return {"score": "betweenness", "key_ratio": 0.1, "key_weights": key.mask.num_kept,
            "locked_weights": locked.mask.num_kept,
            "identical": merged.tensors_sha256() == ticket.tensors_sha256(),
            "original_accuracy": report.reference_accuracy,
            "nokey_accuracy": report.rows[0].accuracy, "key": str(key_path),
            "locked": str(locked_path), "merged": str(merged_path)}


def _scheme_v2(result: FindResult, out_dir: Path, force: bool) -> dict[str, Any]:
    """Sign a ticket of the same search with a QR code (the last accepted round still holding
    10% of the weights: the extreme ticket is too sparse to carry a code cheaply), prune the
    signed ticket by 30%, and verify it against the signed receipt."""
    rounds = [r for r in result.rounds if r.accepted and (r.density or 0) >= 0.1]
    ticket = ticket_at_round(result.run_dir, result, rounds[-1].round) if rounds \
        else result.ticket
    key_path, pub_path = write_keypair(out_dir / "owner", force=force)
    signed, receipt, report, qr = sign_ticket(ticket, "ticketctl demo",
                                              private_key=load_private_key(key_path))
    with all_or_nothing(force=force):
        signed_path = save_ticket(signed, out_dir / "digits.signed.safetensors", force=force)
        receipt_path = save_receipt(receipt, out_dir / "digits.receipt.json", force=force)
    attacked = magnitude_prune(signed.state, signed.mask, 0.3).apply_state(signed.state)
    verdict = check_suspect(Suspect.of(signed, attacked, where="pruned 30%"),
                            Marks(receipt=load_receipt(receipt_path),
                                  public_key=load_public_key(pub_path)))
    return {"density": ticket.density, "qr_version": qr.version,
            "layer": report.placements[0].layer, "modules_changed": report.modules_changed,
            "attack": "magnitude pruning 30%", "verified": verdict.verified,
            "message": verdict.message, "bit_match": verdict.bit_match,
            "p_value": verdict.p_value, "signed": str(signed_path),
            "receipt": str(receipt_path)}


PREDICT_SCRIPT = """\
# A stand-in for a prediction service: labels the images of an .npz (uint8 N x H x W x C).
import json, sys
import numpy as np, torch
from ticketctl.artifacts import load_ticket
t = load_ticket(sys.argv[1])
d = t.dataset
x = torch.from_numpy(np.load(sys.argv[2])["images"]).permute(0, 3, 1, 2).float() / 255
x = (x - torch.tensor(d["mean"]).view(1, -1, 1, 1)) / torch.tensor(d["std"]).view(1, -1, 1, 1)
print(json.dumps(t.build_model().eval()(x).argmax(1).tolist()))
"""


def _scheme_v3(signed_path: Path, key_path: Path, out_dir: Path, settings: Any,
               force: bool) -> dict[str, Any]:
    """Derive a trigger set from the owner's key, retrain the signed ticket with it, and
    verify the result black-box: locally, and through a prediction command."""
    raw = load_private_key(key_path).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
        serialization.NoEncryption())
    data = load_dataset("digits")
    ts = trigger_generate(raw, n=50, size=8, channels=1, num_classes=data.num_classes)
    set_path = save_trigger_set(ts, out_dir / "digits.trigger.npz", force=force)
    ticket = load_ticket(signed_path)
    trig = (ts.tensor(data.input_shape, data.mean, data.std), torch.from_numpy(ts.labels))
    cfg = replace(settings.train, epochs=12)
    result, marked = retrain_ticket(ticket, data, cfg, trigger=trig, trigger_per_batch=16,
                                    trigger_sha256=ts.sha256())
    marked_path = save_ticket(marked, out_dir / "digits.marked.safetensors", force=force)
    marks = Marks(trigger=ts)
    local = check_suspect(Suspect.of(marked), marks, data)
    script = write_text_atomic(out_dir / "predict.py", PREDICT_SCRIPT, force=force)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} " \
          f"{shlex.quote(str(marked_path))}"
    remote = verify(None, marks, predict_cmd=cmd, dataset="digits", timeout=120)
    return {"test_accuracy": result.test_accuracy,
            "trigger_accuracy": result.trigger_accuracy,
            "local": local.to_dict(), "predict_cmd": remote.to_dict(),
            "verified": local.verified and remote.verified,
            "trigger_set": str(set_path), "marked": str(marked_path),
            "predict_script": str(script)}


def _attacks(marked: Path, receipt: Path, trigger: Path) -> list[dict[str, Any]]:
    """Prune, add-on and quantization sweeps on the signed, trigger-marked model, checked
    both ways."""
    ticket = load_ticket(marked)
    data = load_dataset("digits")
    checks = owner_checks(ticket, data, Marks(receipt=load_receipt(receipt),
                                              trigger=load_trigger_set(trigger), defend=True))
    reports = [sweep(ticket, data, "prune-omp", [0.1, 0.3, 0.5],
                     lambda s: pruned(ticket, "omp", s), checks),
               sweep(ticket, data, "addon", [0.01, 0.05],
                     lambda s: added(ticket, s), checks),
               sweep(ticket, data, "quantize", ["int8", "int4"],
                     lambda f: quantized(ticket, f), checks, rates=False)]
    return [r.to_dict() for r in reports]


def default_out_dir() -> Path:
    return Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")


def run_demo(
    out_dir: Path,
    force: bool = False,
    device: str = "cpu",
    events: Events | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Find an extreme ticket for the digits CNN (dense training, IMP with rewinding, the
    extreme search), save the ticket, the trained model and a plot, and describe the ticket."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise TicketctlError(f"--out-dir {out_dir} is a file, not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise TicketctlError(f"{out_dir} exists and is not empty; pass --force or another "
                             "--out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TicketctlError(f"cannot make --out-dir {out_dir}: {e.strerror or e}") from None
    events = events or Events()
    t0 = time.perf_counter()
    stage_seconds: dict[str, float] = {}  # where the time goes, shown with the result
    last = [t0]

    def lap(name: str) -> None:
        now = time.perf_counter()
        stage_seconds[name] = round(now - last[0], 2)
        last[0] = now

    settings = resolve_settings("demo", train=TrainOverrides(seed=seed))
    events.stage("1/5 finding an extreme ticket: dense training, then pruning rounds")
    result = find_ticket(settings, out_dir / "run", force=True, device=device, events=events)
    with all_or_nothing(force=force):
        ticket = save_ticket(result.ticket, out_dir / "digits.ticket.safetensors", force=force)
        trained = save_ticket(result.trained, out_dir / "digits.trained.safetensors",
                              force=force)
        plot = plot_search(result.rounds, result.dense_accuracy, out_dir / "search.png",
                           title="digits_cnn on digits: extreme-ticket search", force=force,
                           tolerance=settings.search.tolerance)
    lap("find")
    events.stage("2/5 Scheme V1: a key split off, merged back, the locked part retrained")
    v1 = _scheme_v1(result.ticket, out_dir, settings, device, force)
    lap("v1")
    events.stage("3/5 Scheme V2: a QR code signed into the mask, verified after pruning")
    v2 = _scheme_v2(result, out_dir, force)
    lap("v2")
    events.stage("4/5 Scheme V3: retraining with a trigger set, a black-box check")
    v3 = _scheme_v3(Path(v2["signed"]), out_dir / "owner.key", out_dir, settings, force)
    lap("v3")
    events.stage("5/5 attacks: pruning, add-on and quantization sweeps, every mark checked")
    attacks = _attacks(Path(v3["marked"]), Path(v2["receipt"]), Path(v3["trigger_set"]))
    lap("attacks")
    return {
        "out_dir": str(out_dir),
        "find": result.summary(),
        "v1": v1,
        "v2": v2,
        "v3": v3,
        "attacks": attacks,
        "files": [str(ticket), str(trained), str(plot), v1["key"], v1["locked"], v1["merged"],
                  v2["signed"], v2["receipt"], v3["trigger_set"], v3["marked"],
                  v3["predict_script"]],
        "inspect": describe_file(ticket),
        "seconds": time.perf_counter() - t0,
        "stage_seconds": stage_seconds,
    }
