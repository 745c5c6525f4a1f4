"""Activation checkpointing for the forward-over-reverse curvature pass.

``torch.utils.checkpoint`` cannot be used here: the scoring forward runs on dual
numbers (``torch.autograd.forward_ad``), and its recomputation inside the
backward does not reproduce the dual forward (it fails its determinism check,
and with the check off it would drop the tangents).  This pass does the
recomputation explicitly, on the torch.fx graph:

1. The graph's compute nodes are cut into ``segments`` contiguous pieces.  A
   liveness analysis gives, for every cut, the values that cross it (defined
   before, used after): for a chain or a residual network that is one or two
   tensors.
2. The forward runs once without recording (``torch.no_grad``, the dual numbers
   still propagate), keeps only the crossing values, and frees every other
   value after its last use.
3. The backward walks the segments in reverse.  Each one is re-run with
   recording from its saved crossing values, which become leaves carrying their
   tangents (``make_dual(leaf, tangent)``); ``autograd.grad`` with the dual
   cotangents of its outputs returns dual cotangents for its inputs (passed on
   to the earlier segments) and for the parameters (summed).

Correctness rests on the chain rule for vector-Jacobian products evaluated at
dual points: the vjp of the whole network at θ + εδ is the composition of the
segments' vjps, each at its own dual input.  Only one segment's saved tensors
are alive at a time, so peak memory falls from "all activations, twice (primal
and tangent)" to "the crossing values plus one segment".  The price is one more
forward pass.  Crossing values are cloned when saved, because the graph may
update a value in place after the cut (``out += identity``, ``relu_``).
"""
from __future__ import annotations

import contextlib
import math
import operator
from typing import Any, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.fx
import torch.nn as nn
from .stateless import reparametrized
from torch.utils import _pytree as pytree
from .errors import UsageError

__all__ = ["SegmentedGraph", "RecomputeError"]


class RecomputeError(UsageError):
    """Activation checkpointing cannot be applied to this model or request.

    (Not ``oba_fx.CheckpointError``, which is about training checkpoint files.)
    """


def _as_graph_module(model: nn.Module) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    from .trace import LeafTracer as _LeafTracer, default_leaf_types

    try:
        # shares the model's submodules and parameters (no copy); the model is in eval mode here
        graph = _LeafTracer(default_leaf_types(), frozenset()).trace(model)
    except Exception as err:  # noqa: BLE001
        raise RecomputeError(
            f"checkpoint= needs a torch.fx-traceable model, and {type(model).__name__} failed to trace "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160]}). Score the traced module "
            "(oba_fx.trace(model, x).gm), or use micro_batch= instead of checkpoint=") from err
    return torch.fx.GraphModule(model, graph, type(model).__name__)


