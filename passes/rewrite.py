"""Pass 4: emit the slimmed graph.

Given ``{group_id: channels to remove}``, the coupling result tells which
position of every slot vanishes.  The rewrite then

1. slices every parameter and buffer along every shrinking dim with
   ``index_select``; a Conv (plain or depthwise), Linear or BatchNorm has its
   weight, bias and statistics sliced together (checked to agree) and its size
   attributes updated;
2. syncs module attributes to the new shapes (in/out channels, groups,
   num_features, num_groups, normalized_shape, embedding_dim, ...) and swaps
   ``nn.MultiheadAttention`` for ``SlimMultiheadAttention`` when heads or head
   dims shrink;
3. rewrites graph constants that spell sizes, where the coupling rules left a
   hint in ``node.meta`` (keys in ``passes/meta.py``): literal
   reshape/view/expand sizes, ``split`` sections, ``F.layer_norm`` shapes,
   ``F.conv*`` groups, Swin attention widths, and the implicit SDPA scale
   (kept at its original value);
4. re-runs the new graph on the example inputs and checks every tensor's
   shape against the prediction.  A mismatch raises; a silently wrong model
   is never returned.

The traced module is never modified: the rewrite works on a deep copy (which
carries the nodes' meta, hints included).
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from typing import Mapping

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from . import meta
from .attention import SlimMultiheadAttention, slim_shifted_window_attention
from .dependency import CouplingResult
from .fxutil import owner_and_attr, tensor_paths
from .inplace import inplace_adds
from .modes import apply_modes
from .trace import Recorder, TracedGraph
from .errors import UsageError

__all__ = ["RewriteError", "validate_removal", "rewrite", "tensor_cuts"]


class RewriteError(RuntimeError):
    """The rewritten graph does not have the predicted shapes (an analysis bug): nothing is returned."""


def validate_removal(result: CouplingResult, removal: Mapping, allow_empty: bool = False) -> dict[int, np.ndarray]:
    """Check a ``{group_id: channels}`` request and normalise it to sorted int arrays.

    Raises:
        ValueError: naming the problem -- not a mapping, nothing to remove,
            unknown group id, frozen group, out-of-range or repeated channel,
            or a group emptied without ``allow_empty=True``.
    """
    if not isinstance(removal, Mapping):
        raise UsageError(
            f"prune() expects a dict {{group_id: [channel indices]}}, got {type(removal).__name__}; "
            "see graph.groups for ids and sizes"
        )
    by_id = {g.id: g for g in result.groups}
    out: dict[int, np.ndarray] = {}
    for gid, channels in removal.items():
        if isinstance(gid, bool) or not isinstance(gid, (int, np.integer)):
            raise UsageError(f"group ids are ints (see graph.groups), got {gid!r}")
        g = by_id.get(int(gid))
        if g is None:
            raise UsageError(f"no group with id {gid}: valid ids are 0..{len(result.groups) - 1} (see graph.groups)")
        if isinstance(channels, torch.Tensor):
            channels = channels.detach().cpu().tolist()
        elif isinstance(channels, np.ndarray):
            channels = channels.tolist()
        elif isinstance(channels, (int, np.integer)):
            raise UsageError(f"group {gid}: give a list of channel indices, e.g. [{channels}], not a bare int")
        idx = list(channels)
        if not idx:
            continue
        bad = [i for i in idx if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if bad:
            raise UsageError(f"group {gid}: channel indices must be ints, got {bad[:5]}")
        if not g.prunable:
            raise UsageError(f"group {gid} ({g.label}) is frozen and cannot be pruned: {g.reason}")
        arr = np.asarray(idx, dtype=np.int64)
        out_of_range = arr[(arr < 0) | (arr >= g.size)]
        if out_of_range.size:
            raise UsageError(
                f"group {gid} ({g.label}) has {g.size} channels (valid indices 0..{g.size - 1}); "
                f"got out-of-range indices {out_of_range[:10].tolist()}"
            )
        uniq, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise UsageError(f"group {gid}: channel indices repeat: {uniq[counts > 1][:10].tolist()}")
        if uniq.size == g.size and not allow_empty:
            raise UsageError(
                f"group {gid} ({g.label}): removing all {g.size} channels would delete the layer; "
                "keep at least one, or pass allow_empty=True"
            )
        out[int(gid)] = uniq
    if not out:
        raise UsageError(
            "empty removal set: nothing to prune. Pass {group_id: [channel indices]} for at least one prunable "
            "group (see [g for g in graph.groups if g.prunable])"
        )
    return out


def _set_tensor(owner: nn.Module, attr: str, new: torch.Tensor, old: torch.Tensor) -> None:
    if attr in owner._parameters:
        p = nn.Parameter(new.contiguous(), requires_grad=old.requires_grad)
        owner._parameters[attr] = p
    elif attr in owner._buffers:
        owner._buffers[attr] = new.contiguous()
    else:
        raise RewriteError(f"{attr} of {type(owner).__name__} is neither a parameter nor a buffer")


class _Cut:
    """The positions of every slot that a removal deletes (validated), and what that does to each tensor."""

    def __init__(self, result: CouplingResult, removal: Mapping, allow_empty: bool):
        self.c = result.coupling
        self.req = validate_removal(result, removal, allow_empty=allow_empty)
        self.mask = result.removed_positions(self.req)

    def removed(self, sid: int) -> np.ndarray:
        o = self.c.offsets[sid]
        return np.nonzero(self.mask[o : o + self.c.size(sid)])[0]

    def new_size(self, sid: int) -> int:
        o = self.c.offsets[sid]
        return int(self.c.size(sid) - self.mask[o : o + self.c.size(sid)].sum())

    def tensors(self) -> tuple[dict[str, dict[int, np.ndarray]], dict[str, int]]:
        """({qualname: {dim: removed indices}}, {virtual slot: new size})."""
        cuts: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
        virtual: dict[str, int] = {}
        for sid, s in enumerate(self.c.slots):
            if s.kind == "param":
                r = self.removed(sid)
                if r.size:
                    cuts[s.ref][s.dim] = r
            elif s.kind == "virtual":
                virtual[s.ref] = self.new_size(sid)
        return cuts, virtual


def tensor_cuts(result: CouplingResult, removal: Mapping) -> dict[str, dict[int, np.ndarray]]:
    """``{parameter/buffer name: {dim: removed indices}}``: what ``rewrite`` slices out of each tensor."""
    return dict(_Cut(result, removal, allow_empty=True).tensors()[0])


def rewrite(traced: TracedGraph, result: CouplingResult, removal: Mapping, allow_empty: bool = False,
            check: bool = True) -> torch.fx.GraphModule:
    """Return a new GraphModule with ``removal`` applied (see module docstring)."""
    cut = _Cut(result, removal, allow_empty)
    gm = copy.deepcopy(traced.gm)
    cuts, virtual = cut.tensors()  # {qualname: {dim: removed indices}}, {virtual slot: new size}
    replaced = {n.target for n in gm.graph.nodes if n.meta.get(meta.REPLACE) == "mha"}
    _slice_tensors(gm, cuts, skip=replaced)  # 1.
    pred = _Predictor(cut.c, cut.new_size)
    _sync_modules(gm, replaced, pred, virtual)  # 2.
    _rewrite_constants(gm, pred, virtual)  # 3.
    gm.graph.lint()
    gm.recompile()
    inplace_adds(gm)  # tracing turned `out += x` into `out = out + x`; give eager its in-place add back
    _restore_state(gm, traced)
    if check:
        verify_shapes(gm, traced, pred)  # 4.
    return gm


def _slice_tensors(gm: torch.fx.GraphModule, cuts: dict[str, dict[int, np.ndarray]], skip: set[str]) -> None:
    """Step 1: slice every cut parameter and buffer (the modules in ``skip`` are replaced whole in step 2)."""
    done = _slice_layers(dict(gm.named_modules()), cuts, skip)
    # every other tensor (attention, get_attr tensors, norms, embeddings...)
    for qualname, dims in cuts.items():
        if qualname not in done:
            _slice(*owner_and_attr(gm, qualname), dims)


def _slice(owner: nn.Module, attr: str, dims: Mapping[int, np.ndarray]) -> None:
    """Drop ``dims[d]`` (sorted indices) along each dim ``d`` of ``owner.attr``."""
    t = getattr(owner, attr)
    new = t.detach()
    for d, r in sorted(dims.items()):
        keep = np.setdiff1d(np.arange(new.shape[d]), r)
        new = new.index_select(d, torch.as_tensor(keep, dtype=torch.long, device=new.device))
    _set_tensor(owner, attr, new, t)


def _slice_layers(modules: dict[str, nn.Module], cuts: dict[str, dict[int, np.ndarray]], skip: set[str]) -> set[str]:
    """Conv (plain or depthwise), Linear and BatchNorm: slice the weight and its bias / statistics together
    (checking the coupled slices agree) and update the size attributes the layer's forward reads.

    Returns the tensors sliced.  A grouped conv is left to the generic slicing (its attributes are
    synced from the predicted shapes in step 2).
    """
    done: set[str] = set()
    for mname, m in list(modules.items()):
        if mname in skip:
            continue
        prefix = f"{mname}." if mname else ""
        w_cut = cuts.get(prefix + "weight", {})
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            if not _slice_conv(m, w_cut):
                continue
        elif isinstance(m, nn.Linear):
            r_out, r_in = w_cut.get(0), w_cut.get(1)
            m.out_features -= 0 if r_out is None else len(r_out)
            m.in_features -= 0 if r_in is None else len(r_in)
            _slice_weight_and_bias(m, w_cut)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and (w_cut or cuts.get(prefix + "running_mean")):
            r = (w_cut.get(0) if w_cut else cuts[prefix + "running_mean"][0])
            for other in ("bias", "running_mean", "running_var"):
                if getattr(m, other, None) is not None:
                    _check_same(cuts.get(prefix + other, {}).get(0), r, prefix + other)
            m.num_features -= len(r)
            for t in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, t, None) is not None:
                    _slice(m, t, {0: r})
            done.update({prefix + t for t in ("weight", "bias", "running_mean", "running_var")})
            continue
        else:
            continue
        if m.bias is not None:
            _check_same(cuts.get(prefix + "bias", {}).get(0), w_cut.get(0), prefix + "bias")
        done.update({prefix + "weight", prefix + "bias"})
    return done


def _slice_conv(m: nn.modules.conv._ConvNd, w_cut: dict[int, np.ndarray]) -> bool:
    """A plain or depthwise conv: slice it and update its channel counts (and groups); False for a grouped conv."""
    depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
    if m.groups == 1:
        m.out_channels -= len(w_cut[0]) if 0 in w_cut else 0
        m.in_channels -= len(w_cut[1]) if 1 in w_cut else 0
    elif depthwise and 0 in w_cut:
        n = len(w_cut[0])
        m.out_channels, m.in_channels, m.groups = m.out_channels - n, m.in_channels - n, m.groups - n
    else:
        return False
    _slice_weight_and_bias(m, w_cut)
    return True


def _slice_weight_and_bias(m: nn.Module, w_cut: dict[int, np.ndarray]) -> None:
    """Weight rows and columns as cut; the bias with the weight's rows."""
    if w_cut:
        _slice(m, "weight", w_cut)
    if 0 in w_cut and m.bias is not None:
        _slice(m, "bias", {0: w_cut[0]})


