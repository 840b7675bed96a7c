"""Networks ticketctl does not know, as a user's own code would define them: passed to the CLI
with `--model-factory tests/nets.py:FUNCTION` (the digits' 8x8 grey images by default)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResCat(nn.Module):
    """Residual adds and a channel concatenation (a DenseNet/Inception-like merge)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.a1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.a2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.b = nn.Conv2d(width, width, 3, padding=1, bias=False)  # a branch, concatenated
        self.bnb = nn.BatchNorm2d(width)
        self.mix = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bnm = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.a1(x)))
        x = F.relu(x + self.bn2(self.a2(y)))  # residual add
        z = F.relu(self.bnb(self.b(x)))
        x = torch.cat([x, z], dim=1)  # channel concatenation
        x = F.relu(self.bnm(self.mix(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def rescat(num_classes: int, in_channels: int = 1, width: int = 8) -> nn.Module:
    return ResCat(num_classes, in_channels, width)


def rescat_wider(num_classes: int, in_channels: int = 1, width: int = 8) -> nn.Module:
    """Same arguments as `rescat`, another network: what a changed factory would build."""
    return ResCat(num_classes, in_channels, 2 * width)


class Depthwise(nn.Module):
    """A MobileNet-like net: grouped and depthwise convolutions with 1x1 pointwise ones."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.dw1 = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pw1 = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.g = nn.Conv2d(2 * width, 2 * width, 3, padding=1, groups=4, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn1(self.dw1(x)))
        x = F.relu(self.bn2(self.pw1(x)))
        x = F.relu(self.bn3(self.g(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def depthwise(num_classes: int, in_channels: int = 1, width: int = 16) -> nn.Module:
    return Depthwise(num_classes, in_channels, width)


class Block(nn.Module):
    """A pre-norm transformer block built from Linear layers."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.q(h), self.k(h), self.v(h)))
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(out)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A ViT for 8x8 images: 2x2 patches embedded by a Linear layer, one block, a head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dim: int = 32,
                 patch: int = 2, size: int = 8) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.zeros(1, (size // patch) ** 2, dim))
        self.block = Block(dim, heads=4, hidden=2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, _, _ = x.shape
        p = self.patch
        x = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)  # [b, patches, c*p*p]
        x = self.embed(x) + self.pos
        x = self.block(x)
        return self.head(self.norm(x).mean(1))


def tiny_vit(num_classes: int, in_channels: int = 1, dim: int = 32) -> nn.Module:
    return TinyViT(num_classes, in_channels, dim)


def deep_mlp(num_classes: int, in_channels: int = 1) -> nn.Module:
    """Twelve hidden layers: `layers.10` sorts before `layers.2`, unlike the forward order."""
    hidden = [m for _ in range(12) for m in (nn.Linear(32, 32), nn.ReLU())]
    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_channels, 32), nn.ReLU(),
                         nn.Sequential(*hidden), nn.Linear(32, num_classes))


def not_a_module(num_classes: int) -> object:
    return {"num_classes": num_classes}


def raises(num_classes: int) -> nn.Module:
    raise ValueError("the factory's own error")


NOT_A_FUNCTION = 3
