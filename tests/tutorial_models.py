"""The user stories' models written in torch, shared by the folding and PyTorch tests."""
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """The PyTorch tutorial's Net (seed 000): Linear(10, 5) then Dropout(0.2)."""

    def __init__(self):
        super().__init__()
        self.dropout = nn.Dropout(p=0.2)
        self.fc1 = nn.Linear(10, 5)

    def forward(self, x):
        x = self.fc1(x)
        x = self.dropout(x)
        return x


def red_wine():
    """The Keras "Red Wine" model (seed 001) in torch: Dense(relu) -> Dropout -> BN, x3."""
    layers = []
    for n_in in (11, 1024, 1024):
        layers += [nn.Linear(n_in, 1024), nn.ReLU(), nn.Dropout(0.3), nn.BatchNorm1d(1024)]
    return nn.Sequential(*layers, nn.Linear(1024, 1))


class CNNWithBNDropout(nn.Module):
    """The CNN of seed 002, verbatim."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(32)
        self.dropout = nn.Dropout(0.5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * 14 * 14, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = x.view(-1, 32 * 14 * 14)
        x = F.relu(self.fc1(x))
        x = self.dropout(x)
        x = self.fc2(x)
        return x


__all__ = ["Net", "red_wine", "CNNWithBNDropout", "torch"]
