"""Coupling rules for reductions (sum, mean, max, norm, ...) and cumulative sums.

A reduced dim vanishes from the output (or stays as a frozen size-1 dim with
``keepdim``); every other dim passes through.  A cumulative sum mixes positions
along its dim, which is frozen.
"""
from __future__ import annotations

import torch

from ..fxutil import node_arg, tensor_paths
from .core import COUPLING_RULES, RuleContext, norm_dim, spec

REDUCTIONS = ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "max", "min", "argmax",
              "argmin", "all", "any")


@COUPLING_RULES.register(*REDUCTIONS, *(getattr(torch, n) for n in REDUCTIONS if hasattr(torch, n)))
def reduce_rule(r: RuleContext, node):
    x = r.value(node.args[0])
    paths = tensor_paths(spec(node))
    dim = node_arg(node, 1, "dim")
    keep = node_arg(node, 2, "keepdim", False)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        reduced = set(range(len(x)))
    else:
        reduced = {norm_dim(d, len(x)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    for p in paths:
        y = r.value(node, p)
        yi = 0
        for k in range(len(x)):
            if k in reduced:
                if keep:
                    r.c.freeze(y[yi], "a size-1 dim kept by a reduction")
                    yi += 1
            else:
                r.c.equal(x[k], y[yi])
                yi += 1


@COUPLING_RULES.register(torch.cumsum, "cumsum")
def cumsum_rule(r: RuleContext, node):
    """cumsum: positions along the summed dim mix (frozen); every other dim passes through."""
    x, y = r.value(node.args[0]), r.value(node)
    d = norm_dim(node_arg(node, 1, "dim"), len(x))
    for k in range(len(x)):
        if k == d:
            r.c.freeze(x[k], f"cumulative sum along this dim at node '{node.name}'")
            r.c.freeze(y[k], f"cumulative sum along this dim at node '{node.name}'")
        else:
            r.c.equal(x[k], y[k])
