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
  1 / (kernel's summed |w|), so strong kernels are close. Computed level by level on the
  graph, which is acyclic (a network's forward), with numpy: the same numbers as networkx's
  `edge_betweenness_centrality` (same pivots for a seed), some 1000 times faster on
  ResNet-50.

The path scores need the ticket's channel graph, which comes from tracing its network
(`model`, by default the ticket's architecture); omp and random need no network at all.

Unlike the authors' code, betweenness is weighted and mask-aware and the most central edge
ranks first; EWP can start from every input channel, the last included."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ticketctl.artifacts import Ticket
from ticketctl.errors import TicketctlError
from ticketctl.protect.channel_graph import ChannelGraph, build_channel_graph
from ticketctl.records import Choice

Scores = dict[str, torch.Tensor]
Progress = Callable[[int, int], None]  # (done, total): what a long score has got through
UNSEEN = -1.0e18  # below any real path rank


def _unreported(done: int, total: int) -> None:
    """The progress callback when nobody follows the work."""


def omp_scores(ticket: Ticket, seed: int = 0, **_: object) -> Scores:
    return {n: ticket.state[n].detach().abs().to(torch.float64) for n in ticket.mask}


def random_scores(ticket: Ticket, seed: int = 0, **_: object) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(ticket.mask[n].shape, generator=gen, dtype=torch.float64)
            for n in ticket.mask}


def _kernel_scores(ticket: Ticket, graph: ChannelGraph, edge_score: np.ndarray,
                   default: float) -> Scores:
    """Spread a score per kernel edge over the kernel's weights; masked weights the graph
    does not reach (a layer on no path) get `default`."""
    out: Scores = {}
    for pid, name in enumerate(graph.names):
        if name not in ticket.mask:
            continue
        w = ticket.state[name]
        fold = graph.folds[pid] if graph.folds else 1
        grid = torch.full((w.shape[0], w.shape[1] // fold), default, dtype=torch.float64)
        sel = graph.param_id == pid
        grid[torch.from_numpy(graph.out_ch[sel]), torch.from_numpy(graph.in_ch[sel])] = \
            torch.from_numpy(edge_score[sel])
        out[name] = grid[:, :, None].expand(*grid.shape, w[0].numel() // grid.shape[1]) \
            .reshape(w.shape).clone()
    for name, m in ticket.mask.items():
        out.setdefault(name, torch.full(m.shape, default, dtype=torch.float64))
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


def ewp_scores(ticket: Ticket, seed: int = 0, walks: int = 10_000,
               model: nn.Module | None = None, **_: object) -> Scores:
    graph = build_channel_graph(ticket, model)
    rank = ewp_edge_ranks(graph, walks, seed)
    return _kernel_scores(ticket, graph, np.where(np.isinf(rank), UNSEEN, -rank), UNSEEN)


def edge_betweenness(graph: ChannelGraph, pivots: int | None = None, seed: int = 0,
                     on_progress: Progress | None = None) -> np.ndarray:
    """Edge betweenness centrality with distance 1 / strength (strong kernels are close),
    normalised as networkx does. Exact when `pivots` is None, else from `pivots` source
    channels, drawn as networkx draws them for `seed`. Of parallel edges (a channel that
    reaches another both through a layer and a shortcut) the shortest carries the paths.
    `on_progress(done, total)` follows the work in units of its modelled cost (each source
    channel weighted by the edges above it): exact on a ResNet-50 is 22,733 source channels,
    4.2 minutes on one CPU core at 2% density and tens of minutes at 15-20%. The lowest
    sources come first and cost more than the model says (2-6x per unit on ResNet-50), so a
    time left extrapolated from the start is an upper bound (about 2x early on)."""
    if pivots is not None and pivots < 1:
        raise TicketctlError(f"--pivots must be at least 1 (or left out for exact), got {pivots}")
    report = on_progress or _unreported
    n, m = graph.num_nodes, len(graph.src)
    out = np.zeros(m)
    if n < 2 or m == 0:
        report(1, 1)
        return out
    k = None if pivots is None or pivots >= n else pivots
    sources = np.arange(n) if k is None else np.array(random.Random(seed).sample(range(n), k))
    dist = 1.0 / graph.strength
    uniq, inv = np.unique(graph.src * n + graph.dst, return_inverse=True)
    best = np.full(len(uniq), np.inf)
    np.minimum.at(best, inv, dist)
    level = _levels(uniq // n, uniq % n, n)
    if level is None:  # not a forward network's graph: networkx's general algorithm
        report(0, 1)
        result = _networkx_betweenness(graph, k, seed)
        report(1, 1)
        return result
    central = _brandes_levels(uniq // n, uniq % n, best, level, sources, report)
    central *= 1.0 / (len(sources) * (n - 1))
    carries = dist == best[inv]
    share = np.bincount(inv, weights=carries)  # equally short parallel edges split the paths
    return np.where(carries, central[inv] / np.maximum(share[inv], 1), 0.0)


def _levels(src: np.ndarray, dst: np.ndarray, n: int) -> np.ndarray | None:
    """Each node's level: every edge goes to a higher one (None when there is a cycle)."""
    order = np.argsort(src, kind="stable")
    starts = np.searchsorted(src[order], np.arange(n + 1))
    indeg = np.bincount(dst, minlength=n)
    level = np.full(n, -1)
    frontier = np.flatnonzero(indeg == 0)
    depth, placed = 0, 0
    while len(frontier):
        level[frontier] = depth
        placed += len(frontier)
        lo, count = starts[frontier], starts[frontier + 1] - starts[frontier]
        idx = np.repeat(lo - np.cumsum(count) + count, count) + np.arange(count.sum())
        targets = dst[order[idx]]
        indeg -= np.bincount(targets, minlength=n)
        frontier = np.unique(targets)
        frontier = frontier[indeg[frontier] == 0]
        depth += 1
    return level if placed == n else None


def _brandes_levels(src: np.ndarray, dst: np.ndarray, dist: np.ndarray, level: np.ndarray,
                    sources: np.ndarray, on_progress: Progress | None = None) -> np.ndarray:
    """Brandes' edge betweenness (unnormalised) over a levelled acyclic graph without
    parallel edges: shortest distances and path counts level by level upwards, then the
    dependencies level by level downwards, for a block of sources at a time. The same
    additions in the same order as Dijkstra's algorithm, so the same ties."""
    n, m, top = len(level), len(src), int(level.max())
    fwd = np.lexsort((dst, level[dst]))  # edges by the level of their head
    f_src, f_dst, f_dist = src[fwd], dst[fwd], dist[fwd]
    f_bounds = np.searchsorted(level[f_dst], np.arange(top + 2))
    bwd = np.lexsort((src, level[src]))  # edges by the level of their tail
    b_src, b_dst = src[bwd], dst[bwd]
    b_bounds = np.searchsorted(level[b_src], np.arange(top + 2))
    b_in_fwd = np.empty(m, dtype=np.int64)
    b_in_fwd[fwd] = np.arange(m)
    b_in_fwd = b_in_fwd[bwd]
    nodes_by_level = np.argsort(level, kind="stable")
    n_bounds = np.searchsorted(level[nodes_by_level], np.arange(top + 2))

    def groups(keys: np.ndarray, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seg = keys[a:b]
        starts = np.flatnonzero(np.r_[True, seg[1:] != seg[:-1]]) if b > a else \
            np.zeros(0, dtype=np.int64)
        return starts, seg[starts], np.diff(np.r_[starts, b - a])

    f_groups = [groups(f_dst, f_bounds[lv], f_bounds[lv + 1]) for lv in range(top + 1)]
    b_groups = [groups(b_src, b_bounds[lv], b_bounds[lv + 1]) for lv in range(top + 1)]
    central = np.zeros(m)  # in backward order
    block = max(1, min(64, (1 << 25) // max(m, 1)))
    sources = sources[np.argsort(level[sources], kind="stable")]
    blocks = range(0, len(sources), block)
    # A block's cost: its sources times the edges its passes visit (those above its lowest
    # source's level). Sources go lowest level first, so early blocks cost the most, and a
    # count of sources would promise the end 3-5x too late (this model: about 2x).
    cost = [len(sources[i:i + block]) * (1 + int(f_bounds[top + 1] -
                                                 f_bounds[int(level[sources[i]]) + 1]))
            for i in blocks]
    total_cost, done_cost = sum(cost), 0
    report = on_progress or _unreported
    report(0, total_cost)
    for b_i, i in enumerate(blocks):
        s = sources[i:i + block]
        rows = np.arange(len(s))
        d = np.full((len(s), n), np.inf)
        sigma = np.zeros((len(s), n))
        d[rows, s] = 0.0
        sigma[rows, s] = 1.0
        tight = np.zeros((len(s), m), dtype=bool)
        low = int(level[s].min())
        for lv in range(low + 1, top + 1):
            a, b = f_bounds[lv], f_bounds[lv + 1]
            if a == b:
                continue
            starts, heads, counts = f_groups[lv]
            tails = f_src[a:b]
            cand = d[:, tails] + f_dist[a:b]
            short = np.minimum.reduceat(cand, starts, axis=1)
            t = (cand == np.repeat(short, counts, axis=1)) & np.isfinite(cand)
            d[:, heads] = short
            sigma[:, heads] = np.add.reduceat(np.where(t, sigma[:, tails], 0.0), starts,
                                              axis=1)
            here = rows[level[s] == lv]  # a source on this level starts its own paths
            d[here, s[here]] = 0.0
            sigma[here, s[here]] = 1.0
            tight[:, a:b] = t
        coeff = np.zeros((len(s), n))
        delta = np.zeros((len(s), n))
        for lv in range(top, low - 1, -1):
            a, b = b_bounds[lv], b_bounds[lv + 1]
            if a < b:
                starts, tails, _ = b_groups[lv]
                t = tight[:, b_in_fwd[a:b]]
                c = np.where(t, sigma[:, b_src[a:b]] * coeff[:, b_dst[a:b]], 0.0)
                central[a:b] += c.sum(0)
                delta[:, tails] = np.add.reduceat(c, starts, axis=1)
            nodes = nodes_by_level[n_bounds[lv]:n_bounds[lv + 1]]
            sg = sigma[:, nodes]
            coeff[:, nodes] = np.where(sg > 0, (1.0 + delta[:, nodes]) / np.where(sg > 0, sg, 1.0),
                                       0.0)
        done_cost += cost[b_i]
        report(done_cost, total_cost)
    out = np.empty(m)
    out[bwd] = central
    return out


def _networkx_betweenness(graph: ChannelGraph, k: int | None, seed: int) -> np.ndarray:
    import networkx as nx  # here: 0.1 s that commands which do not score should not pay

    g = graph.to_networkx()
    central = nx.edge_betweenness_centrality(g, k=k, normalized=True, weight="distance",
                                             seed=seed)
    out = np.zeros(len(graph.src))
    for (u, v), c in central.items():
        out[g.edges[u, v]["edge"]] = c
    return out


def betweenness_scores(ticket: Ticket, seed: int = 0, pivots: int | None = None,
                       model: nn.Module | None = None, on_progress: Progress | None = None,
                       **_: object) -> Scores:
    graph = build_channel_graph(ticket, model)
    return _kernel_scores(ticket, graph, edge_betweenness(graph, pivots, seed, on_progress),
                          -1.0)


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


def compute_scores(ticket: Ticket, score: str, seed: int = 0, model: nn.Module | None = None,
                   **options: object) -> Scores:
    """Scores of every masked weight; `model` is the ticket's network for the path scores
    (by default its architecture)."""
    if score not in SCORES:
        raise TicketctlError(f"unknown score {score!r}; known: {', '.join(SCORES)}")
    return SCORES[score](ticket, seed=seed, model=model, **options)


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
