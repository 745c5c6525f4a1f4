"""Tiny float64 networks for exactness tests against dense Hessians."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import randomize_norms


class MLP(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 8), act()
        self.fc2, self.act2 = nn.Linear(8, 8), act()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, residual=False):
        super().__init__()
        self.residual = residual
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z = F.relu(z + y) if self.residual else F.relu(z)
        return self.fc(z.mean((2, 3)))


class TinyAttention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.embed = nn.Linear(5, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (B, N, 5)
        B, N, _ = x.shape
        x = self.embed(x)
        qkv = self.qkv(self.ln(x)).reshape(B, N, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1) * self.dh**-0.5).softmax(-1)
        x = x + self.proj((a @ v).transpose(1, 2).reshape(B, N, self.h * self.dh))
        return self.head(x.mean(1))


def make(name: str, seed: int = 0):
    """(model in float64 eval mode, calibration list of 3 uneven batches)."""
    torch.manual_seed(seed)
    model, shape = {
        "relu_mlp": (lambda: MLP(nn.ReLU), (6,)),
        "gelu_mlp": (lambda: MLP(nn.GELU), (6,)),
        "cnn_bn": (lambda: CNN(False), (2, 5, 5)),
        "residual_cnn": (lambda: CNN(True), (2, 5, 5)),
        "attention": (lambda: TinyAttention(), (3, 5)),
    }[name]
    model = randomize_norms(model(), seed).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    cal = [(torch.randn(b, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (4, 3, 5)]
    return model, cal


TINY = ["relu_mlp", "gelu_mlp", "cnn_bn", "residual_cnn", "attention"]