class SegmentedGraph:
    """A GraphModule cut into segments for recomputation (see the module docstring)."""

    def __init__(self, model: nn.Module, param_names: Sequence[str], segments: int | bool):
        self.gm = _as_graph_module(model)
        nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        outs = [n for n in nodes if n.op == "output"]
        self.output = outs[0]
        compute = [n for n in nodes if n.op not in ("placeholder", "output")]
        if not compute:
            raise RecomputeError("checkpoint=: the model's graph has no operations to segment")
        if segments is True:
            k = max(2, round(math.sqrt(len(compute))))
        elif isinstance(segments, int) and not isinstance(segments, bool) and segments >= 1:
            k = segments
        else:
            raise RecomputeError(f"checkpoint must be True or a positive number of segments, got {segments!r}")
        self.index = {n: i for i, n in enumerate(nodes)}
        self.last_use = {n: max((self.index[u] for u in n.users), default=-1) for n in nodes}
        # which nodes depend on the scored parameters (they need gradients)
        names = set(param_names)
        mods_with = set()
        for qual, mod in self.gm.named_modules():
            if any((f"{qual}.{p}" if qual else p) in names for p, _ in mod.named_parameters(recurse=True)):
                mods_with.add(qual)
        self.param_dependent = set()
        for n in nodes:
            if n.op == "get_attr" and (n.target in names or n.target in mods_with):
                self.param_dependent.add(n)
            elif n.op == "call_module" and n.target in mods_with:
                self.param_dependent.add(n)
            elif any(a in self.param_dependent for a in n.all_input_nodes):
                self.param_dependent.add(n)

        def crossing(pos):  # values defined before compute[pos] and used at or after it
            start = self.index[compute[pos]]
            return [n for n in nodes if self.index[n] < start and self.last_use[n] >= start]

        def container(n):  # a tuple/list result, unpacked by getitem (e.g. split, chunk, a module returning a tuple)
            return bool(n.users) and all(u.op == "call_function" and u.target is operator.getitem for u in n.users)

        # a cut may not separate a differentiable container from its getitems: its gradient must flow per element
        valid = [pos for pos in range(1, len(compute))
                 if not any(container(n) and n in self.param_dependent for n in crossing(pos))]
        k = min(k, len(valid) + 1)
        cuts = []
        for i in range(1, k):
            ideal = i * len(compute) / k
            best = min((p for p in valid if not cuts or p > cuts[-1]), key=lambda p: abs(p - ideal), default=None)
            if best is not None:
                cuts.append(best)
        bounds = [0] + cuts + [len(compute)]
        self.chunks = [compute[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]
        # the first chunk starts from the graph inputs that are used
        self.crossing = [[n for n in self.placeholders if self.last_use[n] >= 0]] + [crossing(pos) for pos in cuts]
        # the output may be any structure of values (a dict for segmentation models, a tuple, ...): its leaves,
        # in the order torch.utils._pytree flattens the structure the model returns
        self.result_leaves, self.result_spec = pytree.tree_flatten(_plain(self.output.args[0]))
        self.results = {n for n in self.result_leaves if isinstance(n, torch.fx.Node)}
        if not self.results:
            raise RecomputeError("checkpoint=: the model's output does not depend on its inputs")

    # -- execution -------------------------------------------------------------------------------------------
    def _run(self, interp: torch.fx.Interpreter, env: dict, chunk, free: bool):
        interp.env = env
        for n in chunk:
            env[n] = interp.run_node(n)
            if free:
                for a in n.all_input_nodes:
                    if self.last_use[a] <= self.index[n] and a not in self.results:
                        env.pop(a, None)

    def forward(self, params: dict[str, torch.Tensor], inputs: tuple) -> tuple[Any, list[dict]]:
        """Run without recording; return the output (the model's structure) and the crossing values of every cut."""
        if len(inputs) != len(self.placeholders):
            raise RecomputeError(f"checkpoint=: the graph takes {len(self.placeholders)} inputs, got {len(inputs)}")
        env = dict(zip(self.placeholders, inputs))
        saved = []
        with torch.no_grad(), _no_mha_fastpath(), reparametrized(self.gm, params):
            interp = torch.fx.Interpreter(self.gm)
            for j, ch in enumerate(self.chunks):
                saved.append({n: _clone(env[n]) for n in self.crossing[j]})
                self._run(interp, env, ch, free=True)
        for n in self.results:
            if not isinstance(env[n], torch.Tensor):
                raise RecomputeError(
                    f"checkpoint=: the output leaf {n.name} is a {type(env[n]).__name__}, not a tensor; unpack it in "
                    "the model's forward, or score without checkpoint= (micro_batch= also saves memory)")
        out = [env[n] if isinstance(n, torch.fx.Node) else n for n in self.result_leaves]
        return pytree.tree_unflatten(out, self.result_spec), saved

    def backward(self, saved: list[dict], leaves: dict[str, torch.Tensor], directions: dict[str, torch.Tensor],
                 cotangents: list[list[torch.Tensor | None]]) -> list[list[torch.Tensor | None]]:
        """Gradients w.r.t. ``leaves`` of the output contracted with each (dual) cotangent.

        ``cotangents[q]`` is one list per quantity, aligned with the flattened
        output leaves (None where a leaf gets no cotangent); a value that
        appears at several leaves receives their sum.  Must be called inside
        the ``fwAD.dual_level`` the forward ran in.
        """
        names = list(leaves)
        acc: list[list[Any]] = [[None] * len(names) for _ in cotangents]
        cot = []
        for per_leaf in cotangents:
            seed: dict = {}
            for n, c in zip(self.result_leaves, per_leaf):
                if isinstance(n, torch.fx.Node) and c is not None:
                    seed[n] = c if n not in seed else seed[n] + c
            cot.append(seed)
        for j in reversed(range(len(self.chunks))):
            ch = self.chunks[j]
            outs = [n for n in ch if n in cot[0] and n in self.param_dependent]
            if not outs:
                continue
            env, in_nodes, in_leaves = {}, [], []
            for n, v in saved[j].items():
                if n in self.param_dependent and isinstance(v, torch.Tensor) and v.is_floating_point():
                    p, t = fwAD.unpack_dual(v)
                    leaf = p.detach().requires_grad_(True)
                    x = fwAD.make_dual(leaf, t) if t is not None else leaf
                    env[n] = x.clone()  # the segment may update it in place
                    in_nodes.append(n)
                    in_leaves.append(leaf)
                else:
                    env[n] = v
            duals = dict(leaves) if directions is None else \
                {nm: fwAD.make_dual(leaves[nm], directions[nm]) for nm in names}
            with torch.enable_grad(), reparametrized(self.gm, duals):
                self._run(torch.fx.Interpreter(self.gm), env, ch, free=False)
            values = [env[n] for n in outs]
            keep = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.requires_grad]
            if not keep:
                continue
            for p, c in enumerate(cot):
                grads = torch.autograd.grad([values[i] for i in keep], in_leaves + [leaves[nm] for nm in names],
                                            [c[outs[i]] for i in keep], retain_graph=p < len(cot) - 1,
                                            allow_unused=True)
                for n, gr in zip(in_nodes, grads[:len(in_nodes)]):
                    if gr is not None:
                        c[n] = gr if n not in c else c[n] + gr
                for i, gr in enumerate(grads[len(in_nodes):]):
                    if gr is not None:
                        acc[p][i] = gr if acc[p][i] is None else acc[p][i] + gr
                for n in ch:
                    c.pop(n, None)
            del env, values
        return acc


@contextlib.contextmanager
def _no_mha_fastpath():
    """nn.MultiheadAttention/TransformerEncoderLayer take a fused kernel without forward AD under no_grad."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _plain(arg):
    """torch.fx's immutable_dict/immutable_list output arguments as the dict/list the graph module returns."""
    if isinstance(arg, dict):
        return {k: _plain(v) for k, v in arg.items()}
    if isinstance(arg, list):
        return [_plain(v) for v in arg]
    if isinstance(arg, tuple) and not hasattr(arg, "_fields"):
        return tuple(_plain(v) for v in arg)
    return arg


def _clone(v):
    return v.clone() if isinstance(v, torch.Tensor) else v
