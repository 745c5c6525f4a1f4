"""Pass 2a: the coupling rules -- what each op says about which positions vanish together.

One module per op family; each registers its rules in ``COUPLING_RULES`` (an
``OpRegistry`` keyed by module type, function or tensor-method name).  A rule
reads the node's recorded value specs and states facts on the ``Coupling``
object (``passes/dependency.py``): ``equal`` (positions vanish together),
``product`` (a reshape factors a dim), ``freeze`` (a position must stay).  Ops
without a rule freeze every dim they touch and warn: never guess.  Rules also
leave rewrite hints in ``node.meta`` (keys in ``passes/meta.py``) on nodes whose
literal arguments depend on channel counts.

=================  ==============================================================
``core``           the engine: ``RuleContext`` (what a rule receives), the main
                   loop, shape-read tracking, ``COUPLING_RULES``, ``apply_rules``
``layers``         conv / linear / embedding modules, ``F.conv*`` / ``F.linear``
``norms``          batch / instance / group norm, PReLU, layer norm, ``F.*_norm``
``attention``      ``nn.MultiheadAttention``, SDPA, torchvision Swin functions
``shape``          reshape / view / flatten, permute / transpose, expand, repeat
``indexing``       cat, stack, split / chunk, unbind, ``x[...]``
``elementwise``    activations, arithmetic, casts, dropout (functions, methods, modules)
``contraction``    matmul / bmm / mm, einsum
``reductions``     sum / mean / max / ..., cumsum
``resampling``     pooling, upsampling, interpolate, pad
``creation``       zeros / ones / arange / new_* ...
``roll``           ``torch.roll``: written as a user writes a rule (the worked example)
=================  ==============================================================

Extending the analysis to a new op::

    from oba_fx.passes.coupling import COUPLING_RULES, NoRule, RuleContext

    @COUPLING_RULES.register(MyScale)                 # a module type (and its subclasses)
    def my_scale_rule(r: RuleContext, node):
        x, y = r.value(node.args[0]), r.value(node)   # slot ids, one per dim
        r.eq_all(x, y)                                # every dim passes through
        r.c.equal(y[1], r.c.param(f"{node.target}.scale", {0: "norm"})[0])
        return None                                   # handled (no size arguments)

A rule returns ``None`` (handled), a sequence of the node's size-argument nodes
(handled; the rewrite replaces the stale ones), or ``NoRule(reason)``: the op
is treated as unknown and the warning carries the reason.
``COUPLING_RULES.unregister(MyScale)`` removes the rule again.
"""
from __future__ import annotations

from ..registry import NoRule
from .core import COUPLING_RULES, RuleContext, RuleResult, apply_rules

# the family modules register their rules on import (the order only matters for a key registered twice)
from . import elementwise, shape, indexing, reductions, contraction, attention, norms, layers  # noqa: E402,F401
from . import resampling, creation, roll  # noqa: E402,F401

__all__ = ["COUPLING_RULES", "RuleContext", "RuleResult", "NoRule", "apply_rules"]