def _sync_modules(gm: torch.fx.GraphModule, replaced: set[str], pred: "_Predictor", virtual: dict[str, int]) -> None:
    """Step 2: swap the attention modules in ``replaced`` and sync every other module's size attributes."""
    for qualname in _in_graph_order(gm, replaced):
        _replace_mha(gm, qualname, virtual)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in replaced:
            _sync_attributes(modules[node.target], node, pred, virtual)


def _in_graph_order(gm: torch.fx.GraphModule, targets: set[str]) -> list[str]:
    """The call_module nodes calling ``targets``, in graph order (one entry per call)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in targets]


def _rewrite_constants(gm: torch.fx.GraphModule, pred: "_Predictor", virtual: dict[str, int]) -> None:
    """Step 3: the graph constants that spell sizes, where the coupling rules left a hint."""
    for node in list(gm.graph.nodes):
        hints = node.meta
        if hints.get(meta.RESHAPE):
            _rewrite_sizes(node, pred)
        if meta.SPLIT in hints:
            _rewrite_split(node, hints[meta.SPLIT], pred)
        if meta.WINDOW_ATTENTION in hints:
            _rewrite_window_attention(node, hints[meta.WINDOW_ATTENTION], virtual)
        if meta.CONV_GROUPS in hints:
            _set_arg(node, 6, "groups", virtual[hints[meta.CONV_GROUPS]])
        if meta.LAYER_NORM_SHAPE in hints:
            k = hints[meta.LAYER_NORM_SHAPE]
            x = pred.shape(node.args[0])
            shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            if not isinstance(shape, torch.fx.Node) and not _has_node(shape):
                _set_arg(node, 1, "normalized_shape", list(x[len(x) - k :]))
        if meta.SDPA_SCALE in hints:
            q = node.args[0] if node.args else node.kwargs["query"]
            if pred.shape(q)[-1] != pred.orig(q)[-1]:
                node.kwargs = {**node.kwargs, "scale": hints[meta.SDPA_SCALE]}


def _rewrite_window_attention(node: torch.fx.Node, note: dict, virtual: dict[str, int]) -> None:
    """Swin attention with pruned heads or head widths: the explicit-width function, original scale."""
    H = virtual[f"{node.name}.num_heads"]
    _set_arg(node, 5, "num_heads", H)
    node.target = slim_shifted_window_attention
    node.kwargs = {**node.kwargs, "qk_head_dim": virtual[f"{node.name}.qk_head_dim"],
                   "v_head_dim": virtual[f"{node.name}.v_head_dim"], "scale": note["scale"]}


def _restore_state(gm: torch.fx.GraphModule, traced: TracedGraph) -> None:
    """The slim module keeps the original's per-module train/eval flags and frozen parameters.

    Slicing creates new ``nn.Parameter`` objects; ``requires_grad`` is copied back
    from the user's model by qualified name.
    """
    apply_modes(gm, traced.source_modes, traced.source_training)
    frozen = traced.source_requires_grad
    for n, p in gm.named_parameters(remove_duplicate=False):
        if n in frozen and p.requires_grad != frozen[n]:
            p.requires_grad_(frozen[n])


def _has_node(x) -> bool:
    found = []
    torch.fx.node.map_arg(x, lambda n: found.append(n))
    return bool(found)


def _check_same(a, b, name):
    a = np.zeros(0, np.int64) if a is None else a
    b = np.zeros(0, np.int64) if b is None else b
    if not np.array_equal(a, b):
        raise RewriteError(f"{name}: coupled slices disagree ({a.size} vs {b.size} removed)")


class _Predictor:
    """Predicted post-rewrite shapes of the original graph's node values."""

    def __init__(self, c, new_size):
        self.c, self.new_size = c, new_size

    def shape(self, node, path=()) -> tuple[int, ...]:
        out = []
        for d in range(len(self.orig(node, path))):
            sid = self.c.slot_of(node.name, path, d)
            if sid is None:
                raise RewriteError(f"no coupling slot for dim {d} of node '{node.name}'")
            out.append(self.new_size(sid))
        return tuple(out)

    def changed(self, sid: int) -> bool:
        return self.new_size(sid) != self.c.size(sid)

    def orig(self, node, path=()) -> tuple[int, ...]:
        spec = self.c.traced.node(node.name).meta[meta.SPEC]
        for p in path:
            spec = spec[p]
        return tuple(spec.shape)


