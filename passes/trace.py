"""Pass 1: trace a model with torch.fx and record every node's value.

The result is the IR every later pass reads: a ``torch.fx.GraphModule`` that
owns a private copy of the user's parameters, the value each node produced on
the example inputs (tensor shapes, or the python value of shape arithmetic),
and a ``networkx.DiGraph`` view of the same graph for inspection tooling.

The user's model is never modified: we trace a deep copy.
"""
from __future__ import annotations

import contextlib
import copy
import linecache
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx
from .errors import UsageError
from .meta import BRANCH, SPEC

__all__ = ["TensorSpec", "TracedGraph", "TraceFailure", "trace_module", "default_leaf_types", "LeafTracer", "Recorder"]


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
    from .attention import SlimMultiheadAttention  # python branches on the input rank: a leaf with its own rule

    leaves: list[type] = [SlimMultiheadAttention]
    try:
        from torchvision.ops import FrozenBatchNorm2d, StochasticDepth

        # FrozenBatchNorm2d (torchvision's detection backbones) computes its scale in python: as a
        # leaf it keeps its buffers by name and gets the channel-norm coupling rule
        leaves += [StochasticDepth, FrozenBatchNorm2d]
    except ImportError:  # torchvision is optional for tracing
        pass
    return tuple(leaves)


#: methods a subclass may define and still run ``torch.nn``'s own forward
_HARMLESS_METHODS = frozenset({"__init__", "reset_parameters", "extra_repr", "__repr__", "__setstate__",
                               "_get_name", "__getstate__", "_load_from_state_dict"})


def _torch_nn_base(m: torch.nn.Module) -> type | None:
    """The nearest ``torch.nn`` class of a user subclass whose forward is torch.nn's own, else None.

    ``class MyConv(nn.Conv2d)`` that only changes ``__init__`` computes exactly
    what nn.Conv2d computes, so it is traced as a leaf and gets nn.Conv2d's
    coupling rule.  A subclass that overrides ``forward`` (timm's StdConv2d) is
    traced through instead: its own code is what runs.
    """
    for cls in type(m).__mro__[1:]:
        if cls.__module__.startswith("torch.nn") and cls is not torch.nn.Module:
            break
    else:
        return None
    if isinstance(m, (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)):
        return None
    for sub in type(m).__mro__:
        if sub is cls:
            return cls
        for name, v in vars(sub).items():
            if callable(v) and name not in _HARMLESS_METHODS and hasattr(cls, name):
                return None  # overrides torch.nn behaviour
    return cls


def _is_norm_act(m: torch.nn.Module) -> bool:
    """A BatchNorm subclass that adds only elementwise children (timm's BatchNormAct2d).

    timm registers these as fx leaves.  As leaves they keep reading
    ``self.training`` at run time, so the slim model trains its statistics
    like the original; the channel-norm coupling rule applies (the activation
    and dropout act elementwise).
    """
    if not isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        return False
    elementwise = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.SiLU, torch.nn.GELU, torch.nn.Identity, torch.nn.Dropout,
                   torch.nn.Hardswish, torch.nn.Hardsigmoid, torch.nn.LeakyReLU, torch.nn.ELU, torch.nn.Mish,
                   torch.nn.Sigmoid, torch.nn.Tanh, torch.nn.PReLU, torch.nn.Dropout2d)
    kids = list(m.children())
    return all(isinstance(k, elementwise) and not any(True for _ in k.children()) for k in kids) and all(
        not isinstance(k, torch.nn.PReLU) for k in kids)


