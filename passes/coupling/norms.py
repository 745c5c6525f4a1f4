"""Coupling rules for normalisations: per-channel (batch / instance / group norm, PReLU) and layer norm.

Per-channel tensors (affine weight and bias, running statistics) go with their
channel.  Group norm loses whole groups, so every other group's statistics stay
exact.  ``F.layer_norm`` leaves a hint: its literal ``normalized_shape`` is rewritten.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import meta
from ..fxutil import node_arg
from .core import COUPLING_RULES, RuleContext, is_tensor


def _frozen_bn_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import FrozenBatchNorm2d

        return (FrozenBatchNorm2d,)
    except ImportError:
        return ()


@COUPLING_RULES.register(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
                         nn.InstanceNorm2d, nn.InstanceNorm3d, nn.GroupNorm, nn.PReLU, *_frozen_bn_types())
def channel_norm_rule(r: RuleContext, node):
    """BatchNorm / InstanceNorm / GroupNorm / PReLU: per-channel tensors on dim 1."""
    m = r.module(node)
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x, y)
    if len(x) < 2:
        return
    for pname in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(m, pname, None)
        if isinstance(t, torch.Tensor) and t.ndim == 1 and t.numel() == r.c.size(x[1]):
            role = "norm" if isinstance(t, nn.Parameter) else "buffer"
            r.c.equal(x[1], r.c.param(f"{node.target}.{pname}", {0: role})[0])
    if isinstance(m, nn.GroupNorm) and m.num_groups > 1:
        # removing whole groups keeps every other group's statistics exact
        g = r.c.virtual(f"{node.target}.num_groups", m.num_groups)
        per = m.num_channels // m.num_groups
        r.c.equal(x[1], g, np.arange(m.num_channels), np.arange(m.num_channels) // per)


@COUPLING_RULES.register(nn.LayerNorm)
def layer_norm_rule(r: RuleContext, node):
    m = r.module(node)
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x, y)
    k = len(m.normalized_shape)
    for pname in ("weight", "bias"):
        if getattr(m, pname, None) is not None:
            p = r.c.param(f"{node.target}.{pname}", {d: "norm" for d in range(k)})
            for d in range(k):
                r.c.equal(x[len(x) - k + d], p[d])


@COUPLING_RULES.register(F.layer_norm)
def layer_norm_fn_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x, y)
    shape = node_arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    for i, name in ((2, "weight"), (3, "bias")):
        p = node_arg(node, i, name)
        if is_tensor(p):
            ps = r.value(p)
            for d in range(k):
                r.c.equal(x[len(x) - k + d], ps[d])
    r.hint(node, meta.LAYER_NORM_SHAPE, k)


@COUPLING_RULES.register(F.batch_norm)
def batch_norm_fn_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x, y)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = node_arg(node, i, name)
        if is_tensor(p):
            r.c.equal(x[1], r.value(p)[0])
