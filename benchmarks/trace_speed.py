"""Channel graph by tracing, then betweenness with pivots, on the CPU: ResNet-50 (the built-in,
CIFAR stem) by default. The baseline in the same run is the hand-written ResNet topology the
library had before tracing (kept here), followed by the same graph building and betweenness;
a last row times networkx's betweenness, which the score used before, on one pivot and checks
that both give the same numbers for it.

    python benchmarks/trace_speed.py [--arch resnet50] [--classes 10] [--pivots 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import pruned_ticket, timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from trace_nets import hand_resnet  # noqa: E402  (the reference the tests use too)

from ticketctl.models.registry import skeleton
from ticketctl.models.trace import traced_topology
from ticketctl.protect.channel_graph import graph_of
from ticketctl.protect.scores import _networkx_betweenness, edge_betweenness


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="resnet50", choices=["resnet20", "resnet18", "resnet50"])
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--pivots", type=int, default=64, help="0: exact")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--networkx-pivots", type=int, default=1,
                    help="pivots for the networkx row (0: skip it; about 14 s a pivot)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pivots = args.pivots or None
    ticket = pruned_ticket(args.arch, args.density)
    if args.classes != 10:  # a head of another size: the rest of the ticket is unchanged
        fc = torch.randn(args.classes, ticket.state["fc.weight"].shape[1])
        ticket = ticket.derive(state={**ticket.state, "fc.weight": fc,
                                      "fc.bias": torch.zeros(args.classes)},
                               num_classes=args.classes)
    model = skeleton(args.arch, args.classes)
    print(f"CPU: {cpu_name()}, 1 thread, torch "
          f"{torch.__version__}; {args.arch}, {args.classes} classes, "
          f"{100 * ticket.density:.1f}% density, {pivots or 'exact, all'} pivots, median of "
          f"{args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print("| topology | topology s | graph s | betweenness s | total s |")
    print("| --- | --- | --- | --- | --- |")

    rows = []
    for label, make in (("baseline: hand-written topology", lambda: hand_resnet(model)),
                        ("traced topology", lambda: traced_topology(model))):
        topo_s = timed(make, args.repeats)
        topo = make()
        graph_s = timed(lambda t=topo: graph_of(ticket, t), args.repeats)
        graph = graph_of(ticket, topo)
        between_s = timed(lambda g=graph: edge_betweenness(g, pivots, 0), args.repeats,
                          warmup=False)
        central = edge_betweenness(graph, pivots, 0)
        rows.append((label, topo_s, graph_s, between_s, graph))
        print(f"| {label} | {topo_s:.3f} | {graph_s:.2f} | {between_s:.2f} | "
              f"{topo_s + graph_s + between_s:.2f} |")
    (_, _, _, _, hand), (_, _, _, _, traced) = rows
    same = hand.num_nodes == traced.num_nodes and np.array_equal(
        np.sort(hand.src * hand.num_nodes + hand.dst),
        np.sort(traced.src * traced.num_nodes + traced.dst))
    print(f"graphs: {traced.num_nodes:,} nodes, {len(traced.src):,} edges; traced == "
          f"hand-written: {same}; betweenness (traced) nonzero on "
          f"{int((central > 0).sum()):,} edges")
    if args.networkx_pivots:
        start = time.perf_counter()
        theirs = _networkx_betweenness(traced, args.networkx_pivots, 0)
        nx_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = edge_betweenness(traced, args.networkx_pivots, 0)
        ours_s = time.perf_counter() - start
        print(f"| networkx betweenness, {args.networkx_pivots} pivot(s), with its graph "
              f"building | {nx_s:.1f} | ours: {ours_s:.2f} | max difference "
              f"{float(np.abs(ours - theirs).max()):.1e} of max {float(theirs.max()):.1e} |")


if __name__ == "__main__":
    main()
