"""Start-up time of the CLI: wall seconds and peak memory of `ticketctl --version`, `--help`
and of `inspect`, `sign` and `verify` on a small ticket, each run as a fresh process, against
two baselines measured in the same run: importing every command's module (what each command
paid before commands were loaded lazily) and importing PyTorch alone (the floor of any command
that reads tensors).

    python benchmarks/startup.py [--repeat 5] [--json-out startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EAGER = ("import ticketctl.cli.find, ticketctl.cli.retrain, ticketctl.cli.split, "
         "ticketctl.cli.sign, ticketctl.cli.trigger, ticketctl.cli.attack, "
         "ticketctl.cli.inspect, ticketctl.cli.convert, ticketctl.cli.demo, ticketctl.cli.data")
TICKET = ("import sys; sys.path.insert(0, 'tests'); from helpers import make_ticket; "
          "from ticketctl.artifacts import save_ticket; "
          "save_ticket(make_ticket(seed=1, width=32), sys.argv[1])")


WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], "
        "capture_output=True).returncode; "
        "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one fresh process (run under a small wrapper that
    reads the child's peak; the wrapper's own start, tens of ms, is in the wall time)."""
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", WRAP, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rc, peak_kb = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"{argv} failed with exit status {rc}")
    return wall, int(peak_kb) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    py, cli = sys.executable, [sys.executable, "-m", "ticketctl"]
    with tempfile.TemporaryDirectory() as d:
        t, s, r = (os.path.join(d, n) for n in ("t.safetensors", "s.safetensors", "r.json"))
        subprocess.run([py, "-c", TICKET, t], check=True)
        cases = {
            "baseline: import every command (before)": [py, "-c", EAGER],
            "baseline: import torch": [py, "-c", "import torch"],
            "ticketctl --version": [*cli, "--version"],
            "ticketctl --help": [*cli, "--help"],
            "ticketctl inspect T": [*cli, "inspect", t],
            "ticketctl sign T": [*cli, "sign", t, "--message", "m", "--out", s,
                                 "--receipt", r, "--force", "--quiet"],
            "ticketctl verify S --receipt R": [*cli, "verify", s, "--receipt", r, "--quiet"],
        }
        rows = []
        for name, argv in cases.items():
            runs = [timed(argv) for _ in range(args.repeat)]
            rows.append({"case": name, "median_s": statistics.median(w for w, _ in runs),
                         "min_s": min(w for w, _ in runs),
                         "peak_mb": max(m for _, m in runs)})
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.python_version()}, " \
              f"load {os.getloadavg()[0]:.1f}"
    print(f"{'case':42s} {'median s':>9s} {'min s':>7s} {'peak MB':>8s}   ({machine})")
    for row in rows:
        print(f"{row['case']:42s} {row['median_s']:9.2f} {row['min_s']:7.2f} "
              f"{row['peak_mb']:8.0f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
