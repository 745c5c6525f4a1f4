"""Coupling rules for ops that rearrange dims: reshape / view / flatten, permute / transpose, expand, repeat.

A reshape couples blocks of dims with equal products (``C = H x D``); a permute
couples each output dim with its input dim.  Size arguments of
view / reshape / expand / unflatten may be computed from shapes: these rules
return them and leave the ``RESHAPE`` hint, so the rewrite replaces the stale ones.
"""
from __future__ import annotations

import builtins

import torch
import torch.fx
import torch.nn as nn

from .. import meta
from ..fxutil import node_arg
from ..registry import NoRule
from .core import COUPLING_RULES, RuleContext, flatten_nodes, is_tensor, norm_dim

__all__ = ["couple_reshape"]


def couple_reshape(r: RuleContext, src, node, out_path=()):
    """Couple dims of a reshape by matching blocks of equal product."""
    a_slots, b_slots = r.value(src), r.value(node, out_path)
    a = [(s, r.c.size(s)) for s in a_slots if r.c.size(s) != 1]
    b = [(s, r.c.size(s)) for s in b_slots if r.c.size(s) != 1]
    for s in b_slots:
        if r.c.size(s) == 1:
            r.c.freeze(s, "a size-1 dim created by a reshape")
    i = j = 0
    block = 0
    while i < len(a) and j < len(b):
        ba, bb = [a[i]], [b[j]]
        pa, pb = a[i][1], b[j][1]
        while pa != pb:
            if pa < pb:
                i += 1
                ba.append(a[i])
                pa *= a[i][1]
            else:
                j += 1
                bb.append(b[j])
                pb *= b[j][1]
        fa, fb = [s for s, _ in ba], [s for s, _ in bb]
        if len(fa) == 1:
            r.c.product(fa[0], fb)
        elif len(fb) == 1:
            r.c.product(fb[0], fa)
        else:
            flat = r.c.virtual(f"{node.name}.flat{block}", pa)
            r.c.product(flat, fa)
            r.c.product(flat, fb)
        block += 1
        i += 1
        j += 1


@COUPLING_RULES.register(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
                         "flatten", "view", "reshape", "squeeze", "unsqueeze", "unflatten")
def reshape_rule(r: RuleContext, node):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze; size args may come from x.shape."""
    couple_reshape(r, node.args[0], node)
    if node.target in ("view", "reshape", torch.reshape, "unflatten", torch.unflatten):
        r.hint(node, meta.RESHAPE, True)
    return flatten_nodes((node.args[1:], node.kwargs))


@COUPLING_RULES.register(nn.Flatten)
def flatten_module_rule(r: RuleContext, node):
    couple_reshape(r, node.args[0], node)


@COUPLING_RULES.register("reshape_as", "view_as")
def reshape_as_rule(r: RuleContext, node):
    """``x.reshape_as(other)`` / ``x.view_as(other)``: a reshape whose output has other's dims."""
    couple_reshape(r, node.args[0], node)
    other = node_arg(node, 1, "other")
    if is_tensor(other):
        r.eq_all(r.value(other), r.value(node))


def _permutation(node, n: int) -> list[int]:
    """Output dim k of a permute-like node is input dim ``perm[k]``."""
    t = node.target
    if t in ("permute", torch.permute):
        dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
        if t is torch.permute or "dims" in node.kwargs:
            dims = node_arg(node, 1, "dims")
        return [norm_dim(d, n) for d in dims]
    if t in ("t",) or t is torch.t:
        return list(range(n))[::-1]
    if t in ("movedim", torch.movedim):
        src, dst = node_arg(node, 1, "source"), node_arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [norm_dim(d, n) for d in src], [norm_dim(d, n) for d in dst]
        rest = [d for d in range(n) if d not in src]
        perm = [None] * n
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(rest)
        return [p if p is not None else next(it) for p in perm]
    # transpose / swapaxes / swapdims
    d0, d1 = norm_dim(node_arg(node, 1, "dim0"), n), norm_dim(node_arg(node, 2, "dim1"), n)
    perm = list(range(n))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return perm


@COUPLING_RULES.register(torch.permute, torch.transpose, torch.t, torch.movedim, torch.swapaxes, torch.swapdims,
                         "permute", "transpose", "t", "movedim", "swapaxes", "swapdims")
def permute_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    for k, p in enumerate(_permutation(node, len(x))):
        r.c.equal(y[k], x[p])


def mT_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x[:-2], y[:-2])
    r.c.equal(x[-1], y[-2])
    r.c.equal(x[-2], y[-1])


@COUPLING_RULES.register(builtins.getattr)
def getattr_rule(r: RuleContext, node):
    """``x.mT`` and ``x.T``; any other tensor attribute has no rule."""
    attr = node.args[1]
    if attr == "mT":
        return mT_rule(r, node)
    if attr == "T":
        x, y = r.value(node.args[0]), r.value(node)
        for k, s in enumerate(y):
            r.c.equal(s, x[len(x) - 1 - k])
        return None
    return NoRule()


@COUPLING_RULES.register("expand", "expand_as")
def expand_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    off = len(y) - len(x)
    for d in range(off):
        r.c.freeze(y[d], f"a dim created by expand at node '{node.name}'")
    for d, s in enumerate(x):
        if r.c.size(s) == r.c.size(y[off + d]):
            r.c.equal(s, y[off + d])
        else:
            r.c.freeze(y[off + d], f"a dim created by expand at node '{node.name}'")
    if node.target == "expand":
        r.hint(node, meta.RESHAPE, True)
        return flatten_nodes((node.args[1:], node.kwargs))
    return None


@COUPLING_RULES.register("repeat")
def repeat_rule(r: RuleContext, node):
    x, y = r.value(node.args[0]), r.value(node)
    reps = node.args[1:] if not isinstance(node.args[1], (list, tuple)) else node.args[1]
    off = len(y) - len(x)
    for d in range(off):
        r.c.freeze(y[d], f"a dim created by repeat at node '{node.name}'")
    for d, s in enumerate(x):
        rep = reps[off + d]
        if isinstance(rep, torch.fx.Node):
            # a count read from a shape (x.repeat(B, 1, 1)): the sizes it reads are frozen by
            # check_size_uses, and so is what it creates
            why = f"repeated a computed number of times at node '{node.name}'"
            r.c.freeze(s, why)
            r.c.freeze(y[off + d], why)
        elif rep == 1:
            r.c.equal(s, y[off + d])
        else:
            copies = r.c.virtual(f"{node.name}.repeat{d}", rep)
            r.c.freeze(copies, f"repeat count at node '{node.name}'")
            r.c.product(y[off + d], [copies, s])
