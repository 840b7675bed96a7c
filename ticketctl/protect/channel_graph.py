"""The masked channel graph of a ticket: channels as nodes, kept kernels as weighted edges.

Edge strength is the kernel's summed |w| over its kept weights (the paper's choice for both
path scores; after a flatten, a channel's kernel in a linear layer is the block of features it
owns); weightless links (residual pass-throughs, concatenation, attention mixes) have strength
1, an identity kernel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from ticketctl.artifacts import Ticket
from ticketctl.errors import TicketctlError
from ticketctl.models.topology import Topology, topology

if TYPE_CHECKING:
    import networkx as nx


@dataclass
class ChannelGraph:
    """Edges as arrays: edge e goes from node src[e] to node dst[e] with strength[e]; it is
    kernel (out_ch[e], in_ch[e]) of parameter names[param_id[e]] (-1 for a weightless link;
    then out_ch and in_ch are the channels it joins)."""

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
    folds: list[int] = field(default_factory=list)  # per name: features a channel owns

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


def kernel_strength(weight: torch.Tensor, mask: torch.Tensor | None,
                    fold: int = 1) -> torch.Tensor:
    """[out, in / fold] summed |w| of the kept weights of each kernel (a conv's window, or
    the `fold` consecutive features of one channel in a linear layer)."""
    w = weight.detach().abs().to(torch.float64)
    if mask is not None:
        w = w * mask
    return w.reshape(w.shape[0], w.shape[1] // fold, -1).sum(-1)


def build_channel_graph(ticket: Ticket, model: nn.Module | None = None) -> ChannelGraph:
    """The ticket's channel graph; `model` is its network (by default the ticket's own
    architecture, on the meta device)."""
    return graph_of(ticket, topology(model if model is not None else ticket.skeleton()))


def graph_of(ticket: Ticket, topo: Topology) -> ChannelGraph:
    """The channel graph of a ticket on a given topology: its kept kernels as edges."""
    base, n = {}, 0
    for name, size in topo.sizes.items():
        base[name] = n
        n += size
    names: list[str] = []
    folds: list[int] = []
    for link in topo.links:
        if link.param is not None and link.param not in names:
            names.append(link.param)
            folds.append(link.fold)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in
                                         ("src", "dst", "strength", "pid", "out", "in")}

    def add(src: np.ndarray, dst: np.ndarray, strength: np.ndarray, pid: int,
            out: np.ndarray, inp: np.ndarray) -> None:
        cols["src"].append(src)
        cols["dst"].append(dst)
        cols["strength"].append(strength)
        cols["pid"].append(np.full(len(src), pid))
        cols["out"].append(out)
        cols["in"].append(inp)

    for link in topo.links:
        s_size, d_size = topo.sizes[link.src], topo.sizes[link.dst]
        if link.kind == "pass":
            c = np.arange(link.first, link.first + (link.count if link.count is not None
                                                     else s_size - link.first))
            c = c[(c + link.offset >= 0) & (c + link.offset < d_size)]
            add(base[link.src] + c, base[link.dst] + c + link.offset, np.ones(len(c)), -1,
                c + link.offset, c)
        elif link.kind == "mix":
            k, m = s_size // link.groups, d_size // link.groups
            g = np.repeat(np.arange(link.groups), k * m)
            c = g * k + np.tile(np.repeat(np.arange(k), m), link.groups)
            o = g * m + np.tile(np.arange(m), link.groups * k)
            add(base[link.src] + c, base[link.dst] + o, np.ones(len(c)), -1, o, c)
        else:
            s = kernel_strength(_tensor(ticket, link.param), ticket.mask.get(link.param),
                                link.fold)
            o, i = torch.nonzero(s > 0, as_tuple=True)
            o_np, i_np = o.numpy(), i.numpy()
            per_group = s.shape[0] // link.groups  # output channels of each group
            src = (o_np // per_group) * s.shape[1] + i_np
            add(base[link.src] + src, base[link.dst] + o_np, s[o, i].numpy(),
                names.index(link.param), o_np, i_np)
    cat = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
    return ChannelGraph(topo, base, n, cat["src"].astype(np.int64), cat["dst"].astype(np.int64),
                        cat["strength"].astype(np.float64), cat["pid"].astype(np.int64),
                        cat["out"].astype(np.int64), cat["in"].astype(np.int64), names, folds)


def _tensor(ticket: Ticket, name: str) -> torch.Tensor:
    if name not in ticket.state:
        raise TicketctlError(f"the network uses a weight {name!r} that the ticket does not "
                             "hold: a ticket of another network")
    return ticket.state[name]
