"""Pass: which blocks of the network-curvature Hessian are structurally zero.

The Hessian of the loss ``L(θ) = mean ℓ(f(x; θ), y)`` splits as ``H = G + F``:
``G = Jᵀ ∇²ℓ J`` (Gauss-Newton) and ``F = Σ_k (∂ℓ/∂f_k) ∇²f_k`` (network
curvature).  For two layers ``l`` and ``m`` the block ``F_lm`` is a sum over
graph nodes of the node's *local* second derivative, contracted with the
first-order sensitivities of its inputs to ``θ_l`` and ``θ_m`` and pushed
linearly to the output.  It is therefore structurally zero unless some node
that reaches the output has a non-zero local second derivative between an
input depending on ``l`` and an input depending on ``m``:

* **series**: an op linear in its own parameters ``W_m`` applied to an input
  depending on ``θ_l`` (Linear, Conv, BatchNorm in eval mode, the affine part
  of LayerNorm, PReLU, ``F.linear`` / ``x * param`` with a parameter operand);
* **parallel**: a product of two tensors depending on parameters (matmul,
  bmm, einsum, ``a * b``, attention);
* **smooth**: a nonlinearity with a non-zero second derivative (GELU, softmax,
  normalisation statistics, exp, division by a tensor, hardswish, ...): every
  pair of layers its input depends on interacts, the diagonal included.

Linear and piecewise-linear ops (add, cat, views, pooling, ReLU, dropout in
eval mode, ...) create no interaction.  Ops without a rule are treated as
smooth over all their inputs' layers and reported: never predict zero where
the block could be non-zero.

The pass propagates, in topological order over the fx graph, the set of layers
each value depends on (as a bit mask), records the interactions at each node,
and keeps those recorded at nodes with a differentiable path to the output.

Layout: this module owns the walk and its result (:class:`HessianBlocks`,
:func:`hessian_blocks`, :func:`check_blocks`); what each op contributes is a
rule in :mod:`passes.block_rules` (``BLOCK_RULES``, extensible per op); the
text / JSON / networkx / GraphML / DOT / PNG views are in
:mod:`passes.block_views`, to which the ``HessianBlocks`` methods delegate.
This module imports neither matplotlib nor ``oba_fx``.

Known limits (all conservative or irrelevant for standard models): in-place
ops are assumed to mutate their first argument only, not views aliasing it;
a tuple-valued node's elements all depend on every layer the tuple depends on.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
import torch.fx
import torch.nn as nn

from . import block_views
from .block_rules import Flow, rule_for
from .block_views import CATEGORIES, category_of
from .fxutil import get_qualified, op_name
from .meta import SPEC
from .trace import TensorSpec, TracedGraph

__all__ = ["HessianBlocks", "analyze", "hessian_blocks", "check_blocks", "CATEGORIES"]


# ---------------------------------------------------------------------------
# the result


class HessianBlocks:
    """Structural zero pattern of the layer blocks of the loss Hessian.

    Build it with :func:`hessian_blocks` (or :func:`analyze`).

    Attributes:
        layers: layer names in graph order: qualified names of parameterised
            modules called in the graph (``"layer1.0.conv1"``) and of
            parameters read directly (``"cls_token"``).
        warnings: one message per op the pass had no rule for (treated
            conservatively as a smooth nonlinearity).
    """

    def __init__(
        self,
        layers: Sequence[str],
        params: Mapping[str, Sequence[str]],
        reasons: Mapping[str, np.ndarray],
        reaches_output: np.ndarray,
        records: Sequence[tuple[str, str, np.ndarray, np.ndarray]] = (),
        warnings: Sequence[str] = (),
    ):
        """Wraps the analysis result.

        Args:
            layers: layer names in graph order.
            params: layer name -> qualified parameter names it owns.
            reasons: reason string -> symmetric ``(n, n)`` boolean matrix of
                the layer pairs that interact for that reason.
            reaches_output: ``(n,)`` boolean, the layers the output depends on.
            records: ``(fx node, reason, A, B)``: the node where layers ``A``
                (index array) interact with layers ``B``.
            warnings: messages about ops without a rule.
        """
        self.layers = list(layers)
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._params = {k: list(v) for k, v in params.items()}
        self._reasons = {k: np.asarray(v, dtype=bool) for k, v in reasons.items()}
        n = len(self.layers)
        self._any = np.zeros((n, n), dtype=bool)
        for mat in self._reasons.values():
            self._any |= mat
        self._reaches = np.asarray(reaches_output, dtype=bool)
        self._records = list(records)
        self.warnings = list(warnings)

    # -- queries -------------------------------------------------------------
    def _idx(self, layer: str) -> int:
        try:
            return self._index[layer]
        except KeyError:
            raise KeyError(f"'{layer}' is not a layer of this graph; layers are {self.layers}") from None

    def params(self, layer: str) -> list[str]:
        """Qualified names of the parameters of ``layer``."""
        self._idx(layer)
        return list(self._params.get(layer, ()))

    def zero(self, l: str, m: str) -> bool:
        """True when the network-curvature block ``F_lm`` is structurally zero."""
        return not bool(self._any[self._idx(l), self._idx(m)])

    def reasons(self, l: str, m: str) -> list[str]:
        """Sorted reasons why ``F_lm`` may be non-zero (empty when it is zero)."""
        i, j = self._idx(l), self._idx(m)
        return sorted(r for r, mat in self._reasons.items() if mat[i, j])

    def reason(self, l: str, m: str) -> str:
        """Comma-joined sorted reasons, e.g. ``"series, smooth"``; ``""`` when ``F_lm`` is zero."""
        return ", ".join(self.reasons(l, m))

    def category(self, l: str, m: str) -> str:
        """One of :data:`CATEGORIES` for the heat map."""
        return category_of(self.reasons(l, m))

    def gauss_newton_nonzero(self, l: str, m: str) -> bool:
        """True when the Gauss-Newton block ``G_lm`` may be non-zero (both layers reach the loss)."""
        return bool(self._reaches[self._idx(l)] and self._reaches[self._idx(m)])

    def reaches_output(self, layer: str) -> bool:
        """True when the model output depends on ``layer``."""
        return bool(self._reaches[self._idx(layer)])

    def where(self, l: str, m: str) -> list[tuple[str, str]]:
        """The fx nodes where ``l`` and ``m`` interact, as ``(node name, reason)``."""
        i, j = self._idx(l), self._idx(m)
        out = []
        for node, reason, a, b in self._records:
            if (i in a and j in b) or (j in a and i in b):
                if (node, reason) not in out:
                    out.append((node, reason))
        return out

    def pairs(self) -> Iterator[tuple[str, str, str]]:
        """Yields ``(l, m, reason)`` for every non-zero ``F`` block with ``l <= m`` in layer order."""
        ii, jj = np.nonzero(np.triu(self._any))
        for i, j in zip(ii.tolist(), jj.tolist()):
            yield self.layers[i], self.layers[j], self.reason(self.layers[i], self.layers[j])

    def counts(self) -> dict[str, int]:
        """Numbers of unordered layer pairs (diagonal included) per category, plus totals.

        Keys: every name in :data:`CATEGORIES`, ``layers``, ``pairs`` (all
        unordered pairs), ``nonzero`` (non-zero ``F`` blocks),
        ``diagonal_nonzero`` and ``gauss_newton_nonzero``.
        """
        n = len(self.layers)
        out = {c: 0 for c in CATEGORIES}
        for _, _, reason in self.pairs():
            out[category_of(reason.split(", "))] += 1
        total = n * (n + 1) // 2
        out["zero"] = total - sum(out[c] for c in CATEGORIES[1:])
        r = int(self._reaches.sum())
        out.update(
            layers=n,
            pairs=total,
            nonzero=total - out["zero"],
            diagonal_nonzero=int(np.diag(self._any).sum()),
            gauss_newton_nonzero=r * (r + 1) // 2,
        )
        return out

    def __repr__(self) -> str:
        c = self.counts()
        return f"HessianBlocks({c['layers']} layers: {c['nonzero']} non-zero F blocks of {c['pairs']})"

    # -- views (passes.block_views) ---------------------------------------------
    def to_text(self, max_rows: int | None = None) -> str:
        """A summary of the counts followed by a table of the non-zero ``F`` blocks.

        Args:
            max_rows: at most this many table rows (all when None).
        """
        return block_views.text(self, max_rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: layers, their parameters, counts, non-zero blocks, warnings."""
        return block_views.as_dict(self)

    def to_networkx(self) -> nx.Graph:
        """Undirected graph: nodes are layers, edges (self-loops included) the non-zero ``F`` blocks.

        Node attributes: ``index``, ``params`` (comma-joined), ``reaches_output``.
        Edge attributes: ``reason``, ``category``.
        """
        return block_views.to_networkx(self)

    def write_graphml(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_networkx` as GraphML (atomically)."""
        block_views.write_graphml(self, path)

    def to_dot(self) -> str:
        """Graphviz DOT text of :meth:`to_networkx` (undirected, edges labelled by reason)."""
        return block_views.dot(self)

    def write_dot(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dot` to ``path`` (atomically)."""
        block_views.write_dot(self, path)

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Writes a PNG heat map of the block structure of ``F`` (atomically).

        Layers run along both axes in graph order; each cell is coloured by
        category (zero, series, parallel, smooth, several reasons, unknown op).

        Args:
            path: the PNG file to write.
            title: figure title (a summary of the counts by default).
        """
        block_views.plot(self, path, title)


# ---------------------------------------------------------------------------
# the pass


def _spec_differentiable(spec: Any) -> bool:
    """Whether a recorded value can carry a derivative (unknown values: yes)."""
    if spec is None:
        return True
    if isinstance(spec, TensorSpec):
        return spec.dtype.is_floating_point or spec.dtype.is_complex
    if isinstance(spec, tuple):
        return any(isinstance(s, (TensorSpec, tuple)) and _spec_differentiable(s) for s in spec)
    return False


_INPLACE_FUNCTIONS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                      operator.imatmul)


