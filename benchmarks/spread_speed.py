"""A sweep spread over GPUs against one GPU, in the same run: `retrain_many` of N independent
ResNet-20 retrainings (20%-density masks pruned by magnitude at initialisation, one seed each),
first on one device, then over `--devices` (one worker process each, `attacks.spread`), each
into its own fresh job store. Reports wall time, speed-up and whether both give the same
accuracies (packing and CUDA make them close, not bit-equal).

    python benchmarks/spread_speed.py --data-dir DATA --devices cuda:0,cuda:1 --jobs 16 \
        --json-out spread.json
    python benchmarks/spread_speed.py --smoke          # digits on two CPU workers
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import torch

from ticketctl.artifacts import Mask, Ticket
from ticketctl.attacks import AttackRunner
from ticketctl.attacks.spread import (
    DataSpec,
    Job,
    join_leaving,
    parse_devices,
    run_spread,
    spread_width,
)
from ticketctl.data import Dataset, load_dataset
from ticketctl.device import configure_cuda
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune, resolve_settings
from ticketctl.train.config import TrainConfig, TrainOverrides
from ticketctl.train.packed import default_pack, param_count


def tickets(arch: str, classes: int, n: int, density: float, **args) -> list[Ticket]:
    """N tickets of one architecture, each its own initialisation pruned to `density`."""
    out = []
    for seed in range(n):
        model = build_model(arch, classes, seed=seed, **args)
        names = prunable_names(model)
        mask = magnitude_prune(dict(model.named_parameters()), Mask.ones(model, names),
                               1 - density)
        out.append(Ticket.from_model(model, mask, kind="ticket", arch=arch, arch_args=args,
                                     num_classes=classes, rewind_epoch=0, seed=seed))
    return out


class CompileLog:
    """This process's compilation over a stretch of time: Inductor's and AOTAutograd's
    on-disk cache hits, misses and bypasses, and the compiler's phase times (nested phases
    overlap). What a run in this process compiled, or found on disk, is read off it."""

    def __init__(self) -> None:
        from torch._dynamo.utils import compilation_time_metrics, counters

        self.metrics, self.counters = compilation_time_metrics, counters
        self.cache0 = self.caches()
        self.seen = {k: len(v) for k, v in self.metrics.items()}

    def caches(self) -> dict[str, int]:
        return {f"{group}.{k}": v for group in ("inductor", "aot_autograd")
                for k, v in self.counters[group].items() if "cache" in k}

    def report(self) -> dict:
        now = self.caches()
        seconds = {k: round(sum(v[self.seen.get(k, 0):]), 2) for k, v in self.metrics.items()}
        return {"compile_cache": {k: v - self.cache0.get(k, 0) for k, v in now.items()
                                  if v != self.cache0.get(k, 0)},
                "compile_seconds": dict(sorted(((k, v) for k, v in seconds.items()
                                                if v >= 0.01), key=lambda kv: -kv[1]))}


def timed(data, cfg, jobs, devices, pack) -> tuple[float, list[float], dict, dict]:
    """Wall time, accuracies, and where the time went: when each pack's first epoch ended
    (start-up: worker start, data, compilation and capture) and its training epochs' median
    length, from the epoch events the workers send back; for a run in this process also
    what it compiled or found in the compiler's caches (`CompileLog`)."""
    join_leaving()  # an earlier sweep's exit falls into no timing
    clock = EpochClock()
    log = CompileLog()
    with tempfile.TemporaryDirectory() as tmp:
        runner = AttackRunner(data, cfg, out_dir=Path(tmp), pack=pack, devices=devices,
                              on_epoch=clock)
        clock.start()
        results = runner.retrain_many(jobs, [f"job {i}" for i in range(len(jobs))])
        wall = clock.elapsed()
    return wall, [r.accuracy for r in results], clock.packs(), log.report()


