"""Scheme V2 speed on the CPU: `sign` and `verify` (with a receipt) of a ResNet-50 ticket, each
including file reads and writes, against loading the ticket alone (the baseline).

    python benchmarks/v2_speed.py [--density 0.2]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch
from bench_common import pruned_ticket, timed

from ticketctl.artifacts import load_ticket, save_ticket
from ticketctl.protect.receipt import load_receipt, save_receipt
from ticketctl.protect.signature import sign_ticket
from ticketctl.protect.verify import Marks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ticket = pruned_ticket(args.arch, args.density)
    with tempfile.TemporaryDirectory() as d:
        src = save_ticket(ticket, Path(d) / "t.safetensors")

        def sign() -> None:
            signed, doc, _, _ = sign_ticket(load_ticket(src), "signature")
            save_ticket(signed, Path(d) / "s.safetensors", force=True)
            save_receipt(doc, Path(d) / "r.json", force=True)

        def verify() -> None:
            v = verify(Path(d) / "s.safetensors", Marks(receipt=load_receipt(Path(d) / "r.json")))
            assert v.verified

        t_load = timed(lambda: load_ticket(src), args.repeats)
        t_sign = timed(sign, args.repeats)
        t_verify = timed(verify, args.repeats)
    print(f"{args.arch} ticket at {100 * args.density:.0f}% density; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print("| operation | seconds (median) | target |")
    print("| --- | --- | --- |")
    print(f"| load the ticket (baseline) | {t_load:.3f} | |")
    print(f"| sign: load, choose code and place, embed, write ticket and receipt | {t_sign:.3f} "
          "| < 2 s |")
    print(f"| verify with a receipt: load, extract, decode, p-value | {t_verify:.3f} | < 2 s |")


if __name__ == "__main__":
    main()