@dataclass
class _Record:
    node: str
    reason: str
    a: int
    b: int


class BlockWalk:
    """Forward propagation of layer masks and interaction records over one traced graph.

    The rules of :mod:`passes.block_rules` receive it as ``ctx``: its public methods are their API.
    """

    def __init__(self, traced: TracedGraph):
        self.gm = traced.gm
        self.nodes = list(self.gm.graph.nodes)
        self.modules = dict(self.gm.named_modules())
        self.anc: dict[str, int] = {}  # node -> bit mask of layers its value depends on
        self.data: dict[str, bool] = {}  # node -> depends on a model input
        self.const: set[str] = set()  # nodes whose value carries no derivative
        self.pending: dict[str, list[_Record]] = {}
        self.extra_preds: dict[str, list[str]] = {}  # in-place mutations seen by later users
        self.warnings: list[str] = []
        self._find_layers()

    # -- layers --------------------------------------------------------------
    def _find_layers(self) -> None:
        """Layers in graph order, their parameter names, and which layers each call/get_attr uses."""
        canonical = {id(p): name for name, p in self.gm.named_parameters()}
        first: dict[str, int] = {}
        params: dict[str, list[str]] = {}
        owners: dict[int, set[str]] = {}  # param id -> layers owning it
        for pos, n in enumerate(self.nodes):
            if n.op != "call_module":
                continue
            ps = list(self.modules[n.target].parameters())
            if not ps:
                continue
            first.setdefault(n.target, pos)
            params[n.target] = [canonical[id(p)] for p in ps]
            for p in ps:
                owners.setdefault(id(p), set()).add(n.target)
        for pos, n in enumerate(self.nodes):
            if n.op != "get_attr":
                continue
            t = get_qualified(self.gm, n.target)
            if not isinstance(t, nn.Parameter) or id(t) in owners:
                continue
            first.setdefault(n.target, pos)
            params[n.target] = [canonical[id(t)]]
            owners[id(t)] = {n.target}
        self.layers = sorted(first, key=lambda k: first[k])
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.params = params
        self.owners = {pid: sum(1 << self.index[l] for l in ls) for pid, ls in owners.items()}
        self._bits_cache: dict[int, np.ndarray] = {}

    def bits(self, mask: int) -> np.ndarray:
        """Index array of the layers in a bit mask."""
        out = self._bits_cache.get(mask)
        if out is None:
            s = bin(mask)[:1:-1]
            out = np.array([i for i, c in enumerate(s) if c == "1"], dtype=np.int64)
            self._bits_cache[mask] = out
        return out

    # -- the rules' API ---------------------------------------------------------
    def module(self, node: torch.fx.Node) -> nn.Module:
        """The module a ``call_module`` node calls."""
        return self.modules[node.target]

    def own(self, node: torch.fx.Node) -> int:
        """Layer mask of the parameters the called module owns (0 for functions and methods)."""
        if node.op != "call_module":
            return 0
        mask = 0
        for p in self.modules[node.target].parameters():
            mask |= self.owners.get(id(p), 0)
        return mask

    def mask(self, a: Any) -> int:
        """Layer mask of an argument (0 for constants and python values)."""
        if isinstance(a, torch.fx.Node):
            return self.anc.get(a.name, 0)
        if isinstance(a, (list, tuple)):
            m = 0
            for x in a:
                m |= self.mask(x)
            return m
        return 0

    def inputs(self, node: torch.fx.Node) -> int:
        """Layer mask of all the node's inputs."""
        return self.mask(list(node.all_input_nodes))

    def from_input(self, a: Any) -> bool:
        """Whether an argument depends on a model input."""
        if isinstance(a, torch.fx.Node):
            return self.data.get(a.name, False)
        if isinstance(a, (list, tuple)):
            return any(self.from_input(x) for x in a)
        return False

    def record(self, node: torch.fx.Node, reason: str, a: int, b: int) -> None:
        """Layers ``a`` interact with layers ``b`` at ``node`` for ``reason`` (nothing when either is empty)."""
        if a and b:
            self.pending.setdefault(node.name, []).append(_Record(node.name, reason, a, b))

    def smooth(self, node: torch.fx.Node, mask: int, reason: str = "smooth") -> None:
        """Every pair of layers in ``mask`` interacts, the diagonal included."""
        self.record(node, reason, mask, mask)

    def product(self, node: torch.fx.Node, x: Any, y: Any) -> None:
        """Bilinear interaction of operands ``x`` and ``y`` (nodes, lists of nodes, or None).

        The reason is "series" when exactly one side depends on the model
        input (a parameter-only tensor times an activation), else "parallel".
        """
        reason = "series" if self.from_input(x) != self.from_input(y) else "parallel"
        self.record(node, reason, self.mask(x), self.mask(y))

    def multilinear(self, node: torch.fx.Node, operands: Sequence) -> None:
        """Pairwise products of the node operands."""
        ops = [o for o in operands if isinstance(o, torch.fx.Node)]
        for i in range(len(ops)):
            for j in range(i + 1, len(ops)):
                self.product(node, ops[i], ops[j])

    def unknown(self, node: torch.fx.Node, mask: int, extra: str = "") -> None:
        """No rule models the op: every pair in ``mask`` interacts (reason ``unknown op ...``), with a warning."""
        desc = op_name(node, self.modules)
        self.smooth(node, mask, f"unknown op {desc}{extra} (conservative)")
        if mask:
            self.warnings.append(
                f"hessian_blocks: no curvature rule for {desc}{extra} at node '{node.name}'; "
                "assumed every pair of layers its inputs depend on interacts there"
            )

    # -- main loop ------------------------------------------------------------
    def _set(self, node: torch.fx.Node, flow: Flow) -> None:
        if flow.constant:
            self.anc[node.name] = 0
            self.const.add(node.name)
            return
        self.anc[node.name] = self.inputs(node) if flow.layers is None else flow.layers
        self._inplace(node)

    def run(self) -> HessianBlocks:
        for node in self.nodes:
            self.data[node.name] = node.op == "placeholder" or any(self.from_input(a) for a in node.all_input_nodes)
            if node.op == "placeholder":
                self.anc[node.name] = 0
            elif node.op == "get_attr":
                t = get_qualified(self.gm, node.target)
                self.anc[node.name] = self.owners.get(id(t), 0) if isinstance(t, torch.Tensor) else 0
            elif node.op == "output":
                self.anc[node.name] = self.inputs(node)
            elif not _spec_differentiable(node.meta.get(SPEC)):
                self.anc[node.name] = 0
                self.const.add(node.name)
            else:
                self._set(node, rule_for(self, node)(self, node))
        return self.finish()

    def _inplace(self, node: torch.fx.Node) -> None:
        """An in-place op also changes its first argument for the nodes that follow."""
        inplace = False
        if node.op == "call_method":
            inplace = str(node.target).endswith("_") and not str(node.target).endswith("__")
        elif node.op == "call_function":
            inplace = node.target in _INPLACE_FUNCTIONS
        elif node.op == "call_module":
            inplace = getattr(self.modules[node.target], "inplace", False) is True
        if not inplace or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        target = node.args[0]
        self.anc[target.name] = self.anc.get(target.name, 0) | self.anc[node.name]
        seen = False
        for n in self.nodes:
            if n is node:
                seen = True
                continue
            if seen and target in n.all_input_nodes:
                self.extra_preds.setdefault(n.name, []).append(node.name)

    # -- liveness and result -----------------------------------------------------
    def _live(self, out_node: torch.fx.Node | None) -> set[str]:
        """Nodes with a differentiable path to the output (constants cut the path)."""
        live: set[str] = set()
        if out_node is None:
            return live
        stack = [out_node]
        live.add(out_node.name)
        by_name = {n.name: n for n in self.nodes}
        while stack:
            n = stack.pop()
            if n.name in self.const and n is not out_node:
                continue
            preds = [a.name for a in n.all_input_nodes] + self.extra_preds.get(n.name, [])
            for p in preds:
                if p not in live:
                    live.add(p)
                    stack.append(by_name[p])
        return live

    def finish(self) -> HessianBlocks:
        out_node = self.nodes[-1] if self.nodes and self.nodes[-1].op == "output" else None
        live = self._live(out_node)
        n = len(self.layers)
        reasons: dict[str, np.ndarray] = {}
        records = []
        for node_name, recs in self.pending.items():
            if node_name not in live:
                continue
            for r in recs:
                a, b = self.bits(r.a), self.bits(r.b)
                mat = reasons.setdefault(r.reason, np.zeros((n, n), dtype=bool))
                mat[np.ix_(a, b)] = True
                mat[np.ix_(b, a)] = True
                records.append((node_name, r.reason, a, b))
        reach = np.zeros(n, dtype=bool)
        if out_node is not None:
            reach[self.bits(self.anc.get(out_node.name, 0))] = True
        warnings = list(dict.fromkeys(self.warnings))
        return HessianBlocks(self.layers, self.params, reasons, reach, records, warnings)


