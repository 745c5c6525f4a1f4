"""Coupling rules: what each op says about which positions vanish together.

One function per op family.  Each reads the node's recorded value specs and
states facts on the ``Coupling`` object (see ``passes/dependency.py``):
``equal`` (positions vanish together), ``product`` (a reshape factors a dim),
``freeze`` (a position must stay).  Ops without a rule freeze every dim they
touch and warn: never guess.

Rules also leave notes for the rewrite pass on nodes whose literal arguments
depend on channel counts (reshape sizes, split sections, layer_norm shapes,
attention scales).
"""
from __future__ import annotations

import builtins
import inspect
import math
import operator
import re
from typing import Any, Callable

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .attention import SlimMultiheadAttention, slim_shifted_window_attention
from .trace import TensorSpec

# ---------------------------------------------------------------------------
# small helpers


def _spec(node):
    return node.meta.get("spec") if isinstance(node, torch.fx.Node) else None


def _is_tensor(a) -> bool:
    return isinstance(a, torch.fx.Node) and isinstance(_spec(a), TensorSpec)


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _ndim(node) -> int:
    return len(_spec(node).shape)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _where(node: torch.fx.Node) -> str:
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File")]
        if lines:
            return f" ({lines[-1]})"
    return ""


def _describe(node: torch.fx.Node, modules) -> str:
    if node.op == "call_module":
        return f"module {node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target} at node '{node.name}'"
    t = node.target
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))} at node '{node.name}'".lstrip(".")


class _Rules:
    """Applies the rule for every node of the traced graph."""

    def __init__(self, c, ignore):
        self.c = c
        self.gm = c.traced.gm
        self.modules = dict(self.gm.named_modules())
        self.ignore = ignore
        self.reads: dict[str, Any] = {}  # non-tensor node -> slots whose size it depends on
        self.derived: set[str] = set()  # reads that went through arithmetic

    # -- slot shortcuts ----------------------------------------------------
    def V(self, node, path=()):
        return self.c.value(node, path)

    def eq_all(self, a_slots, b_slots):
        for a, b in zip(a_slots, b_slots):
            self.c.equal(a, b)

    def broadcast(self, out_slots, inputs):
        """Right-aligned broadcasting: equal sizes couple, size-1 dims broadcast."""
        for inp in inputs:
            slots = self.V(inp)
            off = len(out_slots) - len(slots)
            for d, s in enumerate(slots):
                o = out_slots[off + d]
                if self.c.size(s) == self.c.size(o):
                    self.c.equal(s, o)

    def freeze_value(self, node, reason, path=()):
        slots = self.V(node, path)
        for s in slots or ():
            self.c.freeze(s, reason)

    def freeze_all(self, node, reason):
        """Freeze every tensor dim an op consumes or produces."""
        for a in node.all_input_nodes:
            if _is_tensor(a):
                self.freeze_value(a, reason)
        for path in _tensor_paths(_spec(node)):
            self.freeze_value(node, reason, path)

    # -- shape arithmetic --------------------------------------------------
    def track_reads(self, node) -> bool:
        """Handle a node that produces a python value; True if handled."""
        spec = _spec(node)
        if isinstance(spec, TensorSpec) or _tensor_paths(spec):
            return False
        if node.op == "call_method" and node.target in ("size", "numel"):
            slots = self.V(node.args[0])
            d = _arg(node, 1, "dim")
            if d is not None and node.target == "size":
                self.reads[node.name] = {slots[_norm_dim(d, len(slots))]}
            else:
                self.reads[node.name] = list(slots) if node.target == "size" else set(slots)
            return True
        if node.op == "call_function" and node.target is builtins.getattr and node.args[1] == "shape":
            self.reads[node.name] = list(self.V(node.args[0]))
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
            self.c.freeze(s, f"{why} at node '{node.name}'{_where(node)}")

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
            if node.op == "placeholder":
                for path in _tensor_paths(_spec(node)):
                    self.freeze_value(node, f"reaches the model input '{node.name}'", path)
                continue
            if node.op == "output":
                for a in _flatten_nodes(node.args):
                    for path in _tensor_paths(_spec(a)):
                        self.freeze_value(a, "reaches the model output", path)
                continue
            if node.op == "get_attr":
                self.get_attr(node)
                continue
            if self.track_reads(node):
                if node.meta.get("oba_fx.branch"):  # python decided on this value while tracing
                    self.freeze_reads(set(self.reads.get(node.name, ())), node,
                                      "the model's python code branches on this dimension's size")
                continue
            rule = self.find_rule(node)
            size_args = rule(node) if rule is not None else "unknown"
            if size_args == "unknown":  # no rule, or a rule that cannot handle these arguments
                self.unknown(node)
                size_args = None
            self.check_size_uses(node, size_args or ())
        self.apply_ignore()
        self.c.size_reads = {k: frozenset(v) for k, v in self.reads.items()}

    def find_rule(self, node) -> Callable | None:
        if node.op == "call_module":
            m = self.modules[node.target]
            for types, fn in MODULE_RULES:
                if isinstance(m, types):
                    return lambda n, fn=fn, m=m: fn(self, n, m)
            return None
        key = node.target if node.op == "call_function" else ("method", node.target)
        fn = FUNCTION_RULES.get(key)
        return (lambda n: fn(self, n)) if fn else None

    def unknown(self, node):
        desc = _describe(node, self.modules)
        self.c.warn(f"oba_fx: no coupling rule for {desc}{_where(node)}; the dims it touches stay frozen")
        self.freeze_all(node, f"touched by {desc}, which the analysis does not understand")

    def get_attr(self, node):
        spec = _spec(node)
        if not isinstance(spec, TensorSpec):
            return
        is_param = isinstance(_lookup(self.gm, node.target), nn.Parameter)
        dims = {d: ("embedding" if is_param else "buffer") for d, n in enumerate(spec.shape) if n > 1}
        pslots = self.c.param(node.target, dims)
        vslots = self.V(node)
        for d, s in pslots.items():
            self.c.equal(vslots[d], s)

    def apply_ignore(self):
        for name in self.ignore:
            if name in self.modules:
                for pname, p in self.modules[name].named_parameters(recurse=False):
                    q = f"{name}.{pname}" if name else pname
                    if p.ndim:
                        for s in self.c.param(q, {0: _role_guess(pname)}).values():
                            self.c.freeze(s, f"ignored by the user ({name})")
            else:
                try:
                    t = _lookup(self.gm, name)
                except AttributeError:
                    raise ValueError(f"ignore names neither a module nor a parameter: '{name}'") from None
                for s in self.c.param(name, {d: "embedding" for d in range(t.ndim)}).values():
                    self.c.freeze(s, f"ignored by the user ({name})")


