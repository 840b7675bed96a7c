"""Per-layer work spread over the CPU's cores with threads: PyTorch's kernels and hashlib
release the GIL, so independent layers run side by side even with one PyTorch thread."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def map_on_cores(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`[fn(x) for x in items]`, in order, on one thread per core (at most one per item)."""
    items = list(items)
    workers = max(1, min(len(items), os.cpu_count() or 1))
    if workers == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))
