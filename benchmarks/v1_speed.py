"""Scheme V1 speed on the CPU: each score on a ResNet-20 ticket, and split + merge (with file
writes and validated loads) of a ResNet-50 ticket. The baseline in the same run is `omp`,
the cheapest possible score (a copy of |w|).

    python benchmarks/v1_speed.py [--ticket R20.safetensors] [--density 0.2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from bench_common import pruned_ticket, timed

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.protect import compute_scores, merge_parts, split_ticket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ticket", help="a ResNet-20 ticket (default: magnitude-pruned init)")
    ap.add_argument("--density", type=float, default=0.1937,
                    help="density of the default ResNet-20 ticket (the paper's 19.37%%)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    r20 = load_ticket(args.ticket) if args.ticket else pruned_ticket("resnet20", args.density)
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}")
    print(f"ResNet-20 ticket: {100 * r20.density:.2f}% density, {r20.mask.num_kept:,} weights")
    print("| score | seconds (median) | target |")
    print("| --- | --- | --- |")
    targets = {"omp": 1, "random": 1, "ewp": 10, "betweenness": 30}
    for score, opts in (("omp", {}), ("random", {}), ("ewp", {"walks": 10_000}),
                        ("betweenness", {})):
        reps = args.repeats if score != "betweenness" else 1
        t = timed(lambda s=score, o=opts: compute_scores(r20, s, seed=0, **o), reps,
                  warmup=False)
        label = score + (" (10,000 walks)" if score == "ewp" else " (exact)"
                         if score == "betweenness" else "")
        print(f"| {label} | {t:.3f} | < {targets[score]} s |")

    r50 = pruned_ticket("resnet50", 0.2)
    with tempfile.TemporaryDirectory() as d:
        src = save_ticket(r50, Path(d) / "r50.safetensors")

        def split_merge() -> None:
            key, locked = split_ticket(load_ticket(src), "omp", 0.1)
            save_ticket(key, Path(d) / "k.safetensors", force=True)
            save_ticket(locked, Path(d) / "l.safetensors", force=True)
            merged = merge_parts(load_ticket(Path(d) / "l.safetensors"),
                                 load_ticket(Path(d) / "k.safetensors"))
            save_ticket(merged, Path(d) / "m.safetensors", force=True)

        t = timed(split_merge, args.repeats, warmup=False)
    print(f"| split + merge of a ResNet-50 ticket (20% density, omp, key 10%; load, score, "
          f"write both parts, load them, merge, verify the hash, write) | {t:.3f} | < 5 s |")


if __name__ == "__main__":
    main()