def _role_guess(pname: str) -> str:
    return "bias" if pname == "bias" else "producer"


def _lookup(gm, qualname):
    mod, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(mod), attr)


def _tensor_paths(spec, prefix=()) -> list[tuple[int, ...]]:
    if isinstance(spec, TensorSpec):
        return [prefix]
    if isinstance(spec, tuple):
        out = []
        for i, s in enumerate(spec):
            out += _tensor_paths(s, prefix + (i,))
        return out
    return []


def _flatten_nodes(args) -> list[torch.fx.Node]:
    out = []
    torch.fx.node.map_arg(args, lambda n: out.append(n))
    return out


# ---------------------------------------------------------------------------
# module rules


def conv_rule(r: _Rules, node, m: nn.Conv1d):
    x, y = r.V(node.args[0]), r.V(node)
    k = m.weight.ndim - 2
    cx, cy = len(x) - k - 1, len(y) - k - 1
    name = node.target
    extra = [(n, t) for n, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
             if n not in ("weight", "bias") and t is not None]
    if any(t.ndim == 0 or t.shape[0] != m.out_channels or t[0].numel() != 1 for _, t in extra):
        # a subclass leaf with tensors of its own (timm's ScaledStdConv2dSame has a per-channel gain)
        # whose layout we cannot read: keep it whole
        r.freeze_all(node, f"{name}: {type(m).__name__} holds tensors besides weight and bias")
        return
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


def linear_rule(r: _Rules, node, m: nn.Linear):
    x, y = r.V(node.args[0]), r.V(node)
    w = r.c.param(f"{node.target}.weight", {0: "producer", 1: "consumer"})
    r.c.equal(y[-1], w[0])
    r.c.equal(x[-1], w[1])
    if m.bias is not None:
        r.c.equal(y[-1], r.c.param(f"{node.target}.bias", {0: "bias"})[0])
    r.eq_all(x[:-1], y[:-1])


def channel_norm_rule(r: _Rules, node, m):
    """BatchNorm / InstanceNorm / GroupNorm / PReLU: per-channel tensors on dim 1."""
    x, y = r.V(node.args[0]), r.V(node)
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


def layer_norm_rule(r: _Rules, node, m: nn.LayerNorm):
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x, y)
    k = len(m.normalized_shape)
    for pname in ("weight", "bias"):
        if getattr(m, pname, None) is not None:
            p = r.c.param(f"{node.target}.{pname}", {d: "norm" for d in range(k)})
            for d in range(k):
                r.c.equal(x[len(x) - k + d], p[d])
    r.c.node_notes[node.name]["module_attr"] = "normalized_shape"


def elementwise_module_rule(r: _Rules, node, m):
    r.eq_all(r.V(node.args[0]), r.V(node))


def pool_module_rule(r: _Rules, node, m):
    k = int(type(m).__name__[-2])  # MaxPool2d -> 2
    _pool(r, node, k)