class LeafTracer(torch.fx.Tracer):
    """fx tracer with torch.nn modules as leaves plus the user's choices.

    Subclasses of torch.nn modules that keep torch.nn's forward, and BatchNorm
    subclasses with an elementwise activation, are leaves too.  It remembers
    which submodules are being traced, so a failure can name the one the user
    should mark as a leaf.
    """

    def __init__(self, leaf_types: tuple[type, ...], leaf_names: frozenset[str], autowrap_functions=(),
                 example_inputs: tuple | None = None):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self._oba_autowrap = tuple(autowrap_functions)
        self.leaf_types = leaf_types
        self.leaf_names = leaf_names
        self._oba_stack: list[str] = []
        self._example = example_inputs
        self.branches: list[str] = []  # python decisions taken on the example inputs' values

    def trace(self, root, concrete_args=None):
        self._env: dict = {}
        self._placeholders = 0
        self.branches = []
        with _state_preserved(root):
            return super().trace(root, concrete_args)

    # -- python control flow on traced values ------------------------------------------
    #
    # ``if H == self.window_size:`` or ``for part in x.chunk(3):`` cannot be traced symbolically.
    # With example inputs, a traced python value (a size, never tensor data) is evaluated on them (the graph built so far is run,
    # incrementally) and python takes that branch: the graph is specialised to the example's
    # shapes.  The condition node is marked ``meta["oba_fx.branch"]`` so that the coupling pass
    # freezes every dimension whose size it read (pruning must not flip a decision).
    def to_bool(self, obj) -> bool:
        if self._example is None:
            return super().to_bool(obj)
        value = self._concrete(obj.node)
        if isinstance(value, torch.Tensor):
            # a decision on data (``if x.sum() > 0``) would be baked for every input: refuse, as fx does
            return super().to_bool(obj)
        obj.node.meta[BRANCH] = True
        self.branches.append(_caller_outside_torch())
        return bool(value)

    def iter(self, obj):
        if self._example is not None:
            value = self._concrete(obj.node)
            if isinstance(value, (tuple, list, torch.Size)):
                return iter([obj[i] for i in range(len(value))])
        return super().iter(obj)

    def _concrete(self, node):
        from torch.fx._symbolic_trace import _maybe_revert_all_patches

        env = self._env
        # fx patches nn.Module.__call__ and wrapped functions while tracing: evaluate without them
        with _maybe_revert_all_patches():
            for n in self.graph.nodes:
                if n not in env:
                    env[n] = self._evaluate(n, env)
                if n is node:
                    return env[n]
        raise TraceFailure(f"oba_fx bug: node {node} is not in the graph being traced")

    def _evaluate(self, n, env):
        load = lambda a: torch.fx.node.map_arg(a, lambda x: env[x])  # noqa: E731
        with torch.no_grad():
            if n.op == "placeholder":
                i = self._placeholders
                self._placeholders += 1
                if i < len(self._example):
                    v = self._example[i]
                    return v.clone() if isinstance(v, torch.Tensor) else v
                return n.args[0] if n.args else None
            if n.op == "get_attr":
                obj = self.root
                for part in n.target.split("."):
                    obj = getattr(obj, part)
                return obj
            args, kwargs = load(n.args), load(n.kwargs)
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            if n.op == "call_method":
                return getattr(args[0], n.target)(*args[1:], **kwargs)
            if n.op == "call_module":
                return self.root.get_submodule(n.target)(*args, **kwargs)
        return None

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if not type(m).__module__.startswith("torch.nn") and (_torch_nn_base(m) is not None or _is_norm_act(m)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._oba_stack.append(qualname)
        out = super().call_module(m, forward, args, kwargs)
        self._oba_stack.pop()
        return out


@contextlib.contextmanager
def _state_preserved(module: torch.nn.Module):
    """Buffers as they were: evaluating a train-mode trace on the example inputs updates BatchNorm statistics."""
    saved = {k: v.detach().clone() for k, v in module.named_buffers()} if isinstance(module, torch.nn.Module) else {}
    try:
        yield
    finally:
        if saved:
            with torch.no_grad():
                for k, v in module.named_buffers():
                    if k in saved:
                        v.copy_(saved[k])


def _caller_outside_torch() -> str:
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    here = __file__
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(torch_dir) and frame.filename != here:
            line = (linecache.getline(frame.filename, frame.lineno) or "").strip()
            return f"{frame.filename}:{frame.lineno} `{line}`"
    return "unknown location"


def _user_frame(tb) -> str:
    """The innermost traceback frame outside torch: the code that failed."""
    frames = traceback.extract_tb(tb)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    user = [f for f in frames if not f.filename.startswith(torch_dir) and f.filename != __file__]
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


class Recorder(torch.fx.Interpreter):
    """Runs the graph once and stores each node's value spec in ``node.meta['spec']``."""

    def run_node(self, n):
        result = super().run_node(n)
        n.meta[SPEC] = _spec_of(result)
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
        source_modes: every submodule's training flag when traced (the rewrite restores them).
        source_requires_grad: every parameter's ``requires_grad`` when traced (kept by the rewrite).
        warnings: what tracing could not represent (python branches on ``self.training``).
    """

    gm: torch.fx.GraphModule
    example_inputs: tuple
    ir: nx.DiGraph = field(repr=False)
    source_training: bool = False
    source_modes: dict[str, bool] = field(default_factory=dict)
    source_requires_grad: dict[str, bool] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

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
        spec = n.meta.get(SPEC)
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
        raise UsageError(f"leaf_modules names no submodule: {sorted(unknown)}; use names from model.named_modules()")

    _check_names(model)
    private = copy.deepcopy(model)
    graph, tracer = _trace_or_explain(private, model, leaf_types, leaf_names, example=args)
    warns: list[str] = []
    if tracer.branches:
        shown = tracer.branches[0]
        warns.append(
            f"oba_fx: {type(model).__name__}'s python code takes {len(tracer.branches)} decision(s) on traced values "
            f"(first: {shown}); they were decided on the example inputs, so the traced and slimmed graphs are "
            "specialised to inputs like them, and the dimensions those decisions read are kept")
    if warns_train := _follow_training_flag(graph, private, model, leaf_types, leaf_names, tracer):
        warns.append(warns_train)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    # unpickling a GraphModule re-traces its code with `_tracer_cls`; ours needs constructor
    # arguments, and the plain Tracer (all modules kept as leaves on reload) is what we want
    graph._tracer_cls = None
    gm._tracer_cls = None
    gm.eval()
    with torch.no_grad():
        try:
            Recorder(gm).run(*args)
        except Exception as err:  # noqa: BLE001
            raise TraceFailure(
                f"the traced graph of {type(model).__name__} failed on the example inputs: "
                f"{type(err).__name__}: {err}. Check that example_inputs match what model(*example_inputs) expects."
            ) from err
    for w in warns:
        warnings.warn(w, stacklevel=3)
    return TracedGraph(gm=gm, example_inputs=args, ir=build_ir(gm), source_training=model.training,
                       source_modes={name: m.training for name, m in model.named_modules()},
                       source_requires_grad={n: p.requires_grad for n, p in
                                             model.named_parameters(remove_duplicate=False)},
                       warnings=warns)


#: attributes of torch.fx.GraphModule that a top-level submodule or tensor must not shadow
_GRAPHMODULE_NAMES = frozenset(n for n in dir(torch.fx.GraphModule) if not n.startswith("__")) | {"meta", "graph"}


def _check_names(model: torch.nn.Module) -> None:
    clash = sorted({n.split(".")[0] for n, _ in model.named_children()} & _GRAPHMODULE_NAMES
                   | {n for n, _ in model.named_parameters(recurse=False)} & _GRAPHMODULE_NAMES
                   | {n for n, _ in model.named_buffers(recurse=False)} & _GRAPHMODULE_NAMES)
    if clash:
        raise TraceFailure(
            f"{type(model).__name__} has top-level attribute(s) {clash} that clash with torch.fx.GraphModule's own "
            f"'{clash[0]}', so torch.fx cannot build the traced module. Fix: rename the attribute, or wrap the "
            "model (`nn.Sequential(model)`; its names then start with '0.')."
        )


def _trace_or_explain(private, model, leaf_types, leaf_names, autowrap=(), retried=False, example=None):
    """Trace ``private`` in eval mode; on failure retry with timm's registered fx leaves, else explain."""
    private.eval()  # python branches on self.training follow the inference code (see _follow_training_flag)
    tracer = LeafTracer(leaf_types, leaf_names, autowrap, example)
    try:
        concrete = _none_defaults(private, example)
        return _keep_arg_names(tracer.trace(private, concrete_args=concrete), concrete), tracer
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        timm_fx = sys.modules.get("timm.layers._fx")
        if timm_fx is not None and not retried:
            # timm registers the modules and functions its own fx feature extraction cannot trace
            leaves = tuple(timm_fx._leaf_modules)
            fns = tuple(timm_fx._autowrap_functions)
            if leaves or fns:
                try:
                    return _trace_or_explain(private, model, leaf_types + leaves, leaf_names, fns, retried=True,
                                              example=example)
                except TraceFailure:
                    pass
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


def _none_defaults(model: torch.nn.Module, example) -> dict | None:
    """Forward arguments the example inputs leave at a constant default (``mask=None``, ``is_causal=False``,
    ``scale=1.0``): traced as that constant.

    Symbolically they would be proxies: ``if mask is not None:`` would take the wrong branch, and a proxy
    reaching ``F.scaled_dot_product_attention(is_causal=...)`` breaks the ONNX export of the slim model (timm
    EVA-02). torch.fx keeps them in the signature with a check: calling the traced model with another value
    raises "... has been specialized to have value False but got another value".
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    given = len(example) if example is not None else 0
    out = {p.name: p.default for p in params[given:]
           if (p.default is None or type(p.default) in (bool, int, float, str))
           and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return out or None


def _keep_arg_names(graph: torch.fx.Graph, concrete: dict | None) -> torch.fx.Graph:
    """torch.fx names the placeholder of a specialised argument ``is_causal_1``; the traced forward then
    refuses ``is_causal=...`` as an unexpected keyword. Give the signature its own names back, so a call with
    another value meets fx's "has been specialized" check instead."""
    for node in graph.nodes:
        if node.op == "placeholder" and concrete and node.target.endswith("_1") and node.target[:-2] in concrete:
            node.target = node.target[:-2]
    return graph


def by_mode(training: bool, train_value: Any, eval_value: Any) -> Any:
    """``train_value if training else eval_value``: a mode-dependent argument in a traced graph."""
    return train_value if training else eval_value


def _follow_training_flag(graph, private, model, leaf_types, leaf_names, tracer) -> str | None:
    """Make arguments that depend on ``self.training`` read the flag at run time.

    Tracing bakes python values: ``F.dropout(x, p, training=self.training)``
    would stay at the traced mode forever.  The model is traced a second time
    in train mode; every argument that differs between the two graphs is
    rewritten, in the eval graph, to ``by_mode(<module>.training, train, eval)``,
    where <module> is the innermost module whose code made the call.  When the
    two graphs differ in structure (python ``if self.training:`` branches), the
    eval graph is kept and a warning is returned.
    """
    private.train()
    try:
        concrete = _none_defaults(private, tracer._example)
        train_graph = _keep_arg_names(LeafTracer(leaf_types, leaf_names, tracer._oba_autowrap,
                                                  tracer._example).trace(private, concrete_args=concrete), concrete)
    except Exception:  # noqa: BLE001 - a model that cannot trace in train mode keeps its eval graph
        train_graph = None
    finally:
        private.eval()
    if train_graph is None:
        return None
    ev, tr = list(graph.nodes), list(train_graph.nodes)
    same = len(ev) == len(tr)
    diffs = []
    pos = {n: i for i, n in enumerate(tr)}
    epos = {n: i for i, n in enumerate(ev)}
    if same:
        for e, t in zip(ev, tr):
            if e.op != t.op or (e.target != t.target and not _same_constant(private, e, t)):
                same = False
                break
            d = _arg_diffs((e.args, e.kwargs), (t.args, t.kwargs), epos, pos)
            if d is None:
                same = False
                break
            for path, ev_val, tr_val in d:
                diffs.append((e, path, ev_val, tr_val))
    if not same:
        first = next((e for e, t in zip(ev, tr) if e.op != t.op
                      or (e.target != t.target and not _same_constant(private, e, t))
                      or _arg_diffs((e.args, e.kwargs), (t.args, t.kwargs), epos, pos) is None), None) \
            if len(ev) == len(tr) else None
        stack = (first.meta.get("nn_module_stack") or {}) if first is not None else {}
        inside = f" (in '{next(reversed(stack))}')" if stack else ""
        return (f"oba_fx: {type(model).__name__}'s python code branches on self.training{inside}: the traced "
                "graph follows the eval-mode code, and the slimmed model runs that code in train mode too "
                "(dropout and batch-norm modules still follow their own mode)")
    for node, path, ev_val, tr_val in diffs:
        owner = ""
        stack = node.meta.get("nn_module_stack")
        if stack:
            owner = next(reversed(stack))
            owner = owner if isinstance(owner, str) else ""
        with graph.inserting_before(node):
            flag = graph.get_attr(f"{owner}.training" if owner else "training")
            value = flag if (tr_val is True and ev_val is False) else graph.call_function(
                by_mode, (flag, tr_val, ev_val))
        args, kwargs = _set_path((node.args, node.kwargs), path, value)
        node.args, node.kwargs = args, kwargs
    return None


def _same_constant(root, a: torch.fx.Node, b: torch.fx.Node) -> bool:
    """Two traces name the tensor constants they create differently (``_tensor_constant0`` / ``4``)."""
    if a.op != "get_attr" or not (a.target.startswith("_tensor_constant") and b.target.startswith("_tensor_constant")):
        return False
    x, y = getattr(root, a.target, None), getattr(root, b.target, None)
    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)


