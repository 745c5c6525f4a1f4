"""The rule engine: walks the traced graph and applies the registered rule of every op.

Owns ``COUPLING_RULES`` (the registry every family module registers into),
``RuleContext`` (what a rule receives: the slot shortcuts, freezing, and the
tracking of python values computed from tensor shapes), the main loop, and the
small spec helpers the rules share.

A rule is ``rule(r: RuleContext, node) -> None | Sequence[torch.fx.Node] | NoRule``:

* ``None``: handled; the node has no size arguments;
* a sequence of nodes: handled; these arguments are size arguments (a reshape's
  ``(B, N, C // heads)``) which may be computed from shapes -- the rewrite
  replaces those that pruning makes stale;
* ``NoRule(reason)``: the rule cannot handle these arguments; the node is
  treated as an op without a rule (every dim it touches is frozen, with a warning).
"""
from __future__ import annotations

import builtins
import operator
from typing import Any, Sequence, Union

import torch
import torch.fx
import torch.nn as nn

from .. import meta
from ..fxutil import describe_node, get_qualified, node_arg, tensor_paths
from ..registry import NoRule, OpRegistry
from ..trace import TensorSpec
from ..errors import UsageError

__all__ = ["COUPLING_RULES", "RuleContext", "RuleResult", "apply_rules", "spec", "is_tensor", "ndim", "norm_dim",
           "where", "flatten_nodes"]

#: coupling rules by module type, function or tensor-method name (see ``passes/registry.py``)
COUPLING_RULES = OpRegistry("COUPLING_RULES")

#: what a rule returns (see the module docstring)
RuleResult = Union[None, Sequence[torch.fx.Node], NoRule]

_DEFAULT_REASON = NoRule().reason


# ---------------------------------------------------------------------------
# spec helpers the rules share


def spec(node) -> Any:
    """The recorded value of a node (None for a non-node argument)."""
    return node.meta.get(meta.SPEC) if isinstance(node, torch.fx.Node) else None


def is_tensor(a) -> bool:
    return isinstance(a, torch.fx.Node) and isinstance(spec(a), TensorSpec)


def ndim(node) -> int:
    return len(spec(node).shape)


def norm_dim(d: int, n: int) -> int:
    return d + n if d < 0 else d


def where(node: torch.fx.Node) -> str:
    """`` (File "...", line N, in f)``: the user's source line of a node, for messages ("" if unknown)."""
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
        if lines:
            return f" ({lines[-1]})"
    return ""


def flatten_nodes(args) -> list[torch.fx.Node]:
    """Every node in a nested structure of arguments."""
    out = []
    torch.fx.node.map_arg(args, lambda n: out.append(n))
    return out


# ---------------------------------------------------------------------------
# the context a rule receives