def _pool(r, node, k):
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x[: len(x) - k], y[: len(y) - k])
    for s in y[len(y) - k :]:
        r.c.freeze(s, "spatial size is set by the input")


def flatten_module_rule(r: _Rules, node, m: nn.Flatten):
    _reshape(r, node.args[0], node)


def upsample_rule(r: _Rules, node, m):
    _pool(r, node, _ndim(node) - 2)


def embedding_rule(r: _Rules, node, m: nn.Embedding):
    y = r.V(node)
    w = r.c.param(f"{node.target}.weight", {1: "embedding"})
    r.c.equal(y[-1], w[1])
    r.eq_all(r.V(node.args[0]), y[:-1])


def _qkv_heads(r: _Rules, ref: str, H: int, Dqk: int, Dv: int, rows: int, bias_rows: int | None, out_cols: int):
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


def mha_rule(r: _Rules, node, m: nn.MultiheadAttention):
    """nn.MultiheadAttention (and the rewrite's SlimMultiheadAttention): embed dim, heads, head dims.

    The inner projections are q = H x Dqk, k = H x Dqk, v = H x Dv; the rewrite
    replaces the module by one that allows inner width != embed dim.
    """
    name = node.target
    q_in, k_in, v_in = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if isinstance(m, SlimMultiheadAttention):
        H, Dqk, Dv = m.num_heads, m.qk_head_dim, m.v_head_dim
    else:
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            r.freeze_all(node, f"{name}: MultiheadAttention with kdim/vdim, bias_k or add_zero_attn is not supported")
            return
        H = m.num_heads
        Dqk = Dv = m.embed_dim // H
    qs, ks, vs = r.V(q_in), r.V(k_in), r.V(v_in)
    out = r.V(node, (0,))
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
    weights = r.V(node, (1,))
    if weights is not None:
        r.freeze_value(node, f"{name}: attention weights are returned", (1,))
    r.c.node_notes[node.name]["replace"] = "mha"


def _frozen_bn_types():
    try:
        from torchvision.ops import FrozenBatchNorm2d

        return (FrozenBatchNorm2d,)
    except ImportError:
        return ()


def _stochastic_depth_types():
    try:
        from torchvision.ops import StochasticDepth

        return (StochasticDepth,)
    except ImportError:
        return ()


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Tanhshrink,
) + _stochastic_depth_types()

_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)

MODULE_RULES: list[tuple[tuple[type, ...] | type, Callable]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), conv_rule),
    (nn.Linear, linear_rule),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
      nn.InstanceNorm3d, nn.GroupNorm, nn.PReLU) + _frozen_bn_types(), channel_norm_rule),
    (nn.LayerNorm, layer_norm_rule),
    ((nn.MultiheadAttention, SlimMultiheadAttention), mha_rule),
    (_ELEMENTWISE_MODULES, elementwise_module_rule),
    (_POOL_MODULES, pool_module_rule),
    (nn.Flatten, flatten_module_rule),
    ((nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d), upsample_rule),
    (nn.Embedding, embedding_rule),
]

# ---------------------------------------------------------------------------
# function / method rules


def elementwise_rule(r: _Rules, node):
    out = r.V(node)
    r.broadcast(out, [a for a in node.all_input_nodes if _is_tensor(a)])


def _reshape(r: _Rules, src, node, out_path=()):
    """Couple dims of a reshape by matching blocks of equal product."""
    a_slots, b_slots = r.V(src), r.V(node, out_path)
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


