"""The channel graph of each architecture: which layer connects which channels.

A node is one channel of one activation ("node set"); an edge is one kernel of a conv (or one
weight of a linear layer) from an input channel to an output channel, or a pass-through of a
residual shortcut. Scores that look at paths through the network (EWP, betweenness) walk this
graph. Option-A shortcuts pass channel c of the block input to channel c + pad of the block
output; a 1x1 downsample conv is an ordinary edge set; a linear layer after global pooling
connects channel c to every output."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ticketctl.models.digits_cnn import DigitsCNN
from ticketctl.models.resnet_cifar import Bottleneck, CifarResNet, ShortcutA
from ticketctl.models.vgg import VGG


@dataclass(frozen=True)
class Link:
    """One layer's edges: `param` connects every channel of `src` to every channel of `dst`
    (weight shape [dst, src, ...]); with `param=None` it is a pass-through, channel c of `src`
    to channel c + `offset` of `dst`."""

    src: str
    dst: str
    param: str | None = None
    offset: int = 0


@dataclass
class Topology:
    sizes: dict[str, int]  # node set -> number of channels
    links: list[Link]
    source: str = "input"
    sink: str = "output"


def topology(model: nn.Module) -> Topology:
    if isinstance(model, CifarResNet):
        return _resnet(model)
    if isinstance(model, (DigitsCNN, VGG)):
        return _chain(model)
    raise TypeError(f"no channel graph is defined for {type(model).__name__}")


def _chain(model: nn.Module) -> Topology:
    """Plain feed-forward nets: convs in order, then the linear classifier."""
    sizes, links = {}, []
    prev = "input"
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            sizes.setdefault(prev, m.in_channels)
            sizes[name] = m.out_channels
            links.append(Link(prev, name, f"{name}.weight"))
            prev = name
        elif isinstance(m, nn.Linear):
            sizes.setdefault(prev, m.in_features)
            sizes["output"] = m.out_features
            links.append(Link(prev, "output", f"{name}.weight"))
            prev = "output"
    return Topology(sizes, links)


def _resnet(model: CifarResNet) -> Topology:
    sizes = {"input": model.conv1.in_channels, "conv1": model.conv1.out_channels}
    links = [Link("input", "conv1", "conv1.weight")]
    prev = "conv1"
    for s in range(model.num_stages):
        for i, block in enumerate(getattr(model, f"layer{s + 1}")):
            base = f"layer{s + 1}.{i}"
            convs = ["conv1", "conv2", "conv3"] if isinstance(block, Bottleneck) else \
                ["conv1", "conv2"]
            src = prev
            for c in convs:
                conv = getattr(block, c)
                dst = f"{base}.{c}" if c != convs[-1] else f"{base}.out"
                sizes[dst] = conv.out_channels
                links.append(Link(src, dst, f"{base}.{c}.weight"))
                src = dst
            out = f"{base}.out"
            sc = block.shortcut
            if isinstance(sc, nn.Identity):
                links.append(Link(prev, out))
            elif isinstance(sc, ShortcutA):
                links.append(Link(prev, out, offset=sc.extra // 2))
            else:  # option B: a 1x1 downsample conv (then BatchNorm)
                links.append(Link(prev, out, f"{base}.shortcut.0.weight"))
            prev = out
    sizes["output"] = model.fc.out_features
    links.append(Link(prev, "output", "fc.weight"))
    return Topology(sizes, links)
