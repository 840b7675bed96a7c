"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

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


def on_ranks(script: str | Path, n: int, args: list[str]) -> tuple[dict | None, str]:
    """Run `script --worker --result FILE ARGS...` as n ranks of one host (torchrun,
    standalone); rank 0's JSON result from FILE, or None and the end of stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={n}", str(script), "--worker", "--result", str(result),
               *args]
        p = subprocess.run(cmd, env=rank_env(), capture_output=True, text=True)
        if p.returncode != 0:
            return None, p.stderr.strip()[-800:]
        return json.loads(result.read_text()), ""
