"""Coupling rules for attention: ``nn.MultiheadAttention``, SDPA, torchvision Swin's window attention.

Attention projections are packed q / k / v rows of ``H x D`` each: a head, a
q/k head-width position, or a v head-width position each vanish as a unit (the
virtual slots ``<ref>.num_heads`` / ``.qk_head_dim`` / ``.v_head_dim`` the rewrite
reads).  Hints for the rewrite: ``nn.MultiheadAttention`` is swapped for
``SlimMultiheadAttention``; SDPA's implicit scale and Swin's scale stay at their
original values.  Also torchvision Swin's other ``torch.fx.wrap`` functions
(relative-position bias, patch-merging pad).
"""
from __future__ import annotations

import math

import numpy as np
import torch.nn as nn
import torch.nn.functional as F

from .. import meta
from ..attention import SlimMultiheadAttention, slim_shifted_window_attention
from ..fxutil import node_arg
from ..registry import NoRule
from .core import COUPLING_RULES, RuleContext, is_tensor


def _qkv_heads(r: RuleContext, ref: str, H: int, Dqk: int, Dv: int, rows: int, bias_rows: int | None,
               out_cols: int):
    """Packed q/k/v projection rows (q = H x Dqk, then k, then v = H x Dv) and the output projection's
    columns (v's): the virtual slots ``{ref}.num_heads`` / ``.qk_head_dim`` / ``.v_head_dim`` the rewrite reads.

    Returns the heads slot.
    """
    heads = r.c.virtual(f"{ref}.num_heads", H)
    dqk = r.c.virtual(f"{ref}.qk_head_dim", Dqk)
    dv = r.c.virtual(f"{ref}.v_head_dim", Dv)
    off = 0
    for part, dfac, D in (("q", dqk, Dqk), ("k", dqk, Dqk), ("v", dv, Dv)):
        inner = r.c.virtual(f"{ref}.{part}", H * D)
        r.c.equal(rows, inner, np.arange(off, off + H * D))
        if bias_rows is not None:
            r.c.equal(bias_rows, inner, np.arange(off, off + H * D))
        off += H * D
        r.c.product(inner, [heads, dfac])
        if part == "v":
            r.c.equal(out_cols, inner)
    return heads


@COUPLING_RULES.register(nn.MultiheadAttention, SlimMultiheadAttention)
def mha_rule(r: RuleContext, node):
    """nn.MultiheadAttention (and the rewrite's SlimMultiheadAttention): embed dim, heads, head dims.

    The inner projections are q = H x Dqk, k = H x Dqk, v = H x Dv; the rewrite
    replaces the module by one that allows inner width != embed dim.
    """
    m = r.module(node)
    name = node.target
    q_in, k_in, v_in = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if isinstance(m, SlimMultiheadAttention):
        H, Dqk, Dv = m.num_heads, m.qk_head_dim, m.v_head_dim
    else:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            r.freeze_all(node, f"{name}: MultiheadAttention with kdim/vdim, bias_k or add_zero_attn is not supported")
            return None
        H = m.num_heads
        Dqk = Dv = m.embed_dim // H
    qs, ks, vs = r.value(q_in), r.value(k_in), r.value(v_in)
    out = r.value(node, (0,))
    w = r.c.param(f"{name}.in_proj_weight", {0: "head", 1: "consumer"})
    b = r.c.param(f"{name}.in_proj_bias", {0: "head"}) if m.in_proj_bias is not None else None
    ow = r.c.param(f"{name}.out_proj.weight", {0: "producer", 1: "head"})
    for x in (qs, ks, vs):
        r.c.equal(x[-1], w[1])
    _qkv_heads(r, name, H, Dqk, Dv, w[0], b[0] if b is not None else None, ow[1])
    r.c.equal(out[-1], ow[0])
    if m.out_proj.bias is not None:
        r.c.equal(out[-1], r.c.param(f"{name}.out_proj.bias", {0: "bias"})[0])
    # token and batch dims
    if len(qs) == 3:
        bdim, tdim = (0, 1) if m.batch_first else (1, 0)
        for x in (ks, vs, out):
            r.c.equal(qs[bdim], x[bdim])
        r.c.equal(ks[tdim], vs[tdim])
        r.c.equal(qs[tdim], out[tdim])
    else:
        r.c.equal(ks[0], vs[0])
        r.c.equal(qs[0], out[0])
    weights = r.value(node, (1,))
    if weights is not None:
        r.freeze_value(node, f"{name}: attention weights are returned", (1,))
    r.hint(node, meta.REPLACE, "mha")
    return None


