"""Data-parallel scaling of ticket finding on the GPUs of one host, through
`torch.distributed` (torchrun, NCCL). Strong scaling: the same global batch at every GPU
count (each of n GPUs trains global/n images a step), so an epoch has the same steps and
the speed-up is the real one. The 1-GPU row is the ordinary single-process trainer (CUDA
graphs where the preset has them), not DDP over one rank: the baseline a user has without
`--nproc`. Reports seconds per epoch, images per second and efficiency t(1) / (n t(n)).
Every GPU count runs its step as one CUDA graph (the gradients' all-reduce inside it);
`--compare-eager` adds each multi-GPU count once more without the graph;
`--compare-bf16-reduce` once more with the gradients averaged in bf16 (`--reduce-bf16`);
`--compare-buckets 0,25` once more for each gradient bucket size (`--bucket-mb`; 0: one
all-reduce after backward, the step before buckets overlapped it with backward).
`--comm` first times the all-reduce alone on each multi-GPU count: the network's gradient
size in fp32 and bf16, launched eagerly and replayed from a CUDA graph (as the step does),
with the bandwidth it reached and whether the GPUs reach each other's memory directly.

`--round`: also time one whole IMP round per GPU count (`ticketctl find --rounds 1 --rate
0.2 --nproc n`, dense training plus one round, wall clock) and the Jaccard agreement of the
ticket's mask with the 1-GPU one; the 1-GPU round runs twice, so `mask_jaccard_1_repeat` says
how far two 1-GPU runs already differ (GPU arithmetic is not bit-reproducible, and training
from initialisation amplifies the difference). NVLink multicast stays off
(NCCL_NVLS_ENABLE=0).

    python benchmarks/ddp_scaling.py --gpus 1,2 --arch resnet50 --global-batch 512 \
        --data-dir DATA --round --json-out ddp.json
    python benchmarks/ddp_scaling.py --gpus 1,2 --arch resnet18 --compare-eager --data-dir DATA
    python benchmarks/ddp_scaling.py --smoke          # gloo on CPU, a tiny model, 1 and 2 ranks
"""

from __future__ import annotations

import argparse
import functools
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
from bench_common import ROOT, on_ranks, rank_env, rank_options  # noqa: E402


def worker(args: argparse.Namespace) -> None:
    import faulthandler

    from ticketctl.artifacts import Mask
    from ticketctl.data import load_dataset
    from ticketctl.device import configure_cuda, resolve_device
    from ticketctl.distributed import init_from_env, shutdown
    from ticketctl.models import build_model, prunable_names
    from ticketctl.prune import resolve_settings
    from ticketctl.train import Trainer

    # a hung collective never fails: every rank prints where it stands (and its stack when it
    # is still running near the launcher's limit), so a killed run says where it stopped
    rank = os.environ.get("RANK", "0")
    t_start = time.perf_counter()

    def say(what: str) -> None:
        print(f"[rank {rank} {time.perf_counter() - t_start:6.1f} s] {what}", file=sys.stderr,
              flush=True)

    if args.stack_after:
        faulthandler.dump_traceback_later(args.stack_after, repeat=True)
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
    if args.comm_only:
        comm_worker(args, ctx, model, dev, say)
        shutdown()
        return
    cfg = replace(cfg, reduce_bf16=args.reduce_bf16,
                  **({} if args.bucket_mb is None else {"bucket_mb": args.bucket_mb}))
    mask = Mask.ones(model, prunable_names(model))
    tr = Trainer(model, data, cfg, mask=mask, dist=ctx)
    say(f"built ({world} ranks, graph {tr.use_graph}, {len(tr.units)} units, "
        f"{len(tr.reducer.buckets) if tr.reducer else 0} buckets)")
    tr.train_epoch(1)  # warm-up (compile)
    say("epoch 1 (compile and capture) done")
    times = []
    for e in range(2, 2 + args.epochs):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        tr.train_epoch(e)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        say(f"epoch {e}: {times[-1]:.3f} s")
    if ctx is None or ctx.is_main:
        epoch = statistics.median(times)
        Path(args.result).write_text(json.dumps({
            "gpus": world, "epoch_seconds": epoch, "times": times,
            "global_batch": cfg.batch_size, "steps_per_epoch": tr.steps_per_epoch,
            "images_per_second": tr.steps_per_epoch * cfg.batch_size / epoch,
            "ddp": ctx is not None, "cuda_graph": tr.use_graph,
            "reduce": "bf16" if ctx is not None and cfg.reduce_bf16 else "fp32",
            "bucket_mb": cfg.bucket_mb if ctx is not None else None,
            "buckets": len(tr.reducer.buckets) if tr.reducer else 0, "units": len(tr.units),
            "compile_seconds": tr.compile_seconds}))
    del tr
    shutdown()
    faulthandler.cancel_dump_traceback_later()
    say("left the process group")


