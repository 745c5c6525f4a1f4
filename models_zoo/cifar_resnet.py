"""CIFAR-style ResNets (He et al., 2016, Sec. 4.2) with projection shortcuts.

Three stages of ``n = (depth - 2) / 6`` BasicBlocks with 16/32/64 channels, a
3x3 conv stem, global average pooling and a single linear classifier.  Where a
block changes the spatial size or channel count the shortcut is a 1x1 conv + BN
projection (option B), not the parameter-free zero-padding shortcut (option A),
so every residual add is between two prunable conv outputs.

Works on any input size that survives two stride-2 convolutions (e.g. 28x28
Fashion-MNIST with ``in_channels=1`` and 32x32 CIFAR).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet32", "resnet56"]


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1 projection shortcut.

    Args:
        in_planes: Input channels.
        planes: Output channels.
        stride: Stride of the first conv (and of the projection, if any).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Input of shape (B, in_planes, H, W).

        Returns:
            Tensor of shape (B, planes, H / stride, W / stride).
        """
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images.

    Args:
        depth: Total depth; must satisfy ``(depth - 2) % 6 == 0``.
        in_channels: Input image channels.
        num_classes: Number of output logits.
        widths: Channels of the three stages.
    """

    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10,
                 widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        stages = []
        for i, w in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, w, stride))
                in_planes = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=5 ** 0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images of shape (B, in_channels, H, W).

        Returns:
            Logits of shape (B, num_classes).
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet20(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage).

    Args:
        in_channels: Input image channels.
        num_classes: Number of output logits.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(20, in_channels, num_classes)


def resnet32(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage).

    Args:
        in_channels: Input image channels.
        num_classes: Number of output logits.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(32, in_channels, num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage).

    Args:
        in_channels: Input image channels.
        num_classes: Number of output logits.

    Returns:
        A freshly initialised :class:`CifarResNet`.
    """
    return CifarResNet(56, in_channels, num_classes)