def _replace_mha(gm, qualname: str, virtual: dict[str, int]) -> None:
    m = gm.get_submodule(qualname)
    H = virtual[f"{qualname}.num_heads"]
    dqk = virtual[f"{qualname}.qk_head_dim"]
    dv = virtual[f"{qualname}.v_head_dim"]
    E_in = m.in_proj_weight.shape[1]
    E_out = m.out_proj.weight.shape[0]
    if isinstance(m, SlimMultiheadAttention):
        before = (m.num_heads, m.qk_head_dim, m.v_head_dim, m.embed_dim, m.out_dim)
    else:
        before = (m.num_heads, m.head_dim, m.head_dim, m.embed_dim, m.embed_dim)
    if (H, dqk, dv, E_in, E_out) == before:
        return  # unchanged: keep the original module
    slim = SlimMultiheadAttention.from_tensors(
        m, m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias, H, dqk, dv
    )
    parent, _, attr = qualname.rpartition(".")
    setattr(gm.get_submodule(parent), attr, slim)


def _sync_attributes(m: nn.Module, node: torch.fx.Node, pred: _Predictor, virtual: dict[str, int]) -> None:
    """Make a module's size attributes agree with its (already sliced) tensors and predicted shapes."""
    name = node.target
    if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        k = m.weight.ndim - 2
        x, y = pred.shape(node.args[0]), pred.shape(node)
        cin, cout = x[len(x) - k - 1], y[len(y) - k - 1]
        groups = virtual.get(f"{name}.groups", m.groups)
        m.in_channels, m.out_channels, m.groups = cin, cout, groups
    elif isinstance(m, nn.Linear):
        m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]
    elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        x = pred.shape(node.args[0])
        if len(x) > 1:
            m.num_features = x[1]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = pred.shape(node.args[0])[1]
        m.num_groups = virtual.get(f"{name}.num_groups", m.num_groups)
    elif isinstance(m, nn.LayerNorm):
        x = pred.shape(node.args[0])
        m.normalized_shape = tuple(x[len(x) - len(m.normalized_shape) :])
    elif isinstance(m, nn.PReLU):
        m.num_parameters = m.weight.numel()
    elif isinstance(m, nn.Embedding):
        m.num_embeddings, m.embedding_dim = m.weight.shape


