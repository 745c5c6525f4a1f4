"""Pass 1: trace a model with torch.fx and record every node's value.

The result is the IR every later pass reads: a ``torch.fx.GraphModule`` that
owns a private copy of the user's parameters, the value each node produced on
the example inputs (tensor shapes, or the python value of shape arithmetic),
and a ``networkx.DiGraph`` view of the same graph for inspection tooling.

The user's model is never modified: we trace a deep copy.
"""
from __future__ import annotations

import copy
import linecache
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx

__all__ = ["TensorSpec", "TracedGraph", "TraceFailure", "trace_module", "default_leaf_types"]


class TraceFailure(RuntimeError):
    """The model could not be traced by torch.fx."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor value."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)


def default_leaf_types() -> tuple[type, ...]:
    """Module types that are traced as opaque calls besides ``torch.nn`` ones.

    torchvision's StochasticDepth reads ``self.training`` in python; as a leaf
    it stays a runtime decision instead of being baked in at trace time.
    """
    leaves: list[type] = []
    try:
        from torchvision.ops import StochasticDepth

        leaves.append(StochasticDepth)
    except ImportError:  # torchvision is optional for tracing
        pass
    return tuple(leaves)


class _LeafTracer(torch.fx.Tracer):
    """fx tracer with torch.nn modules as leaves plus the user's choices.

    It remembers which submodules are being traced, so a failure can name the
    one the user should mark as a leaf.
    """

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str]):
        super().__init__()
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self._oba_stack: list[str] = []

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._oba_stack.append(qualname)
        out = super().call_module(m, forward, args, kwargs)
        self._oba_stack.pop()
        return out


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch: the code that failed."""
    frames = traceback.extract_tb(tb)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    user = [f for f in frames if not f.filename.startswith(torch_dir)]
    frame = (user or frames)[-1]
    line = (linecache.getline(frame.filename, frame.lineno) or "").strip()
    return f"{frame.filename}:{frame.lineno} in {frame.name}: `{line}`"


def _spec_of(value: Any) -> Any:
    """Structure of a node's value: TensorSpec, a tuple of specs, or the python value."""
    if isinstance(value, torch.Tensor):
        return TensorSpec(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return tuple(_spec_of(v) for v in value)
    if isinstance(value, (int, float, bool, str)) or value is None:
        return value
    return type(value).__name__


class _Recorder(torch.fx.Interpreter):
    """Runs the graph once and stores each node's value spec in ``node.meta['spec']``."""

    def run_node(self, n):
        result = super().run_node(n)
        n.meta["spec"] = _spec_of(result)
        return result


def as_args(example_inputs: Any) -> tuple:
    """Normalise example inputs to a positional-argument tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple/list of tensors, got {type(example_inputs).__name__}; "
        "wrap a single input as `(x,)`."
    )


@dataclass
class TracedGraph:
    """The traced IR.

    Attributes:
        gm: GraphModule over a private copy of the model, in eval mode.
        example_inputs: positional inputs used for value propagation.
        ir: networkx DiGraph; nodes are fx node names with attributes ``op``,
            ``target``, ``module_type``, ``shape`` (tuple, list of tuples for
            multi-output nodes, or None) and ``dtype``; edges run from argument
            to user.
        source_training: the training flag of the user's model when traced.
    """

    gm: torch.fx.GraphModule
    example_inputs: tuple
    ir: nx.DiGraph = field(repr=False)
    source_training: bool = False

    def node(self, name: str) -> torch.fx.Node:
        return self._nodes[name]

    def __post_init__(self):
        self._nodes = {n.name: n for n in self.gm.graph.nodes}


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}".lstrip(".")


def _shape_attr(spec: Any):
    if isinstance(spec, TensorSpec):
        return spec.shape
    if isinstance(spec, tuple) and spec and all(isinstance(s, TensorSpec) for s in spec):
        return [s.shape for s in spec]
    return None


def build_ir(gm: torch.fx.GraphModule) -> nx.DiGraph:
    """The networkx view of a recorded GraphModule."""
    modules = dict(gm.named_modules())
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        spec = n.meta.get("spec")
        module_type = type(modules[n.target]).__name__ if n.op == "call_module" else None
        dtype = spec.dtype if isinstance(spec, TensorSpec) else None
        g.add_node(
            n.name,
            op=n.op,
            target=_target_name(n),
            module_type=module_type,
            shape=_shape_attr(spec),
            dtype=str(dtype) if dtype is not None else None,
        )
        for pos, a in enumerate(n.all_input_nodes):
            g.add_edge(a.name, n.name, arg=pos)
    return g


def trace_module(
    model: torch.nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[type | str] = (),
) -> TracedGraph:
    """Trace ``model`` into the IR.

    Args:
        model: any ``torch.nn.Module``; it is deep-copied, never modified.
        example_inputs: a tensor or a tuple of positional tensors, used to
            record every node's shape.
        leaf_modules: module types or qualified module names to keep as
            opaque calls (for code torch.fx cannot trace).

    Raises:
        TraceFailure: naming the failing code and suggesting ``leaf_modules``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"oba_fx.trace expects a torch.nn.Module, got {type(model).__name__}")
    args = as_args(example_inputs)
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type)) + default_leaf_types()
    leaf_names = frozenset(m for m in leaf_modules if isinstance(m, str))
    unknown = leaf_names - {name for name, _ in model.named_modules()}
    if unknown:
        raise ValueError(f"leaf_modules names no submodule: {sorted(unknown)}; use names from model.named_modules()")

    private = copy.deepcopy(model)
    private.eval()  # python branches on self.training are baked in: trace the inference graph
    tracer = _LeafTracer(leaf_types, leaf_names)
    try:
        graph = tracer.trace(private)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        where = _user_frame(sys.exc_info()[2])
        inside = tracer._oba_stack[-1] if tracer._oba_stack else None
        hint = (
            f"pass leaf_modules=['{inside}'] (or its type {type(private.get_submodule(inside)).__name__}) "
            "to treat that submodule as an opaque call"
            if inside
            else "pass leaf_modules=[...] naming the submodule that contains this code"
        )
        raise TraceFailure(
            f"torch.fx could not trace {type(model).__name__}: {type(err).__name__}: {err}\n"
            f"  failing code: {where}\n"
            f"  fix: {hint}; its channels are then kept frozen."
        ) from err
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    # unpickling a GraphModule re-traces its code with `_tracer_cls`; ours needs constructor
    # arguments, and the plain Tracer (all modules kept as leaves on reload) is what we want
    graph._tracer_cls = None
    gm._tracer_cls = None
    gm.eval()
    with torch.no_grad():
        try:
            _Recorder(gm).run(*args)
        except Exception as err:  # noqa: BLE001
            raise TraceFailure(
                f"the traced graph of {type(model).__name__} failed on the example inputs: "
                f"{type(err).__name__}: {err}. Check that example_inputs match what model(*example_inputs) expects."
            ) from err
    return TracedGraph(gm=gm, example_inputs=args, ir=build_ir(gm), source_training=model.training)