def analyze(traced: TracedGraph) -> HessianBlocks:
    """Runs the Hessian block-structure pass over a traced graph.

    Args:
        traced: the IR from :func:`passes.trace.trace_module` (eval mode).

    Returns:
        The :class:`HessianBlocks` of the graph's layers.
    """
    return BlockWalk(traced).run()


def hessian_blocks(graph) -> HessianBlocks:
    """Which layer blocks of the loss Hessian are structurally zero.

    Args:
        graph: an ``oba_fx.Graph`` (from ``oba_fx.trace``) or a
            :class:`passes.trace.TracedGraph`.

    Returns:
        A :class:`HessianBlocks`: ``zero(l, m)`` / ``reason(l, m)`` for the
        network-curvature part ``F``, ``gauss_newton_nonzero(l, m)`` for ``G``,
        plus text, JSON, networkx, GraphML, DOT and PNG views.
    """
    traced = getattr(graph, "traced", graph)
    if not isinstance(traced, TracedGraph):
        raise TypeError(
            f"hessian_blocks expects an oba_fx.Graph (from oba_fx.trace) or a TracedGraph, got {type(graph).__name__}"
        )
    return analyze(traced)


# ---------------------------------------------------------------------------
# numerical check


def _layer_param_names(blocks: HessianBlocks, layer: str, named: Mapping[str, torch.Tensor]) -> list[str]:
    names = [p for p in blocks.params(layer) if p in named]
    if names:
        return names
    return [p for p in named if p == layer or p.startswith(layer + ".")]


