"""The coupling rule for ``torch.roll`` / ``Tensor.roll``, written the way a user writes a rule.

It uses only the public extension API -- the ``COUPLING_RULES.register``
decorator, ``RuleContext.value`` / ``pass_through``, and the coupling facts ``r.c.equal`` /
``r.c.freeze`` -- so it doubles as the worked example for extending the analysis
(see ``passes/coupling/__init__.py`` and ``tests/test_extension_rules.py``).
Outside the package the import reads ``from oba_fx.passes.coupling import COUPLING_RULES, RuleContext``
(the package re-exports these same objects from ``.core``; importing them from ``.core`` here keeps the
package's imports acyclic).
"""
from __future__ import annotations

import torch

from .core import COUPLING_RULES, RuleContext


@COUPLING_RULES.register(torch.roll, "roll")
def roll_rule(r: RuleContext, node):
    """torch.roll: positions move along the rolled dims (frozen); every other dim passes through."""
    x, y = r.value(node.args[0]), r.value(node)
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        rolled = set(range(len(x)))  # flattened roll
    else:
        rolled = {d % len(x) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    r.pass_through(x, y, rolled, f"rolled at node '{node.name}'")
