"""Coupling rules for ops that join, cut or index a dim: cat, stack, split / chunk, unbind, ``x[...]``.

A cat's inputs sit at consecutive offsets of its output dim, a split's outputs
are consecutive slices of its input dim.  Integer indexing, constant-bound
slicing, index tensors and unbind select positions by index: those dims are
frozen.  ``split`` leaves the ``SPLIT`` hint: its sections are rewritten.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx

from .. import meta
from ..fxutil import node_arg, tensor_paths
from ..registry import NoRule
from .core import COUPLING_RULES, RuleContext, flatten_nodes, is_tensor, norm_dim, spec, where


@COUPLING_RULES.register(torch.cat, torch.concat, torch.concatenate)
def cat_rule(r: RuleContext, node):
    tensors = node_arg(node, 0, "tensors")
    dim = node_arg(node, 1, "dim", 0)
    y = r.value(node)
    d = norm_dim(dim, len(y))
    off = 0
    for t in tensors:
        x = r.value(t)
        n = r.c.size(x[d])
        r.c.equal(x[d], y[d], np.arange(n), np.arange(off, off + n))
        off += n
        for k in range(len(y)):
            if k != d:
                r.c.equal(x[k], y[k])


@COUPLING_RULES.register(torch.stack)
def stack_rule(r: RuleContext, node):
    tensors = node_arg(node, 0, "tensors")
    y = r.value(node)
    d = norm_dim(node_arg(node, 1, "dim", 0), len(y))
    r.c.freeze(y[d], f"a stack dim created at node '{node.name}'")
    for t in tensors:
        x = r.value(t)
        r.eq_all(x, y[:d] + y[d + 1 :])


@COUPLING_RULES.register(torch.split, torch.chunk, torch.tensor_split, "split", "chunk", "tensor_split")
def split_rule(r: RuleContext, node):
    """split/chunk/tensor_split: outputs are consecutive slices of one dim."""
    x = r.value(node.args[0])
    paths = tensor_paths(spec(node))
    dim = node_arg(node, 2, "dim", 0)
    d = norm_dim(dim, len(x))
    off = 0
    outs = [r.value(node, p) for p in paths]
    for y in outs:
        n = r.c.size(y[d])
        r.c.equal(x[d], y[d], np.arange(off, off + n), np.arange(n))
        off += n
        for k in range(len(x)):
            if k != d:
                r.c.equal(x[k], y[k])
    if node.target in ("chunk", torch.chunk):
        # chunk() needs equal pieces: couple the pieces position by position
        sizes = {r.c.size(y[d]) for y in outs}
        if len(sizes) == 1:
            for y in outs[1:]:
                r.c.equal(outs[0][d], y[d])
        else:
            r.c.freeze(x[d], f"chunk into unequal pieces at node '{node.name}'")
    elif node.target in ("split", torch.split):
        r.hint(node, meta.SPLIT, d)
        # split sizes read from a shape (qkv.split(C, -1)) are rewritten to the new sections
        return flatten_nodes((node.args[1:2], {k: v for k, v in node.kwargs.items() if k != "dim"}))
    else:
        r.c.freeze(x[d], f"tensor_split at node '{node.name}'")
    return None


@COUPLING_RULES.register(torch.unbind, "unbind")
def unbind_rule(r: RuleContext, node):
    x = r.value(node.args[0])
    d = norm_dim(node_arg(node, 1, "dim", 0), len(x))
    r.c.freeze(x[d], f"unbind selects positions by index at node '{node.name}'")
    for p in tensor_paths(spec(node)):
        r.eq_all(x[:d] + x[d + 1 :], r.value(node, p))


def _getitem_of_tuple(r: RuleContext, node, src, idx):
    """Selecting one output of a multi-output node (a tuple of tensors)."""
    s = spec(src)
    if isinstance(idx, int) and isinstance(s, tuple) and -len(s) <= idx < len(s):
        y = r.value(node)
        x = r.value(src, (idx % len(s),))  # spx[-1] is the same slot as spx[2]
        if y is not None and x is not None:
            r.eq_all(x, y)
            return None
    return NoRule()


def _gather_position(parts) -> int | None:
    """The position of the one integer index tensor in ``t[idx]`` / ``t[:, idx]`` (None if not that form)."""
    gathers = [k for k, i in enumerate(parts) if is_tensor(i)]
    if (len(gathers) == 1 and all(i == slice(None) for k, i in enumerate(parts) if k != gathers[0])
            and not spec(parts[gathers[0]]).dtype.is_floating_point and spec(parts[gathers[0]]).dtype != torch.bool):
        return gathers[0]
    return None


def _basic_indexing(r: RuleContext, node, x, y, idx):
    """Ints, slices, None and Ellipsis: a full slice passes a dim through, everything else freezes it."""
    n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (len(x) - n_real)
        else:
            expanded.append(i)
    expanded += [slice(None)] * (len(x) - sum(1 for i in expanded if i is not None))
    xi = yi = 0
    for i in expanded:
        if i is None:
            r.c.freeze(y[yi], "a size-1 dim created by indexing")
            yi += 1
        elif isinstance(i, int):
            r.c.freeze(x[xi], f"integer indexing at node '{node.name}'{where(node)}")
            xi += 1
        elif isinstance(i, slice) and any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step)):
            why = f"sliced with computed bounds at node '{node.name}'{where(node)}"
            r.c.freeze(x[xi], why)
            r.c.freeze(y[yi], why)
            xi += 1
            yi += 1
        elif isinstance(i, slice):
            n = r.c.size(x[xi])
            if range(n)[i] == range(n):
                r.c.equal(x[xi], y[yi])
            else:
                why = f"sliced with constant bounds at node '{node.name}'{where(node)}"
                r.c.freeze(x[xi], why)
                r.c.freeze(y[yi], why)
            xi += 1
            yi += 1
        else:
            return NoRule()
    return None


@COUPLING_RULES.register(operator.getitem)
def getitem_rule(r: RuleContext, node):
    src, idx = node.args
    if not is_tensor(src):
        return _getitem_of_tuple(r, node, src, idx)
    x, y = r.value(src), r.value(node)
    parts = idx if isinstance(idx, tuple) else (idx,)
    p = _gather_position(parts)
    if p is not None:
        # entries gathered by one integer index tensor (a relative-position table, ``t[idx]`` or
        # ``t[:, idx]``): the gathered dim stays, the index's dims take its place, the rest pass through
        ix = r.value(parts[p])
        r.c.freeze(x[p], f"entries selected by an index tensor at node '{node.name}'{where(node)}")
        r.eq_all(x[:p], y[:p])
        r.eq_all(ix, y[p : p + len(ix)])
        r.eq_all(x[p + 1 :], y[p + len(ix) :])
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, torch.fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        return NoRule()
    return _basic_indexing(r, node, x, y, idx)
