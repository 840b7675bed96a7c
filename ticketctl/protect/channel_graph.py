"""The masked channel graph of a ticket: channels as nodes, kept kernels as weighted edges.

Edge strength is the kernel's summed |w| over its kept weights (the paper's choice for both
path scores); residual pass-throughs have strength 1 (an identity kernel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ticketctl.artifacts import Ticket
from ticketctl.models.topology import Topology, topology

if TYPE_CHECKING:
    import networkx as nx


@dataclass
class ChannelGraph:
    """Edges as arrays: edge e goes from node src[e] to node dst[e] with strength[e]; it is
    kernel (out_ch[e], in_ch[e]) of parameter names[param_id[e]] (-1 for a pass-through)."""

    topo: Topology
    base: dict[str, int]  # node set -> id of its channel 0
    num_nodes: int
    src: np.ndarray
    dst: np.ndarray
    strength: np.ndarray
    param_id: np.ndarray
    out_ch: np.ndarray
    in_ch: np.ndarray
    names: list[str]

    def node_range(self, node_set: str) -> range:
        start = self.base[node_set]
        return range(start, start + self.topo.sizes[node_set])

    def to_networkx(self) -> nx.DiGraph:
        import networkx as nx  # only the betweenness score needs it

        g = nx.DiGraph()
        g.add_nodes_from(range(self.num_nodes))
        for e in range(len(self.src)):
            g.add_edge(int(self.src[e]), int(self.dst[e]), edge=e,
                       distance=1.0 / float(self.strength[e]))
        return g


def kernel_strength(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[out, in] summed |w| of the kept weights of each kernel."""
    w = weight.detach().abs().to(torch.float64)
    if mask is not None:
        w = w * mask
    return w.reshape(w.shape[0], w.shape[1], -1).sum(-1)


def build_channel_graph(ticket: Ticket) -> ChannelGraph:
    topo = topology(ticket.skeleton())
    base, n = {}, 0
    for name, size in topo.sizes.items():
        base[name] = n
        n += size
    names = [link.param for link in topo.links if link.param is not None]
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("src", "dst", "strength", "pid", "out", "in")}
    for link in topo.links:
        if link.param is None:
            c = np.arange(topo.sizes[link.src])
            keep = c + link.offset < topo.sizes[link.dst]
            c = c[keep]
            cols["src"].append(base[link.src] + c)
            cols["dst"].append(base[link.dst] + c + link.offset)
            cols["strength"].append(np.ones(len(c)))
            cols["pid"].append(np.full(len(c), -1))
            cols["out"].append(c + link.offset)
            cols["in"].append(c)
            continue
        s = kernel_strength(ticket.state[link.param], ticket.mask.get(link.param))
        o, i = torch.nonzero(s > 0, as_tuple=True)
        o_np, i_np = o.numpy(), i.numpy()
        cols["src"].append(base[link.src] + i_np)
        cols["dst"].append(base[link.dst] + o_np)
        cols["strength"].append(s[o, i].numpy())
        cols["pid"].append(np.full(len(o_np), names.index(link.param)))
        cols["out"].append(o_np)
        cols["in"].append(i_np)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return ChannelGraph(topo, base, n, cat["src"].astype(np.int64), cat["dst"].astype(np.int64),
                        cat["strength"].astype(np.float64), cat["pid"].astype(np.int64),
                        cat["out"].astype(np.int64), cat["in"].astype(np.int64), names)