def reshape_rule(r: _Rules, node):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze; size args may come from x.shape."""
    _reshape(r, node.args[0], node)
    if node.target in ("view", "reshape", torch.reshape, "unflatten", torch.unflatten):
        r.c.node_notes[node.name]["reshape"] = True
    return _flatten_nodes((node.args[1:], node.kwargs))


def permute_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
    n = len(x)
    t = node.target
    if t in ("permute", torch.permute):
        dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
        if t is torch.permute or "dims" in node.kwargs:
            dims = _arg(node, 1, "dims")
        perm = [_norm_dim(d, n) for d in dims]
    elif t in ("t",) or t is torch.t:
        perm = list(range(n))[::-1]
    elif t in ("movedim", torch.movedim):
        src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src, dst = [_norm_dim(d, n) for d in src], [_norm_dim(d, n) for d in dst]
        rest = [d for d in range(n) if d not in src]
        perm = [None] * n
        for s_, d_ in zip(src, dst):
            perm[d_] = s_
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    else:  # transpose / swapaxes / swapdims
        d0, d1 = _norm_dim(_arg(node, 1, "dim0"), n), _norm_dim(_arg(node, 2, "dim1"), n)
        perm = list(range(n))
        perm[d0], perm[d1] = perm[d1], perm[d0]
    for k, p in enumerate(perm):
        r.c.equal(y[k], x[p])


def mT_rule(r, node):
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x[:-2], y[:-2])
    r.c.equal(x[-1], y[-2])
    r.c.equal(x[-2], y[-1])


def cat_rule(r: _Rules, node):
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    y = r.V(node)
    d = _norm_dim(dim, len(y))
    off = 0
    for t in tensors:
        x = r.V(t)
        n = r.c.size(x[d])
        r.c.equal(x[d], y[d], np.arange(n), np.arange(off, off + n))
        off += n
        for k in range(len(y)):
            if k != d:
                r.c.equal(x[k], y[k])


def stack_rule(r: _Rules, node):
    tensors = _arg(node, 0, "tensors")
    y = r.V(node)
    d = _norm_dim(_arg(node, 1, "dim", 0), len(y))
    r.c.freeze(y[d], f"a stack dim created at node '{node.name}'")
    for t in tensors:
        x = r.V(t)
        r.eq_all(x, y[:d] + y[d + 1 :])


def split_rule(r: _Rules, node):
    """split/chunk/tensor_split: outputs are consecutive slices of one dim."""
    x = r.V(node.args[0])
    paths = _tensor_paths(_spec(node))
    dim = _arg(node, 2, "dim", 0)
    d = _norm_dim(dim, len(x))
    off = 0
    outs = [r.V(node, p) for p in paths]
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
        r.c.node_notes[node.name]["split"] = d
        # split sizes read from a shape (qkv.split(C, -1)) are rewritten to the new sections
        return _flatten_nodes((node.args[1:2], {k: v for k, v in node.kwargs.items() if k != "dim"}))
    else:
        r.c.freeze(x[d], f"tensor_split at node '{node.name}'")


def unbind_rule(r: _Rules, node):
    x = r.V(node.args[0])
    d = _norm_dim(_arg(node, 1, "dim", 0), len(x))
    r.c.freeze(x[d], f"unbind selects positions by index at node '{node.name}'")
    for p in _tensor_paths(_spec(node)):
        r.eq_all(x[:d] + x[d + 1 :], r.V(node, p))


def getitem_rule(r: _Rules, node):
    src, idx = node.args
    if not _is_tensor(src):
        # selecting from a multi-output node (tuple of tensors)
        spec = _spec(src)
        if isinstance(idx, int) and isinstance(spec, tuple) and -len(spec) <= idx < len(spec):
            y = r.V(node)
            x = r.V(src, (idx % len(spec),))  # spx[-1] is the same slot as spx[2]
            if y is not None and x is not None:
                r.eq_all(x, y)
                return
        return "unknown"
    x, y = r.V(src), r.V(node)
    parts = idx if isinstance(idx, tuple) else (idx,)
    gathers = [k for k, i in enumerate(parts) if _is_tensor(i)]
    if (len(gathers) == 1 and all(i == slice(None) for k, i in enumerate(parts) if k != gathers[0])
            and not _spec(parts[gathers[0]]).dtype.is_floating_point and _spec(parts[gathers[0]]).dtype != torch.bool):
        # entries gathered by one integer index tensor (a relative-position table, ``t[idx]`` or
        # ``t[:, idx]``): the gathered dim stays, the index's dims take its place, the rest pass through
        p = gathers[0]
        ix = r.V(parts[p])
        r.c.freeze(x[p], f"entries selected by an index tensor at node '{node.name}'{_where(node)}")
        r.eq_all(x[:p], y[:p])
        r.eq_all(ix, y[p : p + len(ix)])
        r.eq_all(x[p + 1 :], y[p + len(ix) :])
        return None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, torch.fx.Node) or isinstance(i, (list, torch.Tensor)) for i in idx):
        return "unknown"
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
            r.c.freeze(x[xi], f"integer indexing at node '{node.name}'{_where(node)}")
            xi += 1
        elif isinstance(i, slice) and any(isinstance(v, torch.fx.Node) for v in (i.start, i.stop, i.step)):
            why = f"sliced with computed bounds at node '{node.name}'{_where(node)}"
            r.c.freeze(x[xi], why)
            r.c.freeze(y[yi], why)
            xi += 1
            yi += 1
        elif isinstance(i, slice):
            n = r.c.size(x[xi])
            if range(n)[i] == range(n):
                r.c.equal(x[xi], y[yi])
            else:
                why = f"sliced with constant bounds at node '{node.name}'{_where(node)}"
                r.c.freeze(x[xi], why)
                r.c.freeze(y[yi], why)
            xi += 1
            yi += 1
        else:
            return "unknown"


def reduce_rule(r: _Rules, node):
    x = r.V(node.args[0])
    paths = _tensor_paths(_spec(node))
    dim = _arg(node, 1, "dim")
    keep = _arg(node, 2, "keepdim", False)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        reduced = set(range(len(x)))
    else:
        reduced = {_norm_dim(d, len(x)) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    for p in paths:
        y = r.V(node, p)
        yi = 0
        for k in range(len(x)):
            if k in reduced:
                if keep:
                    r.c.freeze(y[yi], "a size-1 dim kept by a reduction")
                    yi += 1
            else:
                r.c.equal(x[k], y[yi])
                yi += 1


def matmul_rule(r: _Rules, node):
    a_node, b_node = node.args[0], node.args[1]
    a, b, y = r.V(a_node), r.V(b_node), r.V(node)
    a_vec, b_vec = len(a) == 1, len(b) == 1
    if a_vec and b_vec:
        r.c.equal(a[0], b[0])
        return
    if a_vec:
        r.c.equal(a[0], b[-2])
        r.c.equal(y[-1], b[-1])
        _batch(r, y[:-1], [b[:-2]])
        return
    if b_vec:
        r.c.equal(a[-1], b[0])
        r.c.equal(y[-1], a[-2])
        _batch(r, y[:-1], [a[:-2]])
        return
    r.c.equal(a[-1], b[-2])
    r.c.equal(y[-2], a[-2])
    r.c.equal(y[-1], b[-1])
    _batch(r, y[:-2], [a[:-2], b[:-2]])


def _batch(r, out, ins):
    for x in ins:
        off = len(out) - len(x)
        for d, s in enumerate(x):
            if r.c.size(s) == r.c.size(out[off + d]):
                r.c.equal(s, out[off + d])


def einsum_rule(r: _Rules, node):
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in eq:
        letters = sorted(set(c for c in lhs if c.isalpha()), key=lambda c: c)
        rhs = "".join(c for c in letters if lhs.count(c) == 1)
    if "..." in eq:
        n_ell = max(len(r.V(o)) - len(t.replace("...", "")) for o, t in zip(ops, terms))
        fill = "".join(chr(0x100 + k) for k in range(n_ell))
        terms = [t.replace("...", fill[n_ell - (len(r.V(o)) - len(t.replace("...", ""))) :]) for o, t in zip(ops, terms)]
        rhs = rhs.replace("...", fill)
    by_letter: dict[str, list[int]] = {}
    for o, t in zip(ops, terms):
        for ch, s in zip(t, r.V(o)):
            by_letter.setdefault(ch, []).append(s)
    for ch, s in zip(rhs, r.V(node)):
        by_letter.setdefault(ch, []).append(s)
    for slots in by_letter.values():
        big = max(r.c.size(s) for s in slots)
        slots = [s for s in slots if r.c.size(s) == big]
        for s in slots[1:]:
            r.c.equal(slots[0], s)


def sdpa_rule(r: _Rules, node):
    q, k, v = (r.V(_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    y = r.V(node)
    r.c.equal(q[-1], k[-1])
    r.c.equal(k[-2], v[-2])
    r.c.equal(y[-2], q[-2])
    r.c.equal(y[-1], v[-1])
    _batch(r, y[:-2], [q[:-2], k[:-2], v[:-2]])
    mask = _arg(node, 3, "attn_mask")
    if _is_tensor(mask):
        ms = r.V(mask)
        tail = [q[-2], k[-2]]
        for s, t in zip(ms[-2:], tail[-len(ms[-2:]) :]):
            if r.c.size(s) == r.c.size(t):
                r.c.equal(s, t)
        _batch(r, y[:-2], [ms[:-2]])
    if _arg(node, 6, "scale") is None:
        r.c.node_notes[node.name]["sdpa_scale"] = 1.0 / math.sqrt(r.c.size(q[-1]))


def layer_norm_fn_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x, y)
    shape = _arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    for i, name in ((2, "weight"), (3, "bias")):
        p = _arg(node, i, name)
        if _is_tensor(p):
            ps = r.V(p)
            for d in range(k):
                r.c.equal(x[len(x) - k + d], ps[d])
    r.c.node_notes[node.name]["layer_norm_shape"] = k


def batch_norm_fn_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x, y)
    for i, name in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias")):
        p = _arg(node, i, name)
        if _is_tensor(p):
            r.c.equal(x[1], r.V(p)[0])


def linear_fn_rule(r: _Rules, node):
    x, w, y = r.V(node.args[0]), r.V(_arg(node, 1, "weight")), r.V(node)
    r.c.equal(y[-1], w[0])
    r.c.equal(x[-1], w[1])
    b = _arg(node, 2, "bias")
    if _is_tensor(b):
        r.c.equal(y[-1], r.V(b)[0])
    r.eq_all(x[:-1], y[:-1])


def conv_fn_rule(r: _Rules, node):
    """F.conv1d/2d/3d with any weight tensor (a module's own Parameters, a standardised weight).

    The kernel's spatial dims never shrink.  Grouped and depthwise convolutions
    lose whole groups, as in ``conv_rule``; the rewrite updates the literal
    ``groups`` argument.
    """
    groups = _arg(node, 6, "groups", 1)
    if not isinstance(groups, int):
        return "unknown"
    x, w, y = r.V(node.args[0]), r.V(_arg(node, 1, "weight")), r.V(node)
    k = len(w) - 2
    cx, cy = len(x) - k - 1, len(y) - k - 1
    r.c.equal(y[cy], w[0])
    b = _arg(node, 2, "bias")
    if _is_tensor(b):
        r.c.equal(y[cy], r.V(b)[0])
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
        r.c.node_notes[node.name]["conv_groups"] = f"{node.name}.groups"
    if cx == 1:
        r.c.equal(x[0], y[0])
    for d in range(k):
        r.c.freeze(y[cy + 1 + d], "spatial size is set by the input")


def roll_rule(r: _Rules, node):
    """torch.roll: positions move along the rolled dims (frozen); every other dim passes through."""
    x, y = r.V(node.args[0]), r.V(node)
    dims = _arg(node, 2, "dims")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        rolled = set(range(len(x)))  # flattened roll
    else:
        rolled = {_norm_dim(d, len(x)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    for k in range(len(x)):
        if k in rolled:
            r.c.freeze(x[k], f"rolled at node '{node.name}'")
            r.c.freeze(y[k], f"rolled at node '{node.name}'")
        else:
            r.c.equal(x[k], y[k])


def creation_rule(r: _Rules, node):
    """torch.zeros/ones/full/arange/...: a new tensor; its dims are fixed by the arguments (frozen)."""
    for path in _tensor_paths(_spec(node)):
        r.freeze_value(node, f"a tensor created by {getattr(node.target, '__name__', node.target)} "
                             f"at node '{node.name}'", path)
    for a in node.all_input_nodes:
        if _is_tensor(a):
            r.freeze_value(a, f"an argument of {getattr(node.target, '__name__', node.target)} at node '{node.name}'")


def cumsum_rule(r: _Rules, node):
    """cumsum: positions along the summed dim mix (frozen); every other dim passes through."""
    x, y = r.V(node.args[0]), r.V(node)
    d = _norm_dim(_arg(node, 1, "dim"), len(x))
    for k in range(len(x)):
        if k == d:
            r.c.freeze(x[k], f"cumulative sum along this dim at node '{node.name}'")
            r.c.freeze(y[k], f"cumulative sum along this dim at node '{node.name}'")
        else:
            r.c.equal(x[k], y[k])


def reshape_as_rule(r: _Rules, node):
    """``x.reshape_as(other)`` / ``x.view_as(other)``: a reshape whose output has other's dims."""
    _reshape(r, node.args[0], node)
    other = _arg(node, 1, "other")
    if _is_tensor(other):
        r.eq_all(r.V(other), r.V(node))


def pool_fn_rule(r: _Rules, node):
    name = getattr(node.target, "__name__", str(node.target))
    m = re.search(r"(\d)d", name)
    _pool(r, node, int(m.group(1)) if m else _ndim(node) - 2)


def interpolate_rule(r: _Rules, node):
    _pool(r, node, _ndim(node) - 2)


def pad_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
    pad = _arg(node, 1, "pad")
    padded = {len(x) - 1 - i // 2 for i, p in enumerate(pad) if p != 0}
    for k in range(len(x)):
        if k in padded:
            r.c.freeze(x[k], f"padded at node '{node.name}'")
            r.c.freeze(y[k], f"padded at node '{node.name}'")
        else:
            r.c.equal(x[k], y[k])


def expand_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
    off = len(y) - len(x)
    for d in range(off):
        r.c.freeze(y[d], f"a dim created by expand at node '{node.name}'")
    for d, s in enumerate(x):
        if r.c.size(s) == r.c.size(y[off + d]):
            r.c.equal(s, y[off + d])
        else:
            r.c.freeze(y[off + d], f"a dim created by expand at node '{node.name}'")
    if node.target == "expand":
        r.c.node_notes[node.name]["reshape"] = True
        return _flatten_nodes((node.args[1:], node.kwargs))
    return None


def repeat_rule(r: _Rules, node):
    x, y = r.V(node.args[0]), r.V(node)
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


def like_rule(r: _Rules, node):
    r.eq_all(r.V(node.args[0]), r.V(node))


# --- dispatch table --------------------------------------------------------

_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.pow, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.clip, torch.sin, torch.cos, torch.erf,
    torch.square, torch.reciprocal, torch.masked_fill, torch.lerp, torch.addcmul,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.softmax, F.log_softmax,
    F.normalize, torch.softmax, torch.log_softmax, F.softsign,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
]
_ELEMENTWISE_METHODS = [
    "add", "sub", "mul", "div", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "relu",
    "clamp", "clip", "maximum", "minimum", "masked_fill", "type_as", "contiguous", "clone", "detach", "float",
    "half", "double", "bfloat16", "to", "type", "softmax", "log_softmax", "add_", "mul_", "sub_", "div_",
    "relu_", "clamp_", "sigmoid_", "tanh_", "square", "reciprocal", "erf", "where", "lerp", "addcmul",
    "requires_grad_", "cpu", "cuda", "exp_", "neg_", "sin", "cos", "erf_", "log1p", "expm1", "sign", "floor",
    "round", "logical_not", "bool", "int", "long", "ge", "gt", "le", "lt", "eq", "ne",
]

FUNCTION_RULES: dict[Any, Callable] = {}
for _f in _ELEMENTWISE_FUNCS:
    FUNCTION_RULES[_f] = elementwise_rule
for _m in _ELEMENTWISE_METHODS:
    FUNCTION_RULES[("method", _m)] = elementwise_rule
for _k in (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten,
           ("method", "flatten"), ("method", "view"), ("method", "reshape"), ("method", "squeeze"),
           ("method", "unsqueeze"), ("method", "unflatten")):
    FUNCTION_RULES[_k] = reshape_rule
for _k in (torch.permute, torch.transpose, torch.t, torch.movedim, torch.swapaxes, torch.swapdims,
           ("method", "permute"), ("method", "transpose"), ("method", "t"), ("method", "movedim"),
           ("method", "swapaxes"), ("method", "swapdims")):
    FUNCTION_RULES[_k] = permute_rule
for _k in (torch.cat, torch.concat, torch.concatenate):
    FUNCTION_RULES[_k] = cat_rule
FUNCTION_RULES[torch.stack] = stack_rule
for _k in (torch.split, torch.chunk, torch.tensor_split, ("method", "split"), ("method", "chunk"),
           ("method", "tensor_split")):
    FUNCTION_RULES[_k] = split_rule
for _k in (torch.unbind, ("method", "unbind")):
    FUNCTION_RULES[_k] = unbind_rule
FUNCTION_RULES[operator.getitem] = getitem_rule
for _name in ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod", "max", "min", "argmax",
              "argmin", "all", "any"):
    FUNCTION_RULES[("method", _name)] = reduce_rule
    if hasattr(torch, _name):
        FUNCTION_RULES[getattr(torch, _name)] = reduce_rule
