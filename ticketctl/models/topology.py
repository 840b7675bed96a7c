"""The channel graph of a network: which layer connects which channels.

A node is one channel of one activation ("node set"); an edge is one kernel of a conv (or one
weight of a linear layer, or the block of weights a channel owns after a flatten) from an input
channel to an output channel, or a weightless connection: a pass-through (a residual
shortcut, a concatenation, a zero-padded shortcut) or a mix (attention scores). Scores that
look at paths through the network (EWP, betweenness) walk this graph; the permutation attack
finds the channels it may relabel in it.

Every network gets its graph by tracing (`ticketctl.models.trace`); the rules are stated
there."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class Link:
    """One layer's edges between node sets `src` and `dst`, of one of three kinds.

    - weight (`param` set): kernel (o, k) of the weight (shape [dst, src * fold / groups,
      ...]) connects channel (o // (dst / groups)) * (src / groups) + k of `src` to channel o
      of `dst`. `groups` for grouped and depthwise convs; `fold` for a linear layer after a
      flatten, where each input channel owns `fold` consecutive features (its H*W pixels).
    - pass-through (no `param`, not `dense`): channel c of `src`, for c in
      [first, first + count), to channel c + `offset` of `dst` (`count` None: to the end).
      Residual shortcuts (offset 0), option-A zero-padded shortcuts (offset = the padding)
      and channel concatenation (offset = the position in the concatenation).
    - mix (`dense`): every channel of group g of `src` to every channel of group g of
      `dst`, `groups` groups (attention scores: a head's query and key channels reach its
      score, the score every output channel of the head).
    """

    src: str
    dst: str
    param: str | None = None
    offset: int = 0
    groups: int = 1
    fold: int = 1
    first: int = 0
    count: int | None = None
    dense: bool = False

    @property
    def kind(self) -> str:
        return "weight" if self.param is not None else "mix" if self.dense else "pass"


@dataclass
class Topology:
    """Node sets in topological order with their sizes, and the links between them.

    `follow`: for a node set, the state tensors whose first axis are its channels (the bias
    of the layer that makes it, the BatchNorm or LayerNorm that normalises it), so a
    relabelling of the channels can take them along. `fixed`: node sets whose channel order
    some operation depends on (a reshape into heads, a slice, a per-channel constant, a
    GroupNorm), which must not be relabelled."""

    sizes: dict[str, int]  # node set -> number of channels
    links: list[Link]
    source: str = "input"
    sink: str = "output"
    follow: dict[str, list[str]] = field(default_factory=dict)
    fixed: set[str] = field(default_factory=set)

    def into(self, node: str) -> list[Link]:
        return [lk for lk in self.links if lk.dst == node]

    def out_of(self, node: str) -> list[Link]:
        return [lk for lk in self.links if lk.src == node]


def topology(model: nn.Module) -> Topology:
    """The channel graph of any network torch.fx can trace (raises TicketctlError naming
    the operation it cannot follow)."""
    from ticketctl.models.trace import traced_topology  # trace imports Link and Topology

    return traced_topology(model)
