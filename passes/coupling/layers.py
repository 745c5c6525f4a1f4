"""Coupling rules for the weight layers: convolutions, linear layers, embeddings.

Modules (``nn.Conv1d/2d/3d``, ``nn.Linear``, ``nn.Embedding`` and their subclasses)
and the functional forms (``F.conv1d/2d/3d``, ``F.linear``) with any weight tensor.
A layer's output channel is its weight's row (and bias entry); its input channel
is its weight's column.  Grouped and depthwise convolutions lose whole groups.
"""
from __future__ import annotations

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from .. import meta
from ..fxutil import node_arg
from ..registry import NoRule
from .core import COUPLING_RULES, RuleContext, is_tensor


@COUPLING_RULES.register(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_rule(r: RuleContext, node):
    m = r.module(node)
    x, y = r.value(node.args[0]), r.value(node)
    k = m.weight.ndim - 2
    cx, cy = len(x) - k - 1, len(y) - k - 1
    name = node.target
    extra = [(n, t) for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
             if n not in ("weight", "bias") and t is not None]
    if any(t.ndim == 0 or t.shape[0] != m.out_channels or t[0].numel() != 1 for _, t in extra):
        # a subclass leaf with tensors of its own (timm's ScaledStdConv2dSame has a per-channel gain)
        # whose layout we cannot read: keep it whole
        r.freeze_all(node, f"{name}: {type(m).__name__} holds tensors besides weight and bias")
        return None
    for pname, _ in extra:  # per-output-channel tensors (gain, scale): they go with their output channel
        r.c.equal(y[cy], r.c.param(f"{name}.{pname}", {0: "norm"})[0])
    w = r.c.param(f"{name}.weight", {0: "producer", 1: "consumer"} if m.groups == 1 else {0: "producer"})
    r.c.equal(y[cy], w[0])
    if m.bias is not None:
        r.c.equal(y[cy], r.c.param(f"{name}.bias", {0: "bias"})[0])
    if m.groups == 1:
        r.c.equal(x[cx], w[1])
    else:
        # grouped/depthwise: a conv group is removed whole (inputs and outputs)
        g = r.c.virtual(f"{name}.groups", m.groups)
        cin_g, cout_g = m.in_channels // m.groups, m.out_channels // m.groups
        r.c.equal(x[cx], g, np.arange(m.in_channels), np.arange(m.in_channels) // cin_g)
        r.c.equal(y[cy], g, np.arange(m.out_channels), np.arange(m.out_channels) // cout_g)
    if cx == 1:
        r.c.equal(x[0], y[0])
    for d in range(k):
        r.c.freeze(y[cy + 1 + d], "spatial size is set by the input")
    return None


@COUPLING_RULES.register(F.conv1d, F.conv2d, F.conv3d)
def conv_fn_rule(r: RuleContext, node):
    """F.conv1d/2d/3d with any weight tensor (a module's own Parameters, a standardised weight).

    The kernel's spatial dims never shrink.  Grouped and depthwise convolutions
    lose whole groups, as in ``conv_rule``; the rewrite updates the literal
    ``groups`` argument.
    """
    groups = node_arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        return NoRule()
    x, w, y = r.value(node.args[0]), r.value(node_arg(node, 1, "weight")), r.value(node)
    k = len(w) - 2
    cx, cy = len(x) - k - 1, len(y) - k - 1
    r.c.equal(y[cy], w[0])
    b = node_arg(node, 2, "bias")
    if is_tensor(b):
        r.c.equal(y[cy], r.value(b)[0])
    for d in range(k):
        r.c.freeze(w[2 + d], "a convolution kernel's spatial size")
    if groups == 1:
        r.c.equal(x[cx], w[1])
    else:
        cin, cout = r.c.size(x[cx]), r.c.size(y[cy])
        g = r.c.virtual(f"{node.name}.groups", groups)
        r.c.equal(x[cx], g, np.arange(cin), np.arange(cin) // (cin // groups))
        r.c.equal(y[cy], g, np.arange(cout), np.arange(cout) // (cout // groups))
        r.c.freeze(w[1], f"input channels within a conv group at node '{node.name}'")
        r.hint(node, meta.CONV_GROUPS, f"{node.name}.groups")
    if cx == 1:
        r.c.equal(x[0], y[0])
    for d in range(k):
        r.c.freeze(y[cy + 1 + d], "spatial size is set by the input")
    return None


@COUPLING_RULES.register(nn.Linear)
def linear_rule(r: RuleContext, node):
    m = r.module(node)
    x, y = r.value(node.args[0]), r.value(node)
    w = r.c.param(f"{node.target}.weight", {0: "producer", 1: "consumer"})
    r.c.equal(y[-1], w[0])
    r.c.equal(x[-1], w[1])
    if m.bias is not None:
        r.c.equal(y[-1], r.c.param(f"{node.target}.bias", {0: "bias"})[0])
    r.eq_all(x[:-1], y[:-1])


@COUPLING_RULES.register(F.linear)
def linear_fn_rule(r: RuleContext, node):
    x, w, y = r.value(node.args[0]), r.value(node_arg(node, 1, "weight")), r.value(node)
    r.c.equal(y[-1], w[0])
    r.c.equal(x[-1], w[1])
    b = node_arg(node, 2, "bias")
    if is_tensor(b):
        r.c.equal(y[-1], r.value(b)[0])
    r.eq_all(x[:-1], y[:-1])


@COUPLING_RULES.register(nn.Embedding)
def embedding_rule(r: RuleContext, node):
    y = r.value(node)
    w = r.c.param(f"{node.target}.weight", {1: "embedding"})
    r.c.equal(y[-1], w[1])
    r.eq_all(r.value(node.args[0]), y[:-1])
