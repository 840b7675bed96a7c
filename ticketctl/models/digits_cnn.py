"""A small CNN for scikit-learn's 8x8 digits, sized so tests and the demo run in seconds
on a CPU while its later convs have channel grids (out x in) of 64x32 and 64x64, large
enough to hold a QR code (version 3 is 29x29)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ticketctl.models.resnet_cifar import kaiming_init


class DigitsCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.conv4 = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.fc = nn.Linear(2 * w, num_classes)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        out = F.relu(self.bn4(self.conv4(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> DigitsCNN:
    return DigitsCNN(num_classes, in_channels, width)
