"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

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