def _set_arg(node, pos: int, name: str, value) -> None:
    if len(node.args) > pos:
        args = list(node.args)
        args[pos] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, name: value}


def _rewrite_sizes(node: torch.fx.Node, pred: _Predictor) -> None:
    """Size arguments of view/reshape/expand/unflatten follow the predicted output shape.

    An argument is stale when its output dim changes size, or when it is a
    python value computed from a dim that changes (``C`` of ``B, N, C = x.shape``
    after the residual width shrinks, ``C // heads``).  A stale literal becomes
    the new size.  A stale computed value becomes ``-1`` when it is the only one
    of a view/reshape (so batch and sequence sizes stay dynamic), else the new
    size as a literal: pruned dims are channel dims, whose size never depends
    on the input.  Up-to-date computed values stay as they are.
    """
    out, orig = pred.shape(node), pred.orig(node)
    t = node.target
    infer_ok = t in ("view", "reshape", torch.reshape)
    if t in ("unflatten", torch.unflatten):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        d = dim % len(pred.orig(node.args[0]))
        new = _fix_seq(node, sizes, out[d : d + len(sizes)], orig[d : d + len(sizes)], pred, infer_ok=True)
        if new is not None:
            _set_arg(node, 2, "sizes", tuple(new))
        return
    for key in ("shape", "size"):
        if key in node.kwargs:
            new = _fix_seq(node, node.kwargs[key], out, orig, pred, infer_ok)
            if new is not None:
                node.kwargs = {**node.kwargs, key: tuple(new)}
            return
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple, torch.fx.Node)):
        new = _fix_seq(node, node.args[1], out, orig, pred, infer_ok)
        if new is not None:
            node.args = (node.args[0], tuple(new))
    else:
        new = _fix_seq(node, node.args[1:], out, orig, pred, infer_ok)
        if new is not None:
            node.args = (node.args[0], *new)


