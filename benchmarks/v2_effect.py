"""Scheme V2 on CIFAR-10: accuracy cost of signing, robustness of the signature in the
trained model, and false verifications on unrelated tickets.

    python benchmarks/v2_effect.py --ticket r20.safetensors --data-dir DATA --part cost
    python benchmarks/v2_effect.py --ticket r20.safetensors --data-dir DATA --part null --models 100

`cost`: sign the ticket ("signature", support 3), retrain signed and unsigned with the same
schedule and seeds; then attack the trained signed model (magnitude and random pruning of
5-50%, add-on of 0.5-10% of the pruned positions with and without the magnitude-floor
defence) and verify each against the receipt. `null`: train `--models` unrelated dense
models (other seeds, other data orders, a short schedule), prune each to the signed ticket's
density by magnitude, and verify them against the same receipt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ticketctl.artifacts import Mask, load_ticket
from ticketctl.attacks.removal import added, random_prune
from ticketctl.data import load_recorded_dataset
from ticketctl.device import configure_cuda, resolve_device
from ticketctl.models import build_model, prunable_names
from ticketctl.protect.signature import masks_of, sign_ticket, verify_with_receipt
from ticketctl.prune import magnitude_prune, resolve_settings
from ticketctl.train import Trainer
from ticketctl.train.config import TrainOverrides


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def retrain(trainer: Trainer, ticket, seed: int) -> tuple[float, dict]:
    trainer.restart(ticket.state, mask=ticket.mask, seeds=seed)
    res = trainer.fit(start_epoch=ticket.rewind_epoch or 0)
    return res.test_accuracy, trainer.model_state()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticket", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--part", choices=["cost", "null"], required=True)
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--models", type=int, default=100)
    ap.add_argument("--null-epochs", type=int, default=10)
    ap.add_argument("--json-out", required=True)
    args = ap.parse_args()
    configure_cuda()
    t0 = time.perf_counter()
    ticket = load_ticket(args.ticket)
    signed, receipt, report, qr = sign_ticket(ticket, "signature", seed=0)
    log(f"signed: v{qr.version} mask {qr.mask_pattern} at {report.placements}, "
        f"{report.modules_changed} modules changed, density {ticket.density} -> "
        f"{signed.density}")
    dev = resolve_device("auto")
    data = load_recorded_dataset(ticket.dataset or {}, None, args.data_dir, device=dev)
    out: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                 "ticket_density": ticket.density, "signed_density": signed.density,
                 "qr_version": qr.version, "placements": str(report.placements),
                 "modules_changed": report.modules_changed}
    if args.part == "cost":
        cfg = resolve_settings(args.preset, arch=ticket.arch, dataset="cifar10").train
        trainer = Trainer(ticket.build_model(), data, cfg, mask=ticket.mask)
        rows = []
        trained_signed = None
        for seed in [int(s) for s in args.seeds.split(",")]:
            a_plain, _ = retrain(trainer, ticket, seed)
            a_signed, st = retrain(trainer, signed, seed)
            trained_signed = trained_signed or st
            rows.append({"seed": seed, "unsigned": a_plain, "signed": a_signed})
            log(f"seed {seed}: unsigned {a_plain:.2f} signed {a_signed:.2f}")
        out["retrain"] = rows
        attacks = []
        for rate in (0.05, 0.1, 0.2, 0.3, 0.5):
            for method in ("omp", "random"):
                mask = magnitude_prune(trained_signed, signed.mask, rate) if method == "omp" \
                    else random_prune(signed.mask, rate, 0)
                pruned = mask.apply_state(trained_signed)
                model = signed.build_model()
                model.load_state_dict(pruned)
                trainer.set_mask(mask)
                trainer.load_model_state(pruned)
                acc = trainer.evaluate("test")
                v = verify_with_receipt(masks_of(pruned, dict(mask)), receipt)
                attacks.append({"attack": f"prune-{method}", "strength": rate, "accuracy": acc,
                                "message": v.message, "bit_match": v.bit_match,
                                "p_value": v.p_value, "verified": v.verified})
                log(f"prune {method} {rate}: acc {acc:.2f} msg {v.message} p {v.p_value:.3g}")
        for rate in (0.005, 0.01, 0.02, 0.05, 0.1):
            st = added(replace(signed, state=trained_signed), rate, 0)
            masks = masks_of(st)
            for defend in (False, True):
                v = verify_with_receipt(masks, receipt, floor_defence=defend, state=st)
                attacks.append({"attack": "addon" + ("+defence" if defend else ""),
                                "strength": rate, "message": v.message,
                                "bit_match": v.bit_match, "p_value": v.p_value,
                                "verified": v.verified})
                log(f"addon {rate} defend={defend}: msg {v.message} p {v.p_value:.3g}")
        out["attacks"] = attacks
    else:
        cfg = resolve_settings(args.preset, arch=ticket.arch, dataset="cifar10",
                               train=TrainOverrides(epochs=args.null_epochs)).train
        model = build_model(ticket.arch, ticket.num_classes, seed=1000, **ticket.arch_args)
        names = prunable_names(model)
        trainer = Trainer(model, data, cfg, mask=Mask.ones(model, names))
        full = Mask.ones(model, names)
        rate = 1.0 - signed.density
        rows = []
        for i in range(args.models):
            seed = 1000 + i
            fresh = build_model(ticket.arch, ticket.num_classes, seed=seed, **ticket.arch_args)
            trainer.restart(fresh.state_dict(), mask=full, seeds=seed)
            res = trainer.fit()
            st = trainer.model_state()
            mask = magnitude_prune(st, full, rate)
            v = verify_with_receipt(masks_of(mask.apply_state(st), dict(mask)), receipt)
            rows.append({"seed": seed, "accuracy": res.test_accuracy, "bit_match": v.bit_match,
                         "p_value": v.p_value, "verified": v.verified, "message": v.message})
            log(f"null {i}: acc {res.test_accuracy:.2f} bits {v.bit_match:.3f} "
                f"p {v.p_value:.3g} verified {v.verified}")
        out["null"] = rows
        out["false_verifications"] = sum(r["verified"] for r in rows)
        out["max_bit_match"] = max(r["bit_match"] for r in rows)
        out["min_p_value"] = min(r["p_value"] for r in rows)
    out["seconds"] = time.perf_counter() - t0
    Path(args.json_out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
