"""Packed training speed: ResNet-20 at batch 128 per model, K = 1, 4, 8, 16 models in one
packed network on one GPU, against the baseline of K sequential single-model runs (the single
trainer's epoch time times K, measured in the same process). Reports seconds per
model-epoch, the speed-up and peak GPU memory. Whole training epochs are timed (no
evaluation), after one untimed warm-up epoch that compiles and captures the CUDA graph.

    python benchmarks/packed_speed.py --data-dir DATA --json-out packed.json
    python benchmarks/packed_speed.py --smoke        # tiny CPU check of the script itself

Without --data-dir the data are synthetic (CIFAR-shaped): fine for speed only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from ticketctl.data import load_dataset
from ticketctl.device import configure_cuda, resolve_device
from ticketctl.prune import resolve_settings
from ticketctl.train import Trainer
from ticketctl.train.engine import Engine
from ticketctl.train.packed import PackedTrainer

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import pruned_ticket  # noqa: E402


def epoch_seconds(trainer: Engine, epochs: int) -> float:
    trainer.train_epoch(1)  # warm-up: compile and capture
    sync()
    times = []
    for e in range(2, 2 + epochs):
        t0 = time.perf_counter()
        trainer.train_epoch(e)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir")
    ap.add_argument("--packs", default="1,4,8,16")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2, help="timed epochs per config")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    configure_cuda()
    dev = resolve_device("cpu" if args.smoke else "auto")
    if args.smoke:
        data = load_dataset("synthetic", device=dev, synthetic_size=512)
        args.packs, args.epochs = "1,2", 1
    elif args.data_dir:
        data = load_dataset("cifar10", args.data_dir, device=dev)
    else:
        data = load_dataset("synthetic", device=dev)
    cfg = replace(resolve_settings("paper", arch="resnet20", dataset="cifar10").train,
                  batch_size=args.batch_size)
    ticket = pruned_ticket("resnet20", 0.2)
    rows = []
    single = None
    for k in [int(p) for p in args.packs.split(",")]:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if k == 1:
            tr: Engine = Trainer(ticket.build_model(), data, cfg, mask=ticket.mask)
        else:
            tr = PackedTrainer(ticket.build_model(), data, cfg, [ticket.mask] * k,
                               list(range(k))).engine
        t0 = time.perf_counter()
        sec = epoch_seconds(tr, args.epochs)
        row = {"packs": k, "epoch_seconds": sec, "seconds_per_model_epoch": sec / k,
               "setup_seconds": time.perf_counter() - t0 - sec * args.epochs,
               "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30
                                   if torch.cuda.is_available() else None)}
        if k == 1:
            single = sec
        if single is not None:
            row["sequential_seconds_per_model_epoch"] = single
            row["speedup_vs_sequential"] = single / (sec / k)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del tr
    result = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "batch_per_model": args.batch_size,
              "data": "cifar10" if args.data_dir else "synthetic", "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    print("| K | s per epoch | s per model-epoch | K sequential, s per model-epoch | speed-up |"
          " peak GiB |\n| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(f"| {r['packs']} | {r['epoch_seconds']:.3f} | {r['seconds_per_model_epoch']:.3f} "
              f"| {r.get('sequential_seconds_per_model_epoch', float('nan')):.3f} | "
              f"{r.get('speedup_vs_sequential', float('nan')):.2f}x | {mem} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
