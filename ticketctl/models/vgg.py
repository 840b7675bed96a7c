"""VGG-16 for CIFAR: 13 3x3 convs with BatchNorm and a single linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from ticketctl.models.resnet_cifar import kaiming_init

VGG16_PLAN: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
]


class VGG(nn.Module):
    def __init__(self, plan: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for item in plan:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, int(item), 3, padding=1, bias=False),
                           nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
                c = int(item)
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(out)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG16_PLAN, num_classes, in_channels)
