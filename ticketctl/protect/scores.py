"""Scheme V1 scores: how important each kept weight of a ticket is, so the key can take the
most important ones. Each score returns a float64 tensor per masked parameter (higher = more
important); ties are broken by |w|, then by position, so every score is deterministic for a
given seed.

- omp: |w| of the released (rewind) weights.
- random: uniform, from the seed.
- ewp: edge-weight-product paths (PHEW): random walks from the input channels to the output,
  each step to the next channel with probability proportional to the kernel's summed |w|;
  kernels are ranked by the walk that first used them, in path order.
- betweenness: edge betweenness centrality of the masked channel graph with distance
  1 / (kernel's summed |w|), so strong kernels are close.

Unlike the authors' code, betweenness is weighted and mask-aware and the most central edge
ranks first; EWP can start from every input channel, the last included."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ticketctl.artifacts import Ticket
from ticketctl.errors import TicketctlError
from ticketctl.protect.channel_graph import ChannelGraph, build_channel_graph
from ticketctl.records import Choice

Scores = dict[str, torch.Tensor]
UNSEEN = -1.0e18  # below any real path rank


def omp_scores(ticket: Ticket, seed: int = 0, **_: object) -> Scores:
    return {n: ticket.state[n].detach().abs().to(torch.float64) for n in ticket.mask}


def random_scores(ticket: Ticket, seed: int = 0, **_: object) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(ticket.mask[n].shape, generator=gen, dtype=torch.float64)
            for n in ticket.mask}


def _kernel_scores(ticket: Ticket, graph: ChannelGraph, edge_score: np.ndarray,
                   default: float) -> Scores:
    """Spread a score per kernel edge over the kernel's weights."""
    out: Scores = {}
    for pid, name in enumerate(graph.names):
        if name not in ticket.mask:
            continue
        w = ticket.state[name]
        grid = torch.full(tuple(w.shape[:2]), default, dtype=torch.float64)
        sel = graph.param_id == pid
        grid[torch.from_numpy(graph.out_ch[sel]), torch.from_numpy(graph.in_ch[sel])] = \
            torch.from_numpy(edge_score[sel])
        out[name] = grid.reshape(*grid.shape, *([1] * (w.dim() - 2))).expand(w.shape).clone()
    return out


def ewp_edge_ranks(graph: ChannelGraph, walks: int = 10_000, seed: int = 0) -> np.ndarray:
    """Rank of each edge by the first walk that used it (path order within a walk); inf for
    edges no walk reached. Walks start at a uniformly chosen input channel (every one, the
    last included) and step with probability proportional to the edge strength."""
    rng = np.random.default_rng(seed)
    order = np.argsort(graph.src, kind="stable")
    starts = np.searchsorted(graph.src[order], np.arange(graph.num_nodes + 1))
    cum = np.zeros(len(order))
    for v in range(graph.num_nodes):  # per node, cumulative strengths of its out-edges
        a, b = starts[v], starts[v + 1]
        cum[a:b] = np.cumsum(graph.strength[order[a:b]])
    sink = graph.node_range(graph.topo.sink)
    inputs = graph.node_range(graph.topo.source)
    rank = np.full(len(graph.src), np.inf)
    next_rank = 0
    for _ in range(walks):
        node = inputs.start + int(rng.integers(0, len(inputs)))
        path: list[int] | None = []
        while node not in sink:
            a, b = starts[node], starts[node + 1]
            if a == b:  # a dead end carries nothing to the output: drop the path
                path = None
                break
            k = a + int(np.searchsorted(cum[a:b], rng.random() * cum[b - 1], side="right"))
            e = int(order[min(k, b - 1)])
            path.append(e)
            node = int(graph.dst[e])
        for e in path or ():
            if rank[e] == np.inf:
                rank[e] = next_rank
                next_rank += 1
    return rank


def ewp_scores(ticket: Ticket, seed: int = 0, walks: int = 10_000, **_: object) -> Scores:
    graph = build_channel_graph(ticket)
    rank = ewp_edge_ranks(graph, walks, seed)
    return _kernel_scores(ticket, graph, np.where(np.isinf(rank), UNSEEN, -rank), UNSEEN)


def edge_betweenness(graph: ChannelGraph, pivots: int | None = None, seed: int = 0) -> np.ndarray:
    """Edge betweenness centrality (networkx) with distance 1 / strength: strong kernels are
    close. Exact when `pivots` is None, else sampled from `pivots` source channels."""
    import networkx as nx  # here: 0.1 s that commands which do not score should not pay

    g = graph.to_networkx()
    k = None if pivots is None or pivots >= graph.num_nodes else pivots
    central = nx.edge_betweenness_centrality(g, k=k, normalized=True, weight="distance",
                                             seed=seed)
    out = np.zeros(len(graph.src))
    for (u, v), c in central.items():
        out[g.edges[u, v]["edge"]] = c
    return out


def betweenness_scores(ticket: Ticket, seed: int = 0, pivots: int | None = None,
                       **_: object) -> Scores:
    graph = build_channel_graph(ticket)
    return _kernel_scores(ticket, graph, edge_betweenness(graph, pivots, seed), -1.0)


class Score(Choice):
    """How `split` ranks a ticket's kept weights for its key."""

    OMP = "omp"
    EWP = "ewp"
    BETWEENNESS = "betweenness"
    RANDOM = "random"


SCORES: dict[str, Callable[..., Scores]] = {
    Score.OMP.value: omp_scores,
    Score.EWP.value: ewp_scores,
    Score.BETWEENNESS.value: betweenness_scores,
    Score.RANDOM.value: random_scores,
}


def compute_scores(ticket: Ticket, score: str, seed: int = 0, **options: object) -> Scores:
    if score not in SCORES:
        raise TicketctlError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
    return SCORES[score](ticket, seed=seed, **options)


def top_kept(ticket: Ticket, scores: Scores, n: int) -> dict[str, torch.Tensor]:
    """Boolean masks of the n kept weights ranked highest by (score, |w|, position)."""
    names = list(ticket.mask)
    keep = torch.cat([ticket.mask[k].reshape(-1) for k in names])
    primary = torch.cat([scores[k].reshape(-1) for k in names]).numpy()
    mag = torch.cat([ticket.state[k].detach().abs().reshape(-1).double() for k in names]).numpy()
    idx = np.flatnonzero(keep.numpy())
    p = primary[idx]
    if n < len(idx):  # everything above the n-th best value, then the best of its ties
        threshold = np.partition(p, len(p) - n)[len(p) - n]
        above, tied = idx[p > threshold], idx[p == threshold]
    else:
        above, tied = idx, idx[:0]
    # lexsort: the last key sorts first; |w| descending, then position ascending
    tied = tied[np.lexsort((tied, -mag[tied]))][: n - len(above)]
    chosen = np.concatenate([above, tied])
    flat = torch.zeros(len(keep), dtype=torch.bool)
    flat[torch.from_numpy(chosen)] = True
    out, start = {}, 0
    for k in names:
        size = ticket.mask[k].numel()
        out[k] = flat[start:start + size].reshape(ticket.mask[k].shape)
        start += size
    return out