@COUPLING_RULES.register(F.scaled_dot_product_attention)
def sdpa_rule(r: RuleContext, node):
    q, k, v = (r.value(node_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    y = r.value(node)
    r.c.equal(q[-1], k[-1])
    r.c.equal(k[-2], v[-2])
    r.c.equal(y[-2], q[-2])
    r.c.equal(y[-1], v[-1])
    r.batch(y[:-2], [q[:-2], k[:-2], v[:-2]])
    mask = node_arg(node, 3, "attn_mask")
    if is_tensor(mask):
        ms = r.value(mask)
        tail = [q[-2], k[-2]]
        for s, t in zip(ms[-2:], tail[-len(ms[-2:]) :]):
            if r.c.size(s) == r.c.size(t):
                r.c.equal(s, t)
        r.batch(y[:-2], [ms[:-2]])
    if node_arg(node, 6, "scale") is None:
        r.hint(node, meta.SDPA_SCALE, 1.0 / math.sqrt(r.c.size(q[-1])))


# --- torchvision Swin: functions torchvision marks with torch.fx.wrap --------

_WINDOW_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                          "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale",
                          "training")


@COUPLING_RULES.register(slim_shifted_window_attention)
def window_attention_rule(r: RuleContext, node):
    """Swin's shifted_window_attention: heads, q/k and v head widths, residual width.

    ``qkv_weight`` rows are q = H x Dqk, k = H x Dqk, v = H x Dv; ``proj_weight``
    columns are v's; the relative-position bias (1, H, N, N) and V2's
    ``logit_scale`` (H, 1, 1) carry one entry per head.  torchvision's function
    derives the head width from the input width, so the rewrite calls
    ``passes.attention.slim_shifted_window_attention`` with explicit widths and
    the original scale.
    """
    a = {n: node_arg(node, i, n) for i, n in enumerate(_WINDOW_ATTENTION_ARGS)}
    H = a["num_heads"]
    if not isinstance(H, int) or not is_tensor(a["input"]) or not is_tensor(a["qkv_weight"]):
        return NoRule()
    x, y, wq, wp = r.value(a["input"]), r.value(node), r.value(a["qkv_weight"]), r.value(a["proj_weight"])
    if node.target is slim_shifted_window_attention:
        Dqk, Dv, scale = node.kwargs["qk_head_dim"], node.kwargs["v_head_dim"], node.kwargs["scale"]
    else:
        Dqk = Dv = r.c.size(x[3]) // H
        scale = Dqk ** -0.5
    if r.c.size(wq[0]) != H * (2 * Dqk + Dv) or r.c.size(wp[1]) != H * Dv:
        return NoRule()
    r.c.equal(x[3], wq[1])
    r.c.equal(y[3], wp[0])
    if is_tensor(a["proj_bias"]):
        r.c.equal(y[3], r.value(a["proj_bias"])[0])
    for d in range(3):
        r.c.equal(x[d], y[d])
    qb = r.value(a["qkv_bias"]) if is_tensor(a["qkv_bias"]) else None
    heads = _qkv_heads(r, node.name, H, Dqk, Dv, wq[0], qb[0] if qb is not None else None, wp[1])
    rpb = r.value(a["relative_position_bias"]) if is_tensor(a["relative_position_bias"]) else None
    if rpb is not None:
        if len(rpb) != 4 or r.c.size(rpb[1]) != H:
            return NoRule()
        r.c.equal(rpb[1], heads)
        for d in (0, 2, 3):
            r.c.freeze(rpb[d], f"window positions of a relative-position bias at node '{node.name}'")
    if is_tensor(a["logit_scale"]):
        ls = r.value(a["logit_scale"])
        r.c.equal(ls[0], heads)
    r.hint(node, meta.WINDOW_ATTENTION, {"scale": scale})
    return None


def relative_position_bias_rule(r: RuleContext, node):
    """torchvision Swin's _get_relative_position_bias: table (T, H) -> (1, H, N, N)."""
    table, index = node_arg(node, 0, "relative_position_bias_table"), node_arg(node, 1, "relative_position_index")
    t, y = r.value(table), r.value(node)
    r.c.equal(t[1], y[1])
    r.c.freeze(t[0], f"relative-position table rows are selected by an index at node '{node.name}'")
    for d in (0, 2, 3):
        r.c.freeze(y[d], f"window positions of a relative-position bias at node '{node.name}'")
    if is_tensor(index):
        r.freeze_value(index, "an index tensor")


def patch_merging_pad_rule(r: RuleContext, node):
    """torchvision Swin's _patch_merging_pad: (..., H, W, C) -> (..., H/2, W/2, 4C), four strided copies."""
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x[:-3], y[:-3])
    C = r.c.size(x[-1])
    for k in range(4):
        r.c.equal(x[-1], y[-1], np.arange(C), np.arange(k * C, (k + 1) * C))
    for d in (-3, -2):
        r.c.freeze(x[d], "spatial size is set by the input")
        r.c.freeze(y[d], "spatial size is set by the input")


try:  # torchvision is optional for the coupling analysis
    from torchvision.models import swin_transformer as _tv_swin
except ImportError:
    _tv_swin = None
if _tv_swin is not None:
    COUPLING_RULES.register(_tv_swin.shifted_window_attention)(window_attention_rule)
    COUPLING_RULES.register(_tv_swin._get_relative_position_bias)(relative_position_bias_rule)
    COUPLING_RULES.register(_tv_swin._patch_merging_pad)(patch_merging_pad_rule)