def timed_worker(data, cfg, jobs, device, pack) -> tuple[float, list[float], dict]:
    """`timed` on one device in one spawned worker, packed as one device packs: the spread
    run's own start-up (spawn, import, data, compilation from the cache) on one device, so
    the speed-up against it is the devices' alone. (A one-device sweep otherwise runs in
    the calling process, as `timed(..., None, ...)` does.)"""
    join_leaving()  # an earlier sweep's exit falls into no timing
    clock = EpochClock()
    labels = [f"job {i}" for i in range(len(jobs))]
    width = min(default_pack(device, pack, param_count(jobs[0].state)), len(jobs))
    with tempfile.TemporaryDirectory() as tmp:
        clock.start()
        run_spread([Job("retrain", jobs[s:s + width], labels[s:s + width])
                    for s in range(0, len(jobs), width)], [device], DataSpec.of(data),
                   cfg.to_dict(), Path(tmp), pack, clock)
        wall = clock.elapsed()
        # every result is in the job store now: read back, nothing trains here
        runner = AttackRunner(data, cfg, out_dir=Path(tmp), pack=pack)
        results = runner.retrain_many(jobs, labels)
        assert runner.jobs_run == 0, "the worker left jobs undone"
    return wall, [r.accuracy for r in results], clock.packs()


class EpochClock:
    """The `on_epoch` callback of a timed sweep: when each label's epochs ended, counted from
    `start()`."""

    def __init__(self) -> None:
        self.seen: dict[str, list[float]] = {}
        self.first: dict[str, float] = {}  # the first epoch's own length, as the trainer timed it
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, label: str, stats) -> None:
        self.seen.setdefault(label, []).append(self.elapsed())
        if label not in self.first and getattr(stats, "seconds", None) is not None:
            self.first[label] = stats.seconds

    def packs(self) -> dict:
        """Per pack: when its first epoch ended (start-up: worker start, data, compilation
        and capture), its last, and its training epochs' median length; and the start-up
        split in two by the first epoch's own length (`first_epoch_s`: compilation or
        loading it from the cache, cuDNN's autotuning, capture, one epoch and its
        evaluation) and what came before it (`before_first_epoch_s`: spawn, imports, the
        dataset, the models; for the second pack of a device, the first pack's end)."""
        out = {}
        for label, ts in self.seen.items():
            row = {"first_epoch_end_s": round(ts[0], 1), "last_epoch_end_s": round(ts[-1], 1),
                   "epoch_s": round(statistics.median([b - a for a, b in pairwise(ts)]), 3)
                   if len(ts) > 1 else None}
            if label in self.first:
                row["first_epoch_s"] = round(self.first[label], 1)
                row["before_first_epoch_s"] = round(ts[0] - self.first[label], 1)
            out[label] = row
        return out


def warm_cfg(cfg: TrainConfig) -> TrainConfig:
    """The warm-up's schedule: the timed runs' own, cut short after the learning-rate warm-up
    (and one epoch more), so nothing the compiler sees differs from the timed runs'."""
    return replace(cfg, epochs=cfg.warmup_epochs + 1)


def one_width(jobs: list[Ticket], device: torch.device, pack: int | None) -> int:
    """How many jobs one device packs together (`default_pack`)."""
    return min(default_pack(device, pack, param_count(jobs[0].state)), len(jobs))


def warm_up(data: Dataset, cfg: TrainConfig, jobs: list[Ticket], devices: list[torch.device],
            pack: int | None) -> tuple[float, dict]:
    """Before anything is timed, the compiler's on-disk caches are filled for both timed
    runs: a spread worker on the first device trains each pack width the two runs use (one
    device packs as `default_pack` says; the spread run cuts packs so every device gets
    one), and then a second copy of this script, started as this one was (the same
    interpreter, flags and arguments), trains one pack
    in itself as the one-device run does. Every GPU worker calls its GPU cuda:0, so one
    worker warm-up serves them all. The copy is there because in earlier runs on an H200
    the one-device run found none of the worker's compiled code (19 s of compilation in
    one, `compiled_one_device`), when the warm-up trained a shorter schedule. Since the
    warm-up keeps the schedule (and workers set only the CUDA switches that differ) the
    copy has found all of it (session 10; the two changes came together), which its report
    says for every run. Returns the time taken and what the copy compiled or found on
    disk."""
    width = one_width(jobs, devices[0], pack)
    widths = {width, spread_width(width, len(jobs), len(devices))}
    short = warm_cfg(cfg)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run_spread([Job("retrain", jobs[:w], [f"warm {w}.{i}" for i in range(w)])
                    for w in sorted(widths)], devices[:1], DataSpec.of(data),
                   short.to_dict(), Path(tmp), pack)
        report = Path(tmp) / "compiled.json"
        subprocess.run([sys.executable, *sys.orig_argv[1:], "--warm-in-process", str(report)],
                       check=True)
        compiled = json.loads(report.read_text())
    return time.perf_counter() - t0, compiled


