"""Ticket file speed: save and validated load of a ticket against plain torch.save/torch.load
of the same state dict (the baseline), in one process. Prints a Markdown table.

    python benchmarks/ticket_io.py [--arch resnet50] [--repeats 5]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from bench_common import pruned_ticket, timed

from ticketctl.artifacts import load_ticket, save_ticket


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ticket = pruned_ticket(args.arch, 0.2)
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