for _k in (operator.matmul, torch.matmul, torch.bmm, torch.mm, ("method", "matmul"), ("method", "bmm"),
           ("method", "mm")):
    FUNCTION_RULES[_k] = matmul_rule
FUNCTION_RULES[torch.einsum] = einsum_rule
FUNCTION_RULES[F.scaled_dot_product_attention] = sdpa_rule
FUNCTION_RULES[F.layer_norm] = layer_norm_fn_rule
FUNCTION_RULES[F.batch_norm] = batch_norm_fn_rule
FUNCTION_RULES[F.linear] = linear_fn_rule
for _k in (F.conv1d, F.conv2d, F.conv3d):
    FUNCTION_RULES[_k] = conv_fn_rule
for _k in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
           F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
           F.max_pool1d, F.max_pool2d, F.max_pool3d):
    FUNCTION_RULES[_k] = pool_fn_rule
FUNCTION_RULES[F.interpolate] = interpolate_rule
FUNCTION_RULES[F.pad] = pad_rule
for _k in (torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.linspace, torch.eye, torch.rand,
           torch.randn, torch.randint, torch.tensor, torch.as_tensor, torch.meshgrid, ("method", "new_zeros"),
           ("method", "new_ones"), ("method", "new_full"), ("method", "new_empty"), ("method", "new_tensor")):
    FUNCTION_RULES[_k] = creation_rule