def _arg_diffs(a, b, apos, bpos, path=()):
    """Leaf-wise differences of two argument structures: [(path, a, b)], or None when they differ in shape."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and apos[a] == bpos[b]:
            return []
        return None
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        if type(a) is not type(b) or len(a) != len(b):
            return None
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            d = _arg_diffs(x, y, apos, bpos, path + (i,))
            if d is None:
                return None
            out += d
        return out
    if isinstance(a, slice) and isinstance(b, slice):
        d = _arg_diffs((a.start, a.stop, a.step), (b.start, b.stop, b.step), apos, bpos, path + ("slice",))
        return d
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        out = []
        for k in a:
            d = _arg_diffs(a[k], b[k], apos, bpos, path + (k,))
            if d is None:
                return None
            out += d
        return out
    if type(a) is not type(b):
        return None
    try:
        equal = bool(a == b)
    except Exception:  # noqa: BLE001
        return None
    return [] if equal else [(path, a, b)]


def _set_path(struct, path, value):
    if not path:
        return value
    head, rest = path[0], path[1:]
    if head == "slice":
        start, stop, step = _set_path((struct.start, struct.stop, struct.step), rest, value)
        return slice(start, stop, step)
    if isinstance(struct, dict):
        return {**struct, head: _set_path(struct[head], rest, value)}
    items = list(struct)
    items[head] = _set_path(items[head], rest, value)
    return type(struct)(items) if isinstance(struct, tuple) else items
