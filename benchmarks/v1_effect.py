"""Scheme V1 effect table: accuracy of a locked ticket retrained without its key (`nokey`) and
with a forged random key of the same size (`fake1`), for each score and key ratio, beside the
original ticket retrained the same way (the reference, key ratio 0). The paper's Figures 2
and 5 report about 2-6 points lost at 5-20% on ResNet-20.

Resumable: every finished training is kept in --out-dir and reused, so a run cut short by a
time limit continues where it stopped.

    python benchmarks/v1_effect.py --ticket r20.safetensors --data-dir DATA --preset fast \\
        --out-dir v1-sweep --md-out v1.md --json-out v1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ticketctl.artifacts import load_ticket
from ticketctl.attacks import AttackRunner
from ticketctl.attacks.keymask import forge_key, forged_size
from ticketctl.attacks.spread import parse_devices
from ticketctl.data import load_recorded_dataset
from ticketctl.device import configure_cuda, resolve_device
from ticketctl.protect import split_ticket
from ticketctl.prune import resolve_settings
from ticketctl.train.config import TrainOverrides


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticket", required=True)
    ap.add_argument("--data-dir")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--scores", default="omp,ewp,betweenness,random")
    ap.add_argument("--ratios", default="0.05,0.1,0.15,0.2")
    ap.add_argument("--conditions", default="nokey,fake1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/v1-effect")
    ap.add_argument("--budget-s", type=float, default=0, help="start no training after this")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--pack", type=int, help="models per packed network (default 8 on CUDA "
                    "for models of at most 2 M weights)")
    ap.add_argument("--devices", help="spread the trainings: 'all' GPUs or cuda:0,cuda:1 "
                    "(default: every visible GPU when the data are on a GPU)")
    ap.add_argument("--json-out")
    ap.add_argument("--md-out")
    args = ap.parse_args()
    configure_cuda()
    t0 = time.perf_counter()
    ticket = load_ticket(args.ticket)
    settings = resolve_settings(args.preset, arch=ticket.arch,
                                dataset=(ticket.dataset or {}).get("name"),
                                train=TrainOverrides(epochs=args.epochs, seed=args.seed))
    data = load_recorded_dataset(ticket.dataset or {}, None, args.data_dir,
                                 device=resolve_device(args.device))
    runner = AttackRunner(data, settings.train, out_dir=args.out_dir, pack=args.pack,
                          devices=parse_devices(args.devices, data.device))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    def over_budget() -> bool:
        return bool(args.budget_s) and time.perf_counter() - t0 > args.budget_s

    ref = runner.retrain(ticket, "original")
    log(f"reference (ratio 0): {ref.accuracy:.2f}%")
    rows, jobs = [], []
    for score in args.scores.split(","):
        for ratio in [float(r) for r in args.ratios.split(",")]:
            _, locked = split_ticket(ticket, score, ratio, seed=args.seed)
            row = {"score": score, "key_ratio": ratio, "key_weights": ticket.mask.num_kept
                   - locked.mask.num_kept}
            for cond in args.conditions.split(","):
                row[cond] = None
                target = locked if cond == "nokey" else \
                    forge_key(locked, forged_size(locked, ratio), seed=args.seed)
                jobs.append((row, cond, target, f"{score} {ratio} {cond}"))
            rows.append(row)
    t_sweep = time.perf_counter()
    step = runner.pack * len(runner.devices or [None])  # a packed network per device
    for start in range(0, len(jobs), step):
        if over_budget():
            log("budget reached; rerun with the same --out-dir to continue")
            break
        chunk = jobs[start:start + step]
        results = runner.retrain_many([j[2] for j in chunk], [j[3] for j in chunk])
        for (row, cond, _, label), res in zip(chunk, results, strict=True):
            row[cond] = res.accuracy
            log(f"{label:28s} {res.accuracy:.2f}%")
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, "ticket_density": ticket.density,
            "ticket_kept": ticket.mask.num_kept, "reference_accuracy": ref.accuracy,
            "train": settings.train.to_dict(), "jobs_run": runner.jobs_run,
            "jobs_cached": runner.jobs_cached, "seconds": time.perf_counter() - t0,
            "sweep_seconds": time.perf_counter() - t_sweep, "pack": runner.pack,
            "complete": all(r.get(c) is not None for r in rows
                            for c in args.conditions.split(","))}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"{ticket.arch} V1 effect on {meta['gpu']} | ticket density "
             f"{100 * ticket.density:.2f}% ({ticket.mask.num_kept} weights) | "
             f"reference {ref.accuracy:.2f}% | {settings.train.epochs} epochs",
             "", "| score | key ratio | key weights | no key | change | forged key | change |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = []
        for cond in ("nokey", "fake1"):
            acc = r.get(cond)
            cells += ["-", "-"] if acc is None else [f"{acc:.2f}", f"{acc - ref.accuracy:+.2f}"]
        lines.append(f"| {r['score']} | {r['key_ratio']:g} | {r['key_weights']} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.md_out:
        Path(args.md_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