FUNCTION_RULES[torch.roll] = roll_rule
FUNCTION_RULES[torch.cumsum] = cumsum_rule
FUNCTION_RULES[("method", "cumsum")] = cumsum_rule
FUNCTION_RULES[("method", "roll")] = roll_rule
FUNCTION_RULES[("method", "reshape_as")] = reshape_as_rule
FUNCTION_RULES[("method", "view_as")] = reshape_as_rule
FUNCTION_RULES[("method", "expand")] = expand_rule
FUNCTION_RULES[("method", "expand_as")] = expand_rule
FUNCTION_RULES[("method", "repeat")] = repeat_rule


def getattr_rule(r: _Rules, node):
    attr = node.args[1]
    if attr == "mT":
        return mT_rule(r, node)
    if attr == "T":
        x, y = r.V(node.args[0]), r.V(node)
        for k, s in enumerate(y):
            r.c.equal(s, x[len(x) - 1 - k])
        return None
    return "unknown"


FUNCTION_RULES[builtins.getattr] = getattr_rule



# --- torchvision Swin: functions torchvision marks with torch.fx.wrap --------

_WINDOW_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                          "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale",
                          "training")


def window_attention_rule(r: _Rules, node):
    """Swin's shifted_window_attention: heads, q/k and v head widths, residual width.

    ``qkv_weight`` rows are q = H x Dqk, k = H x Dqk, v = H x Dv; ``proj_weight``
    columns are v's; the relative-position bias (1, H, N, N) and V2's
    ``logit_scale`` (H, 1, 1) carry one entry per head.  torchvision's function
    derives the head width from the input width, so the rewrite calls
    ``passes.attention.slim_shifted_window_attention`` with explicit widths and
    the original scale.
    """
    a = {n: _arg(node, i, n) for i, n in enumerate(_WINDOW_ATTENTION_ARGS)}
    H = a["num_heads"]
    if not isinstance(H, int) or not _is_tensor(a["input"]) or not _is_tensor(a["qkv_weight"]):
        return "unknown"
    x, y, wq, wp = r.V(a["input"]), r.V(node), r.V(a["qkv_weight"]), r.V(a["proj_weight"])
    if node.target is slim_shifted_window_attention:
        Dqk, Dv, scale = node.kwargs["qk_head_dim"], node.kwargs["v_head_dim"], node.kwargs["scale"]
    else:
        Dqk = Dv = r.c.size(x[3]) // H
        scale = Dqk ** -0.5
    if r.c.size(wq[0]) != H * (2 * Dqk + Dv) or r.c.size(wp[1]) != H * Dv:
        return "unknown"
    r.c.equal(x[3], wq[1])
    r.c.equal(y[3], wp[0])
    if _is_tensor(a["proj_bias"]):
        r.c.equal(y[3], r.V(a["proj_bias"])[0])
    for d in range(3):
        r.c.equal(x[d], y[d])
    qb = r.V(a["qkv_bias"]) if _is_tensor(a["qkv_bias"]) else None
    heads = _qkv_heads(r, node.name, H, Dqk, Dv, wq[0], qb[0] if qb is not None else None, wp[1])
    rpb = r.V(a["relative_position_bias"]) if _is_tensor(a["relative_position_bias"]) else None
    if rpb is not None:
        if len(rpb) != 4 or r.c.size(rpb[1]) != H:
            return "unknown"
        r.c.equal(rpb[1], heads)
        for d in (0, 2, 3):
            r.c.freeze(rpb[d], f"window positions of a relative-position bias at node '{node.name}'")
    if _is_tensor(a["logit_scale"]):
        ls = r.V(a["logit_scale"])
        r.c.equal(ls[0], heads)
    r.c.node_notes[node.name]["window_attention"] = {"scale": scale}