class RuleContext:
    """Applies the rule for every node of the traced graph; the object a rule receives as ``r``.

    Rules state facts on ``r.c`` (the ``dependency.Coupling``: ``equal``, ``product``,
    ``freeze``, ``param``, ``virtual``, ``size``) and use the shortcuts below.
    """

    def __init__(self, c, ignore):
        self.c = c
        self.gm = c.traced.gm
        self.modules = dict(self.gm.named_modules())
        self.ignore = ignore
        self.reads: dict[str, Any] = {}  # non-tensor node -> slots whose size it depends on
        self.derived: set[str] = set()  # reads that went through arithmetic

    # -- slot shortcuts ----------------------------------------------------
    def value(self, node, path=()):
        """Slot ids of each dim of a node's tensor value (None if not a tensor)."""
        return self.c.value(node, path)

    def module(self, node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[node.target]

    def eq_all(self, a_slots, b_slots):
        for a, b in zip(a_slots, b_slots):
            self.c.equal(a, b)

    def pass_through(self, x_slots, y_slots, frozen, why: str) -> None:
        """Dims in ``frozen`` freeze on both sides (``why``); every other dim of x passes to the same dim of y."""
        for k in range(len(x_slots)):
            if k in frozen:
                self.c.freeze(x_slots[k], why)
                self.c.freeze(y_slots[k], why)
            else:
                self.c.equal(x_slots[k], y_slots[k])

    def broadcast(self, out_slots, inputs):
        """Right-aligned broadcasting: equal sizes couple, size-1 dims broadcast."""
        for inp in inputs:
            slots = self.value(inp)
            off = len(out_slots) - len(slots)
            for d, s in enumerate(slots):
                o = out_slots[off + d]
                if self.c.size(s) == self.c.size(o):
                    self.c.equal(s, o)

    def batch(self, out, ins):
        """Right-aligned batch dims of a matmul-like op: equal sizes couple."""
        for x in ins:
            off = len(out) - len(x)
            for d, s in enumerate(x):
                if self.c.size(s) == self.c.size(out[off + d]):
                    self.c.equal(s, out[off + d])

    def freeze_value(self, node, reason, path=()):
        slots = self.value(node, path)
        for s in slots or ():
            self.c.freeze(s, reason)

    def freeze_all(self, node, reason):
        """Freeze every tensor dim an op consumes or produces."""
        for a in node.all_input_nodes:
            if is_tensor(a):
                self.freeze_value(a, reason)
        for path in tensor_paths(spec(node)):
            self.freeze_value(node, reason, path)

    def hint(self, node, key: str, value) -> None:
        """Leave a rewrite hint on ``node`` (``key`` is one of ``passes.meta.REWRITE_HINTS``)."""
        node.meta[key] = value

    # -- shape arithmetic --------------------------------------------------
    def track_reads(self, node) -> bool:
        """Handle a node that produces a python value; True if handled."""
        s = spec(node)
        if isinstance(s, TensorSpec) or tensor_paths(s):
            return False
        if node.op == "call_method" and node.target in ("size", "numel"):
            slots = self.value(node.args[0])
            d = node_arg(node, 1, "dim")
            if d is not None and node.target == "size":
                self.reads[node.name] = {slots[norm_dim(d, len(slots))]}
            else:
                self.reads[node.name] = list(slots) if node.target == "size" else set(slots)
            return True
        if node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape":
            self.reads[node.name] = list(self.value(node.args[0]))
            return True
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            r = self.reads.get(getattr(src, "name", None))
            if isinstance(r, list) and isinstance(node.args[1], int):
                self.reads[node.name] = {r[node.args[1]]}
                return True
            if isinstance(r, list) and isinstance(node.args[1], slice):  # x.shape[-2:] reads only those dims
                self.reads[node.name] = r[node.args[1]]
                return True
        if node.op in ("call_function", "call_method"):
            deps = set()
            for a in node.all_input_nodes:
                r = self.reads.get(a.name)
                if r is not None:
                    deps |= set(r)
            if node.target is torch._assert or node.target is torch._assert_async:
                self.freeze_reads(deps, node, "the model asserts this dimension's size")
                return True
            if deps:
                self.reads[node.name] = deps
                self.derived.add(node.name)
            return True
        return False

    def freeze_reads(self, slots, node, why):
        for s in slots:
            self.c.freeze(s, f"{why} at node '{node.name}'{where(node)}")

    def check_size_uses(self, node, allowed_positions=()):
        """Sizes read from tensors may only feed reshape-like size arguments."""
        allowed = set(id(a) for a in allowed_positions)
        for a in node.all_input_nodes:
            r = self.reads.get(a.name)
            if not r:
                continue
            if id(a) not in allowed:
                self.freeze_reads(set(r), node, "the model uses this dimension's size in arithmetic")
            # a size argument read or computed from a shape (B, N, C // heads) is allowed: the
            # rewrite replaces every argument that pruning makes stale (see rewrite._rewrite_sizes)

    # -- main loop ---------------------------------------------------------
    def run(self):
        for node in self.gm.graph.nodes:
            for key in meta.REWRITE_HINTS:  # hints of an earlier analysis of this graph
                node.meta.pop(key, None)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                for path in tensor_paths(spec(node)):
                    self.freeze_value(node, f"reaches the model input '{node.name}'", path)
            elif node.op == "output":
                for a in flatten_nodes(node.args):
                    for path in tensor_paths(spec(a)):
                        self.freeze_value(a, "reaches the model output", path)
            elif node.op == "get_attr":
                self.get_attr(node)
            elif self.track_reads(node):
                if node.meta.get(meta.BRANCH):  # python decided on this value while tracing
                    self.freeze_reads(set(self.reads.get(node.name, ())), node,
                                      "the model's python code branches on this dimension's size")
            else:
                self.apply_rule(node)
        self.apply_ignore()
        self.c.size_reads = {k: frozenset(v) for k, v in self.reads.items()}

    def apply_rule(self, node) -> None:
        rule = COUPLING_RULES.lookup(node, self.modules)
        size_args = rule(self, node) if rule is not None else NoRule()
        if isinstance(size_args, NoRule):  # no rule, or a rule that cannot handle these arguments
            self.unknown(node, size_args)
            size_args = None
        self.check_size_uses(node, size_args or ())

    def unknown(self, node, why: NoRule):
        desc = describe_node(node, self.modules)
        detail = "" if why.reason == _DEFAULT_REASON else f": {why.reason}"
        self.c.warn(f"oba_fx: no coupling rule for {desc}{where(node)}{detail}; the dims it touches stay frozen")
        self.freeze_all(node, f"touched by {desc}, which the analysis does not understand")

    def get_attr(self, node):
        s = spec(node)
        if not isinstance(s, TensorSpec):
            return
        is_param = isinstance(get_qualified(self.gm, node.target), nn.Parameter)
        dims = {d: ("embedding" if is_param else "buffer") for d, n in enumerate(s.shape) if n > 1}
        pslots = self.c.param(node.target, dims)
        vslots = self.value(node)
        for d, sid in pslots.items():
            self.c.equal(vslots[d], sid)

    def apply_ignore(self):
        for name in self.ignore:
            if name in self.modules:
                for pname, p in self.modules[name].named_parameters(recurse=False):
                    q = f"{name}.{pname}" if name else pname
                    if p.ndim:
                        role = "bias" if pname == "bias" else "producer"
                        for s in self.c.param(q, {0: role}).values():
                            self.c.freeze(s, f"ignored by the user ({name})")
            else:
                try:
                    t = get_qualified(self.gm, name)
                except AttributeError:
                    raise UsageError(f"ignore names neither a module nor a parameter: '{name}'") from None
                for s in self.c.param(name, {d: "embedding" for d in range(t.ndim)}).values():
                    self.c.freeze(s, f"ignored by the user ({name})")


def apply_rules(c, ignore: Sequence[str] = ()) -> None:
    """Run every rule over ``c.traced``; see ``passes/dependency.coupled_groups``."""
    RuleContext(c, ignore).run()