def warm_in_process(data: Dataset, cfg: TrainConfig, jobs: list[Ticket], pack: int | None,
                    out: str) -> None:
    """The second warm-up copy's work: one pack trained in this process, as the one-device
    run trains it; what it compiled or found on disk written to `out`."""
    width = one_width(jobs, data.train_x.device, pack)
    log = CompileLog()
    with tempfile.TemporaryDirectory() as tmp:
        AttackRunner(data, warm_cfg(cfg), out_dir=Path(tmp), pack=pack).retrain_many(
            jobs[:width], [f"warm {i}" for i in range(width)])
    Path(out).write_text(json.dumps(log.report()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--devices", default="all")
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--pack", type=int)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--warm-up", action=argparse.BooleanOptionalAction, default=True,
                    help="train one pack for a few epochs in a worker and in a copy of this "
                         "script first, so both timed runs start from a warm compiler cache "
                         "(default on)")
    ap.add_argument("--worker-baseline", action="store_true",
                    help="also time the one-device sweep in one spawned worker (the spread "
                         "run's start-up path), besides in this process as a one-GPU user runs it")
    ap.add_argument("--json-out")
    ap.add_argument("--warm-in-process", help=argparse.SUPPRESS)  # warm_up's second copy
    args = ap.parse_args()
    configure_cuda()
    if args.smoke:
        data = load_dataset("digits")
        arch, extra, devices = "digits_cnn", {"width": 8}, parse_devices("cpu,cpu")
        cfg = resolve_settings("demo", arch=arch, dataset="digits",
                               train=TrainOverrides(epochs=2)).train
        jobs = tickets(arch, 10, 4, 0.2, **extra)
        first = torch.device("cpu")
    else:
        devices = parse_devices(args.devices)
        if devices is None or len(devices) < 2:
            ap.error("--devices needs two or more: on one device a sweep runs in this process, "
                     "as the baseline does")
        first = devices[0]
        data = load_dataset("cifar10" if args.data_dir else "synthetic", args.data_dir,
                            device=first, val_size=5000)
        cfg = resolve_settings("fast", arch="resnet20", dataset="cifar10",
                               train=TrainOverrides(epochs=args.epochs)).train
        jobs = tickets("resnet20", 10, args.jobs, 0.2)
    if args.warm_in_process:
        warm_in_process(data, cfg, jobs, args.pack, args.warm_in_process)
        return 0
    warm_s, warm_compiled = warm_up(data, cfg, jobs, devices or [first], args.pack) \
        if args.warm_up else (None, None)
    if warm_s is not None:
        print(f"warm-up (a worker, then a copy of this script; {warm_cfg(cfg).epochs} epochs "
              f"each): {warm_s:.1f} s", file=sys.stderr)
    one_s, one_acc, one_packs, one_compiled = timed(data, cfg, jobs, None, args.pack)
    print(f"one device ({first}): {one_s:.1f} s", file=sys.stderr)
    worker = None
    if args.worker_baseline:
        worker = timed_worker(data, cfg, jobs, first, args.pack)
        print(f"one device ({first}), in one worker: {worker[0]:.1f} s", file=sys.stderr)
    many_s, many_acc, many_packs, _ = timed(data, cfg, jobs, devices, args.pack)
    print(f"{len(devices or [])} devices: {many_s:.1f} s, {one_s / many_s:.2f}x",
          file=sys.stderr)
    doc = {"jobs": len(jobs), "epochs": cfg.epochs, "devices": [str(d) for d in devices or []],
           "one_device_s": round(one_s, 1), "spread_s": round(many_s, 1),
           "speedup": round(one_s / many_s, 3), "warm_up_s": warm_s and round(warm_s, 1),
           # did a process started as this one find the warm-up worker's compiled code?
           "compiled_warm_up_copy": warm_compiled,
           "max_accuracy_difference": max(abs(a - b) for a, b in zip(one_acc, many_acc,
                                                                      strict=True)),
           "packs_one_device": one_packs, "packs_spread": many_packs,
           # the one-device run compiles in this process: what it compiled or found on disk
           "compiled_one_device": one_compiled,
           **({"one_worker_s": round(worker[0], 1),
               "speedup_vs_one_worker": round(worker[0] / many_s, 3),
               "max_accuracy_difference_one_worker": max(
                   abs(a - b) for a, b in zip(worker[1], many_acc, strict=True)),
               "packs_one_worker": worker[2]} if worker else {}),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__}
    print(json.dumps(doc, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