def check_blocks(
    blocks: HessianBlocks,
    model: nn.Module,
    calibration: Any,
    fvp: Callable[[nn.Module, Any, dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    probes: int = 2,
    seed: int = 0,
) -> dict[tuple[str, str], float]:
    """Estimates ``‖F_lm v‖`` for every ordered layer pair with random probes.

    For each layer ``m`` and probe, draws a Gaussian ``v`` on ``m``'s
    parameters (zero on all others), computes ``F·v`` with ``fvp`` and takes
    the norm of its restriction to each layer ``l``; the result is the maximum
    over probes.  One ``fvp`` call per (layer, probe) gives every ``l``.

    Args:
        blocks: the analysis result whose layers are checked.
        model: the model (parameter names as in ``model.named_parameters()``).
        calibration: passed through to ``fvp``.
        fvp: ``fvp(model, calibration, v) -> {param name: F·v}``, ``v`` a dict
            of tensors shaped like the model's parameters.
        probes: random probes per layer.
        seed: seed of the probe generator.

    Returns:
        ``{(l, m): max over probes of ‖(F v_m)_l‖}`` for every ordered pair;
        ``nan`` where a layer has no parameter in the model or in ``fvp``'s answer.
    """
    named = dict(model.named_parameters())
    groups = {l: _layer_param_names(blocks, l, named) for l in blocks.layers}
    gen = torch.Generator().manual_seed(seed)
    out: dict[tuple[str, str], float] = {(l, m): float("nan") for m in blocks.layers for l in blocks.layers}
    for m in blocks.layers:
        if not groups[m]:
            continue
        for _ in range(probes):
            v = {name: torch.zeros_like(p.detach()) for name, p in named.items()}
            for name in groups[m]:
                p = named[name]
                v[name] = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            fv = fvp(model, calibration, v)
            for l in blocks.layers:
                present = [fv[n] for n in groups[l] if n in fv]
                if not present:
                    continue
                norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in present))
                prev = out[(l, m)]
                out[(l, m)] = norm if math.isnan(prev) else max(prev, norm)
    return out