def relative_position_bias_rule(r: _Rules, node):
    """torchvision Swin's _get_relative_position_bias: table (T, H) -> (1, H, N, N)."""
    table, index = _arg(node, 0, "relative_position_bias_table"), _arg(node, 1, "relative_position_index")
    t, y = r.V(table), r.V(node)
    r.c.equal(t[1], y[1])
    r.c.freeze(t[0], f"relative-position table rows are selected by an index at node '{node.name}'")
    for d in (0, 2, 3):
        r.c.freeze(y[d], f"window positions of a relative-position bias at node '{node.name}'")
    if _is_tensor(index):
        r.freeze_value(index, "an index tensor")


def patch_merging_pad_rule(r: _Rules, node):
    """torchvision Swin's _patch_merging_pad: (..., H, W, C) -> (..., H/2, W/2, 4C), four strided copies."""
    x, y = r.V(node.args[0]), r.V(node)
    r.eq_all(x[:-3], y[:-3])
    C = r.c.size(x[-1])
    for k in range(4):
        r.c.equal(x[-1], y[-1], np.arange(C), np.arange(k * C, (k + 1) * C))
    for d in (-3, -2):
        r.c.freeze(x[d], "spatial size is set by the input")
        r.c.freeze(y[d], "spatial size is set by the input")


FUNCTION_RULES[slim_shifted_window_attention] = window_attention_rule
try:
    from torchvision.models import swin_transformer as _tv_swin

    FUNCTION_RULES[_tv_swin.shifted_window_attention] = window_attention_rule
    FUNCTION_RULES[_tv_swin._get_relative_position_bias] = relative_position_bias_rule
    FUNCTION_RULES[_tv_swin._patch_merging_pad] = patch_merging_pad_rule
except ImportError:  # torchvision is optional for the coupling analysis
    pass

def apply_rules(c, ignore=()) -> None:
    """Run every rule; see ``passes/dependency.coupled_groups``."""
    _Rules(c, ignore).run()
