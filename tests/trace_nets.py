"""Networks defined for the tests of tracing, scores and permutation (no torchvision): each
exercises what the built-ins do not, and `ticket_of` makes a ticket of any of them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.artifacts import Mask, Ticket
from ticketctl.models.resnet_cifar import Bottleneck, CifarResNet, ShortcutA
from ticketctl.models.topology import Link, Topology
from ticketctl.prune import magnitude_prune


class ResCat(nn.Module):
    """A residual add (a conv, its BatchNorm, added to its input), a channel concatenation
    read by a conv, max pooling, and a linear layer after a flatten (64 features a channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 4, 1)
        self.merge = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        r = x + F.relu(self.bn_a(self.a(x)))
        y = torch.cat([r, self.b(r)], dim=1)
        y = F.max_pool2d(F.relu(self.merge(y)), 2)
        return self.fc(torch.flatten(y, 1))


class Separable(nn.Module):
    """A grouped conv (4 groups), a depthwise conv with 2 outputs a channel, a pointwise conv
    with BatchNorm, global pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.group = nn.Conv2d(8, 8, 3, padding=1, groups=4)
        self.depth = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.point = nn.Conv2d(16, 12, 1)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.depth(F.relu(self.group(x))))
        x = F.relu(self.bn(self.point(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Block(nn.Module):
    """A pre-norm transformer block written with nn.Linear: q, k, v projections split into
    heads, attention written out (or scaled_dot_product_attention), an output projection, an
    MLP, two residual adds."""

    def __init__(self, d: int = 16, heads: int = 4, hidden: int = 32, sdpa: bool = False):
        super().__init__()
        self.heads, self.sdpa = heads, sdpa
        self.ln1 = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (lin(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
            y = att.softmax(dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Tiny(nn.Module):
    """Tokens of 6 features -> a linear embedding -> one Block -> mean over tokens -> head."""

    def __init__(self, sdpa: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.block = Block(sdpa=sdpa)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 48), nn.Linear(48, 64), nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class WideMlp(nn.Module):
    """An MLP whose 144 x 48 hidden layer is large enough to hold a QR code."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(48, 144), nn.Linear(144, 48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.gelu(self.fc1(x)))))


INPUTS = {ResCat: (3, 16, 16), Separable: (3, 8, 8), Tiny: (5, 6), Mlp: (20,), WideMlp: (48,)}


def ticket_of(model: nn.Module, rate: float = 0.5) -> Ticket:
    """Every conv and linear weight but the first layer's, pruned by magnitude (`rate` 0:
    all kept); norms and biases given values a unit's identity shows in (not the 1s and 0s
    they start with)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    names = [f"{n}.weight" for n, m in model.named_modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))][1:]
    mask = Mask.ones(model, names)
    if rate:
        mask = magnitude_prune(dict(model.named_parameters()), mask, rate)
    return Ticket.from_model(model, mask)


# ---- the hand-written graphs the library had before tracing (the reference) ---------------
def hand_chain(model: nn.Module) -> Topology:
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


def hand_resnet(model: CifarResNet) -> Topology:
    """Each block's convs in a chain whose last writes into the block's sum (named `.add`,
    as tracing names it); the shortcut is a pass-through (option A: channel c to c + pad) or
    the 1x1 downsample conv."""
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
                dst = f"{base}.{c}" if c != convs[-1] else f"{base}.add"
                sizes[dst] = conv.out_channels
                links.append(Link(src, dst, f"{base}.{c}.weight"))
                src = dst
            out = f"{base}.add"
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