def _fix_seq(node, seq, out, orig, pred: _Predictor, infer_ok: bool) -> list | None:
    """New size arguments for one reshape-like node, or None when nothing is stale."""
    if isinstance(seq, torch.fx.Node):
        # a whole shape passed as one value (``x.view(y.shape)``): index it per dim
        if not _is_stale(seq, pred) and out == orig:
            return None
        with node.graph.inserting_before(node):
            seq = [node.graph.call_function(operator.getitem, (seq, i)) for i in range(len(out))]
    seq = list(seq)
    if len(seq) != len(out):
        raise RewriteError(f"size arguments {seq} of node '{node.name}' do not match the output rank {len(out)}")
    stale_values = [i for i, (v, n, o) in enumerate(zip(seq, out, orig))
                    if isinstance(v, torch.fx.Node) and (n != o or _is_stale(v, pred))]
    literal = [i for i, (v, n, o) in enumerate(zip(seq, out, orig)) if isinstance(v, int) and v != -1 and n != o]
    if not stale_values and not literal:
        return None
    new = list(seq)
    for i in literal:
        new[i] = out[i]
    infer = infer_ok and len(stale_values) == 1 and not any(isinstance(v, int) and v == -1 for v in seq)
    for i in stale_values:
        new[i] = -1 if infer else out[i]
    return new


