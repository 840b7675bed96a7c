"""CIFAR ResNets: ResNet-20 with option-A shortcuts (the paper's "res20s") and the
ResNet-18/50 family with a CIFAR stem (3x3 first conv, no max-pool).

Parameter names follow the paper authors' modules (conv1, bn1, layerN.i.convK, fc), so
their checkpoints import without renaming.
"""

from __future__ import annotations

from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

_SKIP_INIT: ContextVar[bool] = ContextVar("skip_init", default=False)


def kaiming_init(model: nn.Module) -> None:
    """Kaiming-normal convs and linears, as the paper's ResNet-20."""
    if _SKIP_INIT.get():
        return
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


class ShortcutA(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels; no parameters."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = extra_channels
        self.stride = stride
        self.packs = 1  # models packed on the channel axis (ticketctl.train.packing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        half = self.extra // 2
        if self.packs == 1:
            return F.pad(x, (0, 0, 0, 0, half, self.extra - half))
        n, c, h, w = x.shape
        x = F.pad(x.view(n, self.packs, c // self.packs, h, w),
                  (0, 0, 0, 0, half, self.extra - half))
        return x.view(n, -1, h, w)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                self.shortcut = ShortcutA(planes - in_planes, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """A ResNet for 32x32 inputs; `widths` gives one stage per entry."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: list[int],
        widths: list[int],
        num_classes: int = 10,
        in_channels: int = 3,
        option: str = "B",
    ) -> None:
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        for i, (n, w) in enumerate(zip(num_blocks, widths, strict=True)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, w, n, stride, option))
        self.num_stages = len(num_blocks)
        self.fc = nn.Linear(self.in_planes, num_classes)
        kaiming_init(self)

    def _make_layer(self, block, planes: int, n: int, stride: int, option: str) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (n - 1):
            layers.append(block(self.in_planes, planes, s, option))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """The paper's ResNet-20: 16/32/64 widths, option-A shortcuts, 0.27M parameters."""
    return CifarResNet(BasicBlock, [3, 3, 3], [16, 32, 64], num_classes, in_channels, option="A")


def resnet18(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels)


def resnet50(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels)
