"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ticketctl.artifacts import Mask, Ticket
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune


def timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of `repeats` calls, after one untimed call (page cache, allocator)."""
    if warmup:
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def pruned_ticket(arch: str, density: float, seed: int = 0) -> Ticket:
    """A magnitude-pruned initialisation: the size and sparsity of a real ticket, instantly."""
    model = build_model(arch, seed=seed)
    mask = magnitude_prune(dict(model.named_parameters()),
                           Mask.ones(model, prunable_names(model)), 1.0 - density)
    return Ticket.from_model(model, mask, arch=arch, rewind_epoch=3, seed=seed)


ROOT = Path(__file__).resolve().parent.parent


def rank_env() -> dict[str, str]:
    """The environment of processes a benchmark starts: NVLink multicast off (see the device
    notes), one OpenMP thread a rank, and this repository importable."""
    return {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")]))}


def rank_options(ap: argparse.ArgumentParser, run_timeout: float) -> None:
    """The options of a script that `on_ranks` runs: `--run-timeout` for the user, and the
    hidden `--worker --result FILE` that a rank is started with."""
    ap.add_argument("--run-timeout", type=float, default=run_timeout,
                    help="seconds one GPU count may take before its ranks are killed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)


def on_ranks(script: str | Path, n: int, args: list[str], timeout_s: float | None = None
             ) -> tuple[dict | None, str]:
    """Run `script --worker --result FILE ARGS...` as n ranks of one host (torchrun,
    standalone); rank 0's JSON result from FILE, or None and the end of stderr. Past
    `timeout_s` the ranks are killed (a collective that never completes hangs, it does not
    fail) and the error says so, with the end of what the ranks printed."""
    with tempfile.TemporaryDirectory() as tmp:
        result, err = Path(tmp) / "r.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", str(script), "--worker", "--result", str(result),
               *args]
        with err.open("w") as fh:
            p = subprocess.Popen(cmd, env=rank_env(), stdout=fh, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            try:
                rc = p.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)
                p.wait()
                rc = None
        tail = err.read_text(errors="replace").strip()[-1500:]
        if rc is None and result.exists():  # the ranks hung on the way out, after the work
            return {**json.loads(result.read_text()), "hung_at_exit": True}, ""
        if rc != 0:
            why = f"killed after {timeout_s:.0f} s" if rc is None else f"exit {rc}"
            return None, f"{why}: {tail}"
        return json.loads(result.read_text()), ""
