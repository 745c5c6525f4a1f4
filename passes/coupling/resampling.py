"""Coupling rules for ops that resize the spatial dims: pooling, upsampling, interpolation, padding.

Channel and batch dims pass through; the resized spatial dims are frozen
(their size is set by the input).
"""
from __future__ import annotations

import re

import torch.nn as nn
import torch.nn.functional as F

from ..fxutil import node_arg
from .core import COUPLING_RULES, RuleContext, ndim

__all__ = ["couple_pool"]

POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)
POOL_FUNCTIONS = (
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d,
)


def couple_pool(r: RuleContext, node, k: int):
    """The last ``k`` dims are resized (frozen); the others pass through."""
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x[: len(x) - k], y[: len(y) - k])
    for s in y[len(y) - k :]:
        r.c.freeze(s, "spatial size is set by the input")


@COUPLING_RULES.register(*POOL_MODULES)
def pool_module_rule(r: RuleContext, node):
    k = int(type(r.module(node)).__name__[-2])  # MaxPool2d -> 2
    couple_pool(r, node, k)


@COUPLING_RULES.register(*POOL_FUNCTIONS)
def pool_fn_rule(r: RuleContext, node):
    name = getattr(node.target, "__name__", str(node.target))
    m = re.search(r"(\d)d", name)
    couple_pool(r, node, int(m.group(1)) if m else ndim(node) - 2)


@COUPLING_RULES.register(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)
def upsample_rule(r: RuleContext, node):
    couple_pool(r, node, ndim(node) - 2)


@COUPLING_RULES.register(F.interpolate)
def interpolate_rule(r: RuleContext, node):
    couple_pool(r, node, ndim(node) - 2)


@COUPLING_RULES.register(F.pad)
def pad_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    pad = node_arg(node, 1, "pad")
    padded = {len(x) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    r.pass_through(x, y, padded, f"padded at node '{node.name}'")
