"""Where a sweep worker's time goes, on one device: the same pack of N ResNet-20 retrainings
trained in a spawned worker (`attacks.spread`) with a cold compiler cache, then warm with
cuDNN's autotuner off and on, then in this process (as a one-device sweep runs). Each run
reports when its first epoch ended (start-up: spawn, import, data, compilation, capture)
and its median epoch. The compiler's on-disk caches (Inductor's, AOTAutograd's, Triton's)
are a fresh folder of this run's (`--cache-dir` to name one), so the first run is cold
whatever ran on the machine before.

    python benchmarks/worker_startup.py --data-dir DATA --epochs 5 --json-out startup.json
    python benchmarks/worker_startup.py --smoke     # digits on the CPU
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from spread_speed import CompileLog, EpochClock, tickets  # noqa: E402

from ticketctl.attacks import AttackRunner  # noqa: E402
from ticketctl.attacks.spread import (  # noqa: E402
    DataSpec,
    Job,
    environment,
    join_leaving,
    run_spread,
)
from ticketctl.data import load_dataset  # noqa: E402
from ticketctl.device import configure_cuda  # noqa: E402
from ticketctl.prune import resolve_settings  # noqa: E402
from ticketctl.train.config import TrainOverrides  # noqa: E402


def timed(name: str, fn: Callable[[Callable, Path], None]) -> dict:
    """One run: `fn(on_epoch, job_store_dir)`, with its pack's epoch end times (once an
    earlier run's worker has left: a finished sweep does not wait for its exit)."""
    join_leaving()
    clock = EpochClock()
    with tempfile.TemporaryDirectory() as tmp:
        fn(clock, Path(tmp))
    packs = clock.packs()  # by label: a pack reports every job's epochs at once
    last = max(packs.values(), key=lambda p: p["first_epoch_end_s"])
    return {"run": name,
            "first_epoch_end_s": last["first_epoch_end_s"],
            # the start-up's two parts (spread_speed.EpochClock.packs says what each holds)
            "before_first_epoch_s": last.get("before_first_epoch_s"),
            "first_epoch_s": last.get("first_epoch_s"),
            "wall_s": round(clock.elapsed(), 1),
            "epoch_s": next(iter(packs.values()))["epoch_s"]}


RUNS = ("cold", "off", "on", "threads1", "here")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--cache-dir", help="the compiler caches' folder (default: a fresh "
                                         "temporary one, removed at the end)")
    ap.add_argument("--profile", help="profile the in-process run (cProfile) and write its "
                                      "costliest calls here (60 by cumulative, 30 by own "
                                      "time); that row's times then include the profiler's")
    ap.add_argument("--runs", default="cold,off,on,here",
                    help="which runs, in this order: cold (a worker, the caches empty unless "
                         "--cache-dir holds them), off and on (a worker, cuDNN's autotuner "
                         "off and on), threads1 (a worker with one Inductor compile thread), "
                         "here (this process); the rows' names ('cold', 'warm cache') "
                         "assume the default order and caches")
    ap.add_argument("--json-out")
    args = ap.parse_args()
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {', '.join(map(repr, unknown))}; choose from "
                 f"{', '.join(RUNS)}")
    if args.profile and "here" not in args.runs.split(","):
        ap.error("--profile profiles the run in this process: add here to --runs")
    with tempfile.TemporaryDirectory(prefix="worker-startup-") as fresh:
        # before anything compiles; spawned workers inherit it (Triton's cache lies inside
        # Inductor's unless TRITON_CACHE_DIR says otherwise, so that goes too)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.cache_dir or fresh
        os.environ.pop("TRITON_CACHE_DIR", None)
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    """The runs `--runs` names, in order; the JSON rewritten after each."""
    configure_cuda()
    if args.smoke:
        dev = torch.device("cpu")
        data = load_dataset("digits", device=dev)
        cfg = resolve_settings("demo", arch="digits_cnn", dataset="digits",
                               train=TrainOverrides(epochs=2)).train
        jobs = tickets("digits_cnn", 10, 2, 0.2, width=8)
    else:
        dev = torch.device("cuda:0")
        data = load_dataset("cifar10" if args.data_dir else "synthetic", args.data_dir,
                            device=dev, val_size=5000)
        cfg = resolve_settings("fast", arch="resnet20", dataset="cifar10",
                               train=TrainOverrides(epochs=args.epochs)).train
        jobs = tickets("resnet20", 10, args.jobs, 0.2)
    labels = [f"job {i}" for i in range(len(jobs))]

    def worker(autotune: bool, compile_threads: int | None = None
               ) -> Callable[[Callable, Path], None]:
        def fn(on_epoch: Callable, store: Path) -> None:
            before = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = autotune  # the switches the worker is handed
            # Inductor's compile workers (a pool it starts in every process that compiles;
            # the worker reads the variable when it imports Inductor)
            threads = None if compile_threads is None else str(compile_threads)
            try:
                with environment("TORCHINDUCTOR_COMPILE_THREADS", threads):
                    run_spread([Job("retrain", jobs, labels)], [dev], DataSpec.of(data),
                               cfg.to_dict(), store, len(jobs), on_epoch)
            finally:
                torch.backends.cudnn.benchmark = before
        return fn

    compiled: dict = {}
    # Dynamo imported before any clock starts (2 s on a CPU, where nothing compiles)
    importlib.import_module("torch._dynamo.utils")

    def here(on_epoch: Callable, store: Path) -> None:
        log = CompileLog()
        runner = AttackRunner(data, cfg, out_dir=store, pack=len(jobs), on_epoch=on_epoch)
        if args.profile:  # where the start-up goes, call by call (the profiler slows it)
            import cProfile
            import io
            import pstats

            prof = cProfile.Profile()
            prof.runcall(runner.retrain_many, jobs, labels)
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(30)
            Path(args.profile).write_text(text.getvalue())
        else:
            runner.retrain_many(jobs, labels)
        compiled.update(log.report())

    runs = {"cold": ("worker, autotuner on, cold cache", worker(True)),
            "off": ("worker, autotuner off, warm cache", worker(False)),
            "on": ("worker, autotuner on, warm cache", worker(True)),
            "threads1": ("worker, autotuner on, warm cache, one compile thread",
                         worker(True, 1)),
            "here": ("this process, autotuner on, after the workers"
                     + (" (profiled: slower)" if args.profile else ""), here)}
    rows = []
    for key in args.runs.split(","):
        name, fn = runs[key]
        rows.append(timed(name, fn))
        if key == "here":  # did this process find the workers' compiled code on disk?
            rows[-1].update(compiled)
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        if args.json_out:  # after every run: the next may not finish
            Path(args.json_out).write_text(json.dumps(
                {"jobs": len(jobs), "epochs": cfg.epochs, "rows": rows,
                 "compiler_cache": args.cache_dir or "fresh",
                 "gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                 "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