def _is_stale(value: torch.fx.Node, pred: _Predictor) -> bool:
    """Does a python value computed from shapes depend on a dim whose size changes?"""
    return any(pred.changed(s) for s in pred.c.size_reads.get(value.name, ()))


def _rewrite_split(node: torch.fx.Node, dim: int, pred: _Predictor) -> None:
    paths = tensor_paths(pred.c.traced.node(node.name).meta[meta.SPEC])
    new = [pred.shape(node, p)[dim] for p in paths]
    old = [pred.orig(node, p)[dim] for p in paths]
    computed = _has_node((node.args[1:2], node.kwargs))  # sections read from a shape may be stale
    if new != old or computed:
        if "split_size_or_sections" in node.kwargs or "split_size" in node.kwargs:
            key = "split_size_or_sections" if "split_size_or_sections" in node.kwargs else "split_size"
            node.kwargs = {**node.kwargs, key: new}
        else:
            _set_arg(node, 1, "split_size_or_sections" if node.op == "call_function" else "split_size", new)


def verify_shapes(gm: torch.fx.GraphModule, traced: TracedGraph, pred: _Predictor) -> None:
    """Run the rewritten graph and compare every tensor's shape with the prediction."""
    with torch.no_grad():
        modes = {name: m.training for name, m in gm.named_modules()}
        gm.eval()
        try:
            Recorder(gm).run(*traced.example_inputs)
        except Exception as err:  # noqa: BLE001
            raise RewriteError(f"the slimmed graph fails on the example inputs: {type(err).__name__}: {err}") from err
        finally:
            for name, m in gm.named_modules():  # per module: a user's eval-mode submodule stays in eval
                m.training = modes[name]
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        spec = node.meta.get(meta.SPEC)
        for path in tensor_paths(spec):
            got = spec
            for p in path:
                got = got[p]
            want = pred.shape(node, path)
            if tuple(got.shape) != want:
                raise RewriteError(
                    f"node '{node.name}' has shape {tuple(got.shape)} after the rewrite, predicted {want}; "
                    "this is an oba_fx bug, please report it with the model"
                )
