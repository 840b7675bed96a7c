"""Data-parallel scaling of ticket finding: epoch time of ResNet-50 (CIFAR stem) at 1, 2, 4
and 8 GPUs of one host through `torch.distributed` (torchrun, NCCL), with a fixed batch per
GPU (weak scaling: the global batch grows with the GPUs, an epoch has fewer steps). Scaling
efficiency at n GPUs = t(1) / (n * t(n)). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

    python benchmarks/ddp_scaling.py --gpus 1,2,4,8 --data-dir DATA --json-out ddp.json
    python benchmarks/ddp_scaling.py --smoke          # gloo on CPU, a tiny model, 1 and 2 ranks
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def worker(args: argparse.Namespace) -> None:
    from ticketctl.artifacts import Mask
    from ticketctl.data import load_dataset
    from ticketctl.device import configure_cuda, resolve_device
    from ticketctl.distributed import init_from_env, shutdown
    from ticketctl.models import build_model, prunable_names
    from ticketctl.prune import resolve_settings
    from ticketctl.train import Trainer

    configure_cuda()
    dev = resolve_device("cpu" if args.smoke else "auto")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    ctx = init_from_env(dev)
    world = ctx.world if ctx else 1
    if args.smoke:
        data = load_dataset("synthetic", device=dev, synthetic_size=2048)
    elif args.data_dir:
        data = load_dataset("cifar10", args.data_dir, device=dev)
    else:
        data = load_dataset("synthetic", device=dev)
    cfg = replace(resolve_settings("paper", arch=args.arch, dataset="cifar10").train,
                  batch_size=args.batch_per_gpu * world, cuda_graph=False)
    model = build_model(args.arch, 10, seed=0, in_channels=data.input_shape[0])
    mask = Mask.ones(model, prunable_names(model))
    tr = Trainer(model, data, cfg, mask=mask, dist=ctx)
    tr.train_epoch(1)  # warm-up (compile)
    times = []
    for e in range(2, 2 + args.epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.train_epoch(e)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if ctx is None or ctx.is_main:
        Path(args.result).write_text(json.dumps({
            "gpus": world, "epoch_seconds": statistics.median(times), "times": times,
            "global_batch": cfg.batch_size, "steps_per_epoch": tr.steps_per_epoch}))
    shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch-per-gpu", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--data-dir")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json-out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.gpus, args.arch, args.batch_per_gpu, args.epochs = "1,2", "digits_cnn", 64, 1
    available = torch.cuda.device_count() if not args.smoke else 2
    rows = []
    for n in [int(g) for g in args.gpus.split(",")]:
        if n > available:
            rows.append({"gpus": n, "skipped": f"only {available} GPUs here"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "r.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={n}", str(Path(__file__).resolve()), "--worker",
                   "--result", str(result), "--arch", args.arch, "--batch-per-gpu",
                   str(args.batch_per_gpu), "--epochs", str(args.epochs)]
            cmd += ["--smoke"] if args.smoke else []
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")]))}
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                rows.append({"gpus": n, "error": p.stderr.strip()[-500:]})
                continue
            rows.append(json.loads(result.read_text()))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    base = next((r["epoch_seconds"] for r in rows if r.get("gpus") == 1 and "epoch_seconds" in r),
                None)
    for r in rows:
        if base and "epoch_seconds" in r:
            r["efficiency"] = base / (r["gpus"] * r["epoch_seconds"])
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "arch": args.arch, "batch_per_gpu": args.batch_per_gpu, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print("| GPUs | s per epoch | efficiency |\n| --- | --- | --- |")
    for r in rows:
        if "epoch_seconds" in r:
            print(f"| {r['gpus']} | {r['epoch_seconds']:.2f} | {100 * r['efficiency']:.0f}% |")
        else:
            print(f"| {r['gpus']} | - | {r.get('skipped') or 'error'} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