def comm_worker(args: argparse.Namespace, ctx, model: torch.nn.Module, dev: torch.device,
                say) -> None:
    """The gradients' all-reduce alone, at the network's size: eager calls and replays of a
    captured one, in fp32 and bf16. Bandwidth is the algorithm's (bytes of the tensor over
    the time), the number to hold against the link's."""
    import torch.distributed as dist

    numel = sum(p.numel() for p in model.parameters())
    out: dict = {"gpus": ctx.world, "numel": numel, "runs": []}
    if dev.type == "cuda" and torch.cuda.device_count() > 1:
        out["peer_access"] = torch.cuda.can_device_access_peer(0, 1)
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.zeros(numel, dtype=dtype, device=dev)  # stays finite however often summed
        for graphed in ((False, True) if dev.type == "cuda" else (False,)):
            once = functools.partial(dist.all_reduce, t)
            run = once
            if graphed:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(3):
                        once()
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                # thread-local, as the trainer captures: NCCL's watchdog may still poll
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    once()
                run = graph.replay
            for _ in range(3):
                run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            reps = 3 if args.smoke else 20
            t0 = time.perf_counter()
            for _ in range(reps):
                run()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) / reps * 1e3
            mb = numel * t.element_size() / 1e6
            out["runs"].append({"dtype": str(dtype).removeprefix("torch."), "graph": graphed,
                                "mb": mb, "ms": ms, "gb_per_s": mb / ms})
            say(f"all-reduce {mb:.1f} MB {dtype} graph={graphed}: {ms:.3f} ms")
            if graphed:
                del graph
    if ctx.is_main:
        Path(args.result).write_text(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--global-batch", type=int, default=512,
                    help="images a step over all GPUs (the same at every GPU count)")
    ap.add_argument("--round", action="store_true",
                    help="also time one whole IMP round per GPU count and compare masks")
    ap.add_argument("--round-epochs", type=int,
                    help="--round with this many epochs a training instead of the preset's "
                         "(a shorter recipe, for a round that fits a time limit)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--ceiling", action="store_true",
                    help="also time one GPU at the per-GPU batch: the efficiency n GPUs would "
                         "reach with free communication")
    ap.add_argument("--compare-eager", action="store_true",
                    help="also run every multi-GPU count without CUDA graphs (the step as "
                         "separate kernel launches), to show what the graph buys")
    ap.add_argument("--compare-bf16-reduce", action="store_true",
                    help="also run every multi-GPU count with the gradients averaged in bf16 "
                         "(half the bytes of the all-reduce)")
    ap.add_argument("--compare-buckets", default="",
                    help="also run every multi-GPU count with these --bucket-mb values, comma "
                         "separated (0: one all-reduce after backward, no overlap)")
    ap.add_argument("--bucket-mb", type=float,
                    help="the gradients' bucket size for the multi-GPU rows (default: the "
                         "trainer's)")
    ap.add_argument("--comm", action="store_true",
                    help="first time the gradients' all-reduce alone on each multi-GPU count")
    ap.add_argument("--no-graph", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--reduce-bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--comm-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stack-after", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data-dir")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json-out")
    rank_options(ap, run_timeout=300)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.smoke:
        args.gpus, args.arch, args.global_batch, args.epochs = "1,2", "digits_cnn", 128, 1
    available = torch.cuda.device_count() if not args.smoke else 2
    rows = []
    counts = [int(g) for g in args.gpus.split(",")]
    # the variants first: their numbers stand even if the plain graph's run fails
    comm = [comm_row(args, n) for n in counts if args.comm and 1 < n <= available]
    # each multi-GPU count: eager, then with the bf16 all-reduce, then each compared bucket
    # size, then the step as it is
    compared = [float(b) for b in args.compare_buckets.split(",") if b]
    runs = [(n, eager, bf16, bucket) for n in counts for eager, bf16, bucket in
            ([(True, False, None)] if args.compare_eager and n > 1 else []) +
            ([(False, True, None)] if args.compare_bf16_reduce and n > 1 else []) +
            ([(False, False, b) for b in compared] if n > 1 else []) +
            [(False, False, args.bucket_mb)]]
    for n, eager, bf16, bucket in runs:
        variant = bf16 or (bucket is not None and bucket != args.bucket_mb)
        if n > available:
            if not variant:
                rows.append({"gpus": n, "skipped": f"only {available} GPUs here"})
            continue
        extra = ["--arch", args.arch, "--global-batch", str(args.global_batch), "--epochs",
                 str(args.epochs)]
        extra += ["--smoke"] if args.smoke else []
        extra += ["--no-graph"] if eager else []
        extra += ["--reduce-bf16"] if bf16 else []
        extra += ["--bucket-mb", str(bucket)] if bucket is not None else []
        extra += ["--data-dir", args.data_dir] if args.data_dir else []
        extra += ["--stack-after", str(max(30, args.run_timeout - 20))]
        row, error = on_ranks(Path(__file__).resolve(), n, extra, timeout_s=args.run_timeout)
        if row is None:
            rows.append({"gpus": n, "eager": eager, "reduce": "bf16" if bf16 else "fp32",
                         "bucket_mb": bucket, "error": error})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            write(args, rows, comm)
            continue
        rows.append(row)
        if args.round and not eager and not variant:
            rows[-1].update(whole_round(args, n, rank_env()))
            if n == 1 and "_mask" in rows[-1]:  # the baseline: one GPU against itself
                again = whole_round(args, 1, rank_env())
                if "_mask" in again:
                    rows[-1]["mask_jaccard_1_repeat"] = _jaccard(rows[-1]["_mask"],
                                                                 again["_mask"])
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "_mask"}),
              file=sys.stderr, flush=True)
        write(args, rows, comm)
    masks = {r["gpus"]: r.pop("_mask") for r in rows if "_mask" in r}
    if 1 in masks:
        for r in rows:
            if r.get("gpus") in masks and r.get("gpus") != 1 and "round_seconds" in r:
                r["mask_jaccard_vs_1"] = _jaccard(masks[1], masks[r["gpus"]])
    base = next((r["epoch_seconds"] for r in rows if r.get("gpus") == 1 and "epoch_seconds" in r),
                None)
    for r in rows:
        if base and "epoch_seconds" in r:
            r["efficiency"] = base / (r["gpus"] * r["epoch_seconds"])
    if args.ceiling and base:
        ceilings(args, rows, base)
    write(args, rows, comm)
    for c in comm:
        for r in c.get("runs", []):
            print(f"all-reduce on {c['gpus']} GPUs, {r['mb']:.1f} MB {r['dtype']}"
                  f"{' (CUDA graph)' if r['graph'] else ''}: {r['ms']:.3f} ms, "
                  f"{r['gb_per_s']:.1f} GB/s", file=sys.stderr)
    print("| GPUs | step | s per epoch | images/s | efficiency | efficiency with free "
          "communication | round (s) | mask Jaccard vs 1 |"
          "\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "epoch_seconds" in r:
            step = ("CUDA graph" if r["cuda_graph"] else "eager") + \
                (", bf16 all-reduce" if r.get("reduce") == "bf16" else "") + \
                (f", {r['buckets']} buckets of {r['bucket_mb']:g} MiB, {r['units']} units"
                 if r.get("buckets") else ", one all-reduce after backward"
                 if r.get("gpus", 1) > 1 else "")
            rnd = f"{r['round_seconds']:.0f}" if "round_seconds" in r else "-"
            jac = f"{r['mask_jaccard_vs_1']:.3f}" if "mask_jaccard_vs_1" in r else \
                f"{r['mask_jaccard_1_repeat']:.3f} (a second 1-GPU run)" \
                if "mask_jaccard_1_repeat" in r else "-"
            ceil = f"{100 * r['ceiling_efficiency']:.0f}%" if "ceiling_efficiency" in r else "-"
            eff = f"{100 * r['efficiency']:.0f}%" if "efficiency" in r else "-"
            print(f"| {r['gpus']} | {step} | {r['epoch_seconds']:.2f} | "
                  f"{r['images_per_second']:.0f} | {eff} | {ceil} | "
                  f"{rnd} | {jac} |")
        else:
            print(f"| {r['gpus']} | - | - | - | {r.get('skipped') or 'error'} | - | - | - |")
    return 0 if all("error" not in r for r in rows + comm) else 1


def ceilings(args: argparse.Namespace, rows: list[dict], base: float) -> None:
    """`--ceiling`: one GPU at each count's per-GPU batch (global / n): the epoch n GPUs would
    take if communication cost nothing, so the efficiency lost to the smaller per-GPU batch
    (a GPU less busy) is told apart from the efficiency lost to the all-reduce."""
    for n in sorted({r["gpus"] for r in rows if r.get("gpus", 1) > 1 and "epoch_seconds" in r}):
        extra = ["--arch", args.arch, "--global-batch", str(args.global_batch // n),
                 "--epochs", str(args.epochs)] + (["--smoke"] if args.smoke else []) + \
            (["--data-dir", args.data_dir] if args.data_dir else [])
        one, error = on_ranks(Path(__file__).resolve(), 1, extra, timeout_s=args.run_timeout)
        if one is None:
            print(f"ceiling for {n} GPUs: {error}", file=sys.stderr)
            continue
        step = one["epoch_seconds"] / one["steps_per_epoch"]  # a step at the per-GPU batch
        for r in rows:
            if r.get("gpus") == n and "epoch_seconds" in r and \
                    r["cuda_graph"] == one["cuda_graph"]:  # (the same kind of step)
                ideal = step * r["steps_per_epoch"]
                r["ceiling_epoch_seconds"] = ideal
                r["ceiling_efficiency"] = base / (n * ideal)


def comm_row(args: argparse.Namespace, n: int) -> dict:
    """`--comm`: the all-reduce alone on n ranks (`comm_worker`)."""
    extra = ["--arch", args.arch, "--comm-only"] + (["--smoke"] if args.smoke else [])
    row, error = on_ranks(Path(__file__).resolve(), n, extra, timeout_s=args.run_timeout)
    return row if row is not None else {"gpus": n, "error": error}


def write(args: argparse.Namespace, rows: list[dict], comm: list[dict] | None = None) -> None:
    """The rows so far into --json-out (after every row: a later run may hang)."""
    if not args.json_out:
        return
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "arch": args.arch, "global_batch": args.global_batch,
           "rows": [{k: v for k, v in r.items() if k != "_mask"} for r in rows]}
    if comm:
        out["all_reduce"] = comm
    Path(args.json_out).write_text(json.dumps(out, indent=1))


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
        cmd += ["--epochs", str(args.round_epochs)] if args.round_epochs else []
        t0 = time.perf_counter()
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT,
                               timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            return {"round_error": f"killed after {args.run_timeout:.0f} s"}
        seconds = time.perf_counter() - t0
        if p.returncode != 0:
            return {"round_error": p.stderr.strip()[-500:]}
        mask = {k: v.clone() for k, v in load_ticket(out).mask.items()}
    return {"round_seconds": seconds, "round_epochs": args.round_epochs, "_mask": mask}


def _jaccard(a: dict, b: dict) -> float:
    inter = sum(int((a[k] & b[k]).sum()) for k in a)
    union = sum(int((a[k] | b[k]).sum()) for k in a)
    return inter / max(1, union)


if __name__ == "__main__":
    raise SystemExit(main())
