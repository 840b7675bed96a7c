"""Data-parallel scaling of ticket finding on the GPUs of one host, through
`torch.distributed` (torchrun, NCCL). Strong scaling: the same global batch at every GPU
count (each of n GPUs trains global/n images a step), so an epoch has the same steps and
the speed-up is the real one. The 1-GPU row is the ordinary single-process trainer (CUDA
graphs where the preset has them), not DDP over one rank: the baseline a user has without
`--nproc`. Reports seconds per epoch, images per second and efficiency t(1) / (n t(n)).
Every GPU count runs its step as one CUDA graph (the gradients' all-reduce inside it);
`--compare-eager` adds each multi-GPU count once more without the graph.

`--round`: also time one whole IMP round per GPU count (`ticketctl find --rounds 1 --rate
0.2 --nproc n`, dense training plus one round, wall clock) and the Jaccard agreement of the
ticket's mask with the 1-GPU one. NVLink multicast stays off (NCCL_NVLS_ENABLE=0).

    python benchmarks/ddp_scaling.py --gpus 1,2 --arch resnet50 --global-batch 512 \
        --data-dir DATA --round --json-out ddp.json
    python benchmarks/ddp_scaling.py --gpus 1,2 --arch resnet18 --compare-eager --data-dir DATA
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

sys.path.insert(0, str(Path(__file__).parent))
from bench_common import ROOT, on_ranks, rank_env  # noqa: E402


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
    preset = resolve_settings("fast", arch=args.arch, dataset="cifar10").train
    cfg = replace(preset, batch_size=args.global_batch,
                  cuda_graph=preset.cuda_graph and not args.no_graph)
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
        epoch = statistics.median(times)
        Path(args.result).write_text(json.dumps({
            "gpus": world, "epoch_seconds": epoch, "times": times,
            "global_batch": cfg.batch_size, "steps_per_epoch": tr.steps_per_epoch,
            "images_per_second": tr.steps_per_epoch * cfg.batch_size / epoch,
            "ddp": ctx is not None, "cuda_graph": tr.use_graph}))
    shutdown()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--global-batch", type=int, default=512,
                    help="images a step over all GPUs (the same at every GPU count)")
    ap.add_argument("--round", action="store_true",
                    help="also time one whole IMP round per GPU count and compare masks")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--compare-eager", action="store_true",
                    help="also run every multi-GPU count without CUDA graphs (the step as "
                         "separate kernel launches), to show what the graph buys")
    ap.add_argument("--no-graph", action="store_true", help=argparse.SUPPRESS)
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
        args.gpus, args.arch, args.global_batch, args.epochs = "1,2", "digits_cnn", 128, 1
    available = torch.cuda.device_count() if not args.smoke else 2
    rows = []
    runs = [(int(g), False) for g in args.gpus.split(",")]
    if args.compare_eager:
        runs += [(n, True) for n, _ in runs if n > 1]
    for n, eager in runs:
        if n > available:
            rows.append({"gpus": n, "skipped": f"only {available} GPUs here"})
            continue
        extra = ["--arch", args.arch, "--global-batch", str(args.global_batch), "--epochs",
                 str(args.epochs)]
        extra += ["--smoke"] if args.smoke else []
        extra += ["--no-graph"] if eager else []
        extra += ["--data-dir", args.data_dir] if args.data_dir else []
        row, error = on_ranks(Path(__file__).resolve(), n, extra)
        if row is None:
            rows.append({"gpus": n, "error": error})
            continue
        rows.append(row)
        if args.round and not eager:
            rows[-1].update(whole_round(args, n, rank_env()))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "_mask"}),
              file=sys.stderr, flush=True)
    masks = {r["gpus"]: r.pop("_mask") for r in rows if "_mask" in r}
    if 1 in masks:
        for r in rows:
            if r.get("gpus") in masks and "round_seconds" in r:
                r["mask_jaccard_vs_1"] = _jaccard(masks[1], masks[r["gpus"]])
    base = next((r["epoch_seconds"] for r in rows if r.get("gpus") == 1 and "epoch_seconds" in r),
                None)
    for r in rows:
        if base and "epoch_seconds" in r:
            r["efficiency"] = base / (r["gpus"] * r["epoch_seconds"])
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "arch": args.arch, "global_batch": args.global_batch, "rows": rows}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))
    print("| GPUs | step | s per epoch | images/s | efficiency | round (s) | mask Jaccard vs 1 |"
          "\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "epoch_seconds" in r:
            step = "CUDA graph" if r["cuda_graph"] else "eager"
            rnd = f"{r['round_seconds']:.0f}" if "round_seconds" in r else "-"
            jac = f"{r['mask_jaccard_vs_1']:.3f}" if "mask_jaccard_vs_1" in r else "-"
            print(f"| {r['gpus']} | {step} | {r['epoch_seconds']:.2f} | "
                  f"{r['images_per_second']:.0f} | {100 * r['efficiency']:.0f}% | {rnd} | "
                  f"{jac} |")
        else:
            print(f"| {r['gpus']} | - | - | - | {r.get('skipped') or 'error'} | - | - |")
    return 0 if all("error" not in r for r in rows) else 1


def whole_round(args: argparse.Namespace, n: int, env: dict[str, str]) -> dict:
    """`find --rounds 1 --rate 0.2` on n GPUs (the CLI a user runs): wall seconds, and the
    ticket's mask for the agreement with one GPU."""
    from ticketctl.artifacts import load_ticket

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "t.safetensors"
        cmd = [sys.executable, "-m", "ticketctl", "find", "--arch", args.arch,
               "--rounds", "1", "--rate", "0.2", "--batch-size", str(args.global_batch),
               "--out", str(out), "--run-dir", str(Path(tmp) / "run"), "--json", "-q"]
        cmd += (["--dataset", "digits", "--preset", "demo", "--device", "cpu"] if args.smoke
                else ["--dataset", "cifar10", "--preset", "fast"]
                + (["--data-dir", args.data_dir] if args.data_dir else []))
        cmd += ["--nproc", str(n)] if n > 1 else []
        t0 = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            return {"round_error": p.stderr.strip()[-500:]}
        mask = {k: v.clone() for k, v in load_ticket(out).mask.items()}
    return {"round_seconds": seconds, "_mask": mask}


def _jaccard(a: dict, b: dict) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / max(1, union)


if __name__ == "__main__":
    raise SystemExit(main())
