"""Coupling rule for ops that create tensors (zeros, ones, full, arange, new_zeros, ...).

A created tensor's dims are fixed by the arguments: they are frozen, and so is
every tensor argument's.
"""
from __future__ import annotations

import torch

from ..fxutil import tensor_paths
from .core import COUPLING_RULES, RuleContext, is_tensor, spec


@COUPLING_RULES.register(torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.eye,
                         torch.rand, torch.randn, torch.randint, torch.tensor, torch.as_tensor, torch.meshgrid,
                         "new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def creation_rule(r: RuleContext, node):
    """torch.zeros/ones/full/arange/...: a new tensor; its dims are fixed by the arguments (frozen)."""
    for path in tensor_paths(spec(node)):
        r.freeze_value(node, f"a tensor created by {getattr(node.target, '__name__', node.target)} "
                             f"at node '{node.name}'", path)
    for a in node.all_input_nodes:
        if is_tensor(a):
            r.freeze_value(a, f"an argument of {getattr(node.target, '__name__', node.target)} at node '{node.name}'")
