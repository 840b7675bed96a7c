"""Ticket file speed: save and validated load of a ticket against plain torch.save/torch.load
of the same state dict (the baseline), in one process. Prints a Markdown table.

    python benchmarks/ticket_io.py [--arch resnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ticketctl.artifacts import Mask, Ticket, load_ticket, save_ticket
from ticketctl.models import build_model, prunable_names
from ticketctl.prune import magnitude_prune


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (page cache, allocator)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build_model(args.arch)
    mask = magnitude_prune(dict(model.named_parameters()),
                           Mask.ones(model, prunable_names(model)), 0.8)
    ticket = Ticket.from_model(model, mask, arch=args.arch)
    with tempfile.TemporaryDirectory() as d:
        ours, base = Path(d) / "t.safetensors", Path(d) / "t.pt"
        t_save = timed(lambda: save_ticket(ticket, ours, force=True), args.repeats)
        t_load = timed(lambda: load_ticket(ours), args.repeats)
        t_load_nohash = timed(lambda: load_ticket(ours, verify_hashes=False), args.repeats)
        tensors = ticket.tensors()
        b_save = timed(lambda: torch.save(tensors, base), args.repeats)
        b_load = timed(lambda: torch.load(base, weights_only=True), args.repeats)
        size = ours.stat().st_size
    print(f"{args.arch} ticket, {size / 1e6:.1f} MB, density {ticket.density:.1%}; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| operation | ticketctl (s) | torch.save/load (s) |")
    print("| --- | --- | --- |")
    print(f"| save | {t_save:.3f} | {b_save:.3f} |")
    print(f"| load + validate + hashes | {t_load:.3f} | {b_load:.3f} (no validation) |")
    print(f"| load + validate, no hashes | {t_load_nohash:.3f} | |")


if __name__ == "__main__":
    main()
