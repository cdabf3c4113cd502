"""The models of the torch section of ``python -m pybn bench``, written in torch here (the
torchvision wheel of this index needs CUDA libraries): the Keras tutorial's "Red Wine" MLP,
the CNN tutorial's model (Conv -> BatchNorm2d -> Dropout) and a ResNet-18."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def red_wine() -> nn.Module:
    """Three times Dense(1024, relu) -> Dropout(0.3) -> BatchNorm, then Dense(1); 11 inputs."""
    layers: list[nn.Module] = []
    for n_in in (11, 1024, 1024):
        layers += [nn.Linear(n_in, 1024), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(1024)]
    return nn.Sequential(*layers, nn.Linear(1024, 1))


class CNN(nn.Module):
    """Conv(1 -> 32) -> BatchNorm2d -> ReLU -> MaxPool -> Linear(6272, 128) -> ReLU ->
    Dropout(0.5) -> Linear(128, 10), on 28x28 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.dropout = nn.Dropout(0.5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 14 * 14, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        logits: torch.Tensor = self.fc2(self.dropout(F.relu(self.fc1(x.flatten(1)))))
        return logits


class BasicBlock(nn.Module):
    """Two 3x3 convs with batch norm, and the shortcut (a 1x1 conv + BN when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 (He et al. 2016): a 7x7 stem, four stages of two BasicBlocks, 20 BatchNorm2d."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks: list[nn.Module] = []
        c_in = 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(x))
        logits: torch.Tensor = self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))
        return logits
