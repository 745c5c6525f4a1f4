"""Curvature engine: exact gradient and Hessian-vector products of the mean loss.

For the mean loss L(θ) over a calibration set and a direction δ (by default
δ = −θ on the scored parameters) one streaming pass computes, exactly:

* ``g``  = ∇L
* ``H``  = Hδ                 full Hessian times δ
* ``G``  = Gδ = Jᵀ∇²ℓ Jδ      Gauss-Newton part
* ``F``  = Fδ = Hδ − Gδ       network-curvature part (the paper's graph walk)
* ``T3`` = ∇³L[δ, δ]           the third-order directional derivative (FastOBA's k = 3)

How.  The forward pass runs on dual numbers θ + εδ (``torch.autograd.forward_ad``),
which gives the output f and its tangent Jδ.  At the output, c = ∂ℓ/∂f and
u = ∇²ℓ·Jδ are cheap.  The backward pass through the dual graph with output
cotangent (c, ċ) returns the dual number (Jᵀc, Jᵀċ + J̇ᵀc): with ċ = u its tangent
is Hδ, with ċ = 0 it is Fδ = J̇ᵀc directly, and the primal is g either way.  Gδ
is a plain vector-Jacobian product with cotangent u.  This is
forward-over-reverse: one dual forward and one dual backward per quantity.

With the default δ = −θ, linear and convolution layers use an exact shortcut
(``_NegThetaMode``): the tangent of W·x is W(ẋ − x) and the tangent of its input
gradient Wᵀ(ġ − g), one product each instead of two.  With ``marginals=`` (what
coupled-group scores need: a weight's δ⊙q summed along its rows or columns) such a
layer skips its weight-gradient products altogether (``_MarginalLayer``).  ``checkpoint=`` recomputes
activations segment by segment (``passes/checkpoint.py``).

The model output may be any pytree (a dict such as torchvision segmentation's
``{"out": …, "aux": …}``, a tuple, nested): f, Jδ, c and u are then lists over
its floating-point tensor leaves, ∇²ℓ is the loss Hessian over all of them, and
``loss_fn`` receives the structure itself.

Ops without forward-mode AD fall back to double backward (Pearlmutter's trick
with ``create_graph``), and the third-order term uses triple backward.  Ops
whose higher derivatives PyTorch lacks (hardsigmoid) run as exact composites
during scoring (``ExactCurvatureOps``).  Batches
are weighted by size, so streaming equals the full-data computation; sums are
accumulated in float64.  The model runs in eval mode (restored afterwards), with
the math SDPA kernel, and its buffers are checked to be bit-identical afterwards.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from . import distributed as _dist
from .modes import kept_modes
from . import stateless

__all__ = ["Curvature", "CalibrationError", "curvature", "hvp", "default_loss", "split_batch", "QUANTITIES",
           "ExactCurvatureOps", "check_default_loss_output"]

QUANTITIES = ("g", "H", "G", "F", "T3")


class CalibrationError(ValueError):
    """The calibration data or the loss cannot be used for scoring."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; targets are class indices or class probabilities."""
    return F.cross_entropy(outputs, targets)


@dataclass
class Curvature:
    """Products accumulated over the calibration data (mean loss).

    Each of ``g, H, G, F, T3`` is ``{param name: float64 tensor}`` or None if
    not requested.  ``H, G, F, T3`` are applied to ``direction``.
    """

    names: list[str]
    direction: dict[str, torch.Tensor]
    n_samples: int = 0
    loss: float = 0.0
    g: dict[str, torch.Tensor] | None = None
    H: dict[str, torch.Tensor] | None = None
    G: dict[str, torch.Tensor] | None = None
    F: dict[str, torch.Tensor] | None = None
    T3: dict[str, torch.Tensor] | None = None
    backend: str = "forward-over-reverse"
    batches: int = 0
    marginals: dict[str, dict[str, dict[int, torch.Tensor]]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def split_batch(batch: Any, index: int) -> tuple[tuple, Any]:
    """(inputs tuple, targets) from one calibration item."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; each item must be an (inputs, targets) pair, "
            "e.g. a DataLoader over a TensorDataset(x, y)"
        )
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return inputs, targets


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def _check_targets(out: torch.Tensor, targets: Any, index: int) -> None:
    """Targets for the default cross-entropy must fit the output."""
    if not isinstance(targets, torch.Tensor):
        raise CalibrationError(f"batch {index}: targets must be a tensor, got {type(targets).__name__}")
    if out.ndim < 2:
        raise CalibrationError(
            f"batch {index}: the model output has shape {tuple(out.shape)}; cross-entropy needs (batch, classes, ...). "
            "Pass loss_fn= for other outputs"
        )
    C = out.shape[1]
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        want = (out.shape[0],) + tuple(out.shape[2:])
        if tuple(targets.shape) != want:
            raise CalibrationError(
                f"batch {index}: class-index targets have shape {tuple(targets.shape)} but the output "
                f"{tuple(out.shape)} needs targets of shape {want}"
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= C):
            raise CalibrationError(
                f"batch {index}: target classes must lie in [0, {C - 1}] for an output with {C} classes; "
                f"got values in [{int(targets.min())}, {int(targets.max())}]"
            )
    elif targets.is_floating_point():
        if targets.shape != out.shape:
            raise CalibrationError(
                f"batch {index}: probability targets have shape {tuple(targets.shape)}, the output {tuple(out.shape)}; "
                "give class indices (int64) or probabilities of the output's shape"
            )
    else:
        raise CalibrationError(f"batch {index}: targets of dtype {targets.dtype} are not supported by cross-entropy")


@contextlib.contextmanager
def scoring_mode(model: nn.Module):
    """Eval mode, math SDPA; restores every module's own mode and checks buffers are unchanged."""
    snapshot = {k: v.detach().clone() for k, v in model.named_buffers()}
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch
        ctx = contextlib.nullcontext()
    with kept_modes(model, training=False), ctx:
        yield
    for k, v in model.named_buffers():
        if k not in snapshot or not torch.equal(v, snapshot[k]):
            raise RuntimeError(f"oba_fx bug: buffer {k} changed during scoring")


def _layer_norm_composite(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _group_norm_composite(input, num_groups, weight=None, bias=None, eps=1e-5):
    B, C = input.shape[:2]
    x = input.reshape(B, num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    out = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = (1, C) + (1,) * (input.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _hardsigmoid_composite(input, inplace=False):
    # the CPU/CUDA kernel's own formula, min(max(x + 3, 0), 6) / 6, so values agree bit for bit
    out = torch.clamp(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


class ExactCurvatureOps(torch.overrides.TorchFunctionMode):
    """Runs ops whose higher derivatives PyTorch lacks, or gets wrong, as equal composites.

    * ``hardsigmoid`` (MobileNetV3's squeeze-excitation gate; in place too):
      ``aten::hardsigmoid_backward`` has neither a derivative nor a forward-AD
      formula, so Hδ, Fδ, ∇³L and every torch.func HVP fail.  The composite
      clamp(x + 3, 0, 6) / 6 has the exact derivatives: 1/6 on (−3, 3), 0
      elsewhere, and 0 for every higher order (the kinks at ±3 are measure zero).
    * with ``norms=True``, LayerNorm/GroupNorm (``F.*`` and ``torch.*``): the
      fused layer_norm's hand-written double backward is not itself correctly
      differentiable (its third derivative is wrong by ~10% on torch 2.14.1),
      and its vmap batching rules give asymmetric Hessians; the composite
      (mean, var, rsqrt) is exact to all orders.  Used for the third-order term
      and the vmapped group-exact products.

    The other piecewise-linear activations (hardswish, relu6, hardtanh,
    leaky_relu, elu) have correct derivatives of every order in all three paths
    (forward AD, double backward, torch.func), checked against dense Hessians in
    ``tests/test_piecewise_linear.py``, and run natively.

    A TorchFunctionMode, not a monkeypatch of ``torch.nn.functional``: it covers
    ``nn.Module`` versions (which call ``F.*``), graph modules that call
    ``torch.*`` directly, and leaves other threads alone.
    """

    def __init__(self, norms: bool = False):
        super().__init__()
        self.table = {
            F.hardsigmoid: _hardsigmoid_composite,
            torch._C._nn.hardsigmoid: _hardsigmoid_composite,
            torch._C._nn.hardsigmoid_: lambda input: _hardsigmoid_composite(input, inplace=True),
        }
        if norms:
            self.table.update({
                F.layer_norm: _layer_norm_composite,
                torch.layer_norm: lambda *a, **k: _layer_norm_composite(*a[:5], **_drop_cudnn(k)),
                F.group_norm: _group_norm_composite,
                torch.group_norm: lambda *a, **k: _group_norm_composite(*a[:5], **_drop_cudnn(k)),
            })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


def _drop_cudnn(kwargs):
    return {k: v for k, v in kwargs.items() if not k.startswith("cudnn")}


def composite_norms() -> ExactCurvatureOps:
    """``ExactCurvatureOps(norms=True)``: hardsigmoid and LayerNorm/GroupNorm as composites."""
    return ExactCurvatureOps(norms=True)


def _resolve_params(model: nn.Module, params: Sequence[str] | None) -> dict[str, torch.Tensor]:
    all_params = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in all_params.items() if p.requires_grad and p.is_floating_point()}
    missing = [n for n in params if n not in all_params]
    if missing:
        raise ValueError(f"params names no parameter of the model: {missing[:5]}; see model.named_parameters()")
    return {n: all_params[n] for n in params}


@_dist.accepts_process_group
def curvature(
    model: nn.Module,
    calibration: Iterable,
    want: Iterable[str] = ("g", "H"),
    direction: dict[str, torch.Tensor] | None = None,
    loss_fn: Callable | None = None,
    params: Sequence[str] | None = None,
    progress: bool = True,
    backend: str = "auto",
    micro_batch: int | None = None,
    checkpoint: bool | int = False,
    marginals: dict[str, Sequence[int]] | None = None,
) -> Curvature:
    """One pass over ``calibration`` computing the requested products.

    Args:
        model: the network; it is not modified (parameters are replaced by
            dual numbers through ``torch.func.functional_call``).
        calibration: iterable of ``(inputs, targets)``; a DataLoader works.
        want: subset of ``("g", "H", "G", "F", "T3")``.
        direction: ``{param name: tensor}``; default δ = −θ on the scored params.
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``, ``outputs`` being
            whatever the model returns (a tensor, dict, tuple ...); default
            cross-entropy, which needs a single logits tensor.
        params: names of scored parameters; default every floating parameter
            with ``requires_grad``.
        progress: show a tqdm bar.
        micro_batch: split every calibration batch into chunks of at most this
            many samples (less memory, same result for a per-sample mean loss such
            as the default cross-entropy: chunks are weighted by their size).
        checkpoint: activation checkpointing (``passes.checkpoint``): True cuts
            the traced graph into about √(nodes) segments, an int gives the
            number of segments.  Only the values crossing the cuts and one
            segment's activations are kept; each segment is recomputed in the
            backward (one more forward).  Same result.  Forward-over-reverse
            quantities only (g, H, G, F; not T3).
        backend: "auto" (forward-over-reverse, double backward where an op has
            no forward AD), "fwad" or "double-backward".
        marginals: ``{param name: dims ⊆ (0, 1)}`` of weights for which only
            sums of δ⊙q along those dims are needed (coupled-group scores).  A
            linear or convolution layer using such a weight with δ = −θ then
            skips its weight-gradient products and ``res.marginals[q][name][dim]``
            holds the sum of δ⊙q over every other dim from those uses
            (mean loss, like ``q``); ``res.q[name]`` holds the rest (uses through
            any other op) and is absent when there were none.  Ignored with
            ``checkpoint=``, distributed scoring and ``T3``.

    Raises:
        CalibrationError: empty data, malformed batches, targets that do not fit
            the output, or a non-finite loss/gradient (naming the batch).
    """
    want = tuple(dict.fromkeys(want))
    bad = [w for w in want if w not in QUANTITIES]
    if bad:
        raise ValueError(f"unknown quantity {bad}; choose from {QUANTITIES}")
    if backend not in ("auto", "fwad", "double-backward"):
        raise ValueError(f"backend must be 'auto', 'fwad' or 'double-backward', got {backend!r}")
    scored = _resolve_params(model, params)
    if not scored:
        raise ValueError("no parameters to score: the model has no floating parameters with requires_grad")
    names = list(scored)
    if direction is None:
        direction = {n: -p.detach() for n, p in scored.items()}
    else:
        wrong = [n for n in names if n not in direction or direction[n].shape != scored[n].shape]
        if wrong:
            raise ValueError(f"direction must give a tensor of the parameter's shape for {wrong[:5]}")
    user_loss = loss_fn is not None
    loss_fn = loss_fn or default_loss
    sg = None
    if checkpoint:
        from .checkpoint import RecomputeError, SegmentedGraph

        if "T3" in want:
            raise RecomputeError("checkpoint= covers g, H, G and F; the third-order term (oba-k3) uses triple "
                                  "backward, which recomputation cannot shorten. Use micro_batch= to save memory")
        if backend == "double-backward":
            raise RecomputeError("checkpoint= works with the forward-over-reverse backend; use backend='auto'")
        with scoring_mode(model):
            sg = SegmentedGraph(model, names, checkpoint)
    if marginals is not None:
        bad = {n: tuple(d) for n, d in marginals.items() if n not in scored or not set(d) <= {0, 1}
               or scored[n].ndim < 2}
        if bad:
            raise ValueError(f"marginals= takes scored weights (2-D or more) and dims 0 and 1, got {bad}")
        if checkpoint or "T3" in want or _dist.current() is not None:
            marginals = None
    lazy = set(marginals or ())
    acc: dict[str, dict[str, torch.Tensor]] = {
        q: {n: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for n, p in scored.items()
            if n not in lazy} for q in want
    }
    macc: dict[str, dict[str, dict[int, torch.Tensor]]] = {q: {} for q in want}
    res = Curvature(names=names, direction=direction)
    device = next(iter(scored.values())).device
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    it = calibration
    if progress and tqdm is not None:
        total = len(calibration) if hasattr(calibration, "__len__") else None
        it = tqdm(calibration, total=total, desc=f"curvature {'+'.join(want)}", leave=False)
    total_loss = 0.0
    use = backend
    with scoring_mode(model), torch.enable_grad(), ExactCurvatureOps():
        for bi, batch in enumerate(it):
            if not _dist.mine(bi):
                continue
            inputs, targets = split_batch(batch, bi)
            inputs, targets = _to(inputs, device), _to(targets, device)
            for inputs, targets in _micro(inputs, targets, micro_batch):
                n = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim else 1
                if use in ("auto", "fwad"):
                    try:
                        with _clear_oom():
                            out = _batch_fwad(model, scored, direction, inputs, targets, loss_fn, user_loss, want, bi,
                                              sg=sg, marginals=marginals)
                        use = "fwad"
                    except NotImplementedError as err:
                        if backend == "fwad" or "forward AD" not in str(err) and "forward-mode" not in str(err):
                            raise
                        if sg is not None:
                            from .checkpoint import RecomputeError

                            raise RecomputeError(
                                "checkpoint= needs forward-mode AD for every op, and this model has one without it "
                                f"({str(err).splitlines()[0][:160]}). Score without checkpoint=, or with "
                                "micro_batch= to save memory") from err
                        use = "double-backward"
                        res.extra["fallback_reason"] = str(err).splitlines()[0]
                if use == "double-backward":
                    with _clear_oom():
                        out = _batch_double_backward(model, scored, direction, inputs, targets, loss_fn, user_loss,
                                                     want, bi)
                loss_value, results = out
                total_loss += n * loss_value
                for q, vals in results.pop("_marginals", {}).items():
                    for name, dims in vals.items():
                        slot = macc[q].setdefault(name, {})
                        for d, v in dims.items():
                            if d in slot:
                                slot[d].add_(v, alpha=n)
                            else:
                                slot[d] = v.to(torch.float64) * n
                for q, vals in results.items():
                    for name, v in vals.items():
                        if name in acc[q]:
                            acc[q][name].add_(v.to(torch.float64), alpha=n)
                        else:
                            acc[q][name] = v.to(torch.float64) * n
                res.n_samples += n
            res.batches += 1
    if _dist.current() is not None:  # sums over all ranks' shards, in float64
        _dist.all_reduce_([acc[q][name] for q in want for name in names])
        n_all, loss_all, b_all = _dist.all_reduce_values(res.n_samples, total_loss, res.batches, device=device)
        res.n_samples, total_loss, res.batches = int(round(n_all)), loss_all, int(round(b_all))
    if res.n_samples == 0:
        raise CalibrationError("calibration data is empty: give at least one (inputs, targets) batch")
    for q in want:
        for name in acc[q]:
            acc[q][name].div_(res.n_samples)
        for dims in macc[q].values():
            for v in dims.values():
                v.div_(res.n_samples)
        setattr(res, q, acc[q])
    res.marginals = macc if marginals is not None else None
    res.loss = total_loss / res.n_samples
    res.backend = "forward-over-reverse" if use == "fwad" else "double-backward"
    return res


def _micro(inputs, targets, micro_batch):
    """The batch itself, or its chunks of ``micro_batch`` samples along dim 0."""
    if not micro_batch:
        yield inputs, targets
        return
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be a positive int, got {micro_batch}")
    n = int(inputs[0].shape[0])
    for i in range(0, n, micro_batch):
        sl = slice(i, i + micro_batch)
        yield (tuple(x[sl] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x for x in inputs),
               targets[sl] if isinstance(targets, torch.Tensor) and targets.ndim else targets)


@contextlib.contextmanager
def _clear_oom():
    """Turn an out-of-memory failure into an error that says what to do."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as err:
        text = str(err)
        if isinstance(err, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text or \
                "can't allocate memory" in text or "not enough memory" in text:
            raise MemoryError(
                "scoring ran out of memory. Lower the memory per step: micro_batch=K (splits each calibration "
                "batch, same result), checkpoint=True (recomputes activations, same result; CLI "
                "--activation-checkpoint), params=[...] to score a subset of layers, or smaller calibration batches. "
                f"(original error: {text.splitlines()[0][:200] if text else type(err).__name__})") from err
        raise


def _describe(out) -> str:
    """A model output for messages: a shape, or its structure with the shapes of its leaves."""
    shapes = pytree.tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else v, out)
    return f"shape {shapes}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__} {shapes}"


def check_default_loss_output(out, targets, bi: int) -> None:
    """The default cross-entropy needs one logits tensor whose shape fits the targets."""
    if not isinstance(out, torch.Tensor):
        key = next(iter(out), None) if isinstance(out, dict) else None
        pick = f"out[{key!r}]" if key is not None else "out[0]"
        raise CalibrationError(
            f"batch {bi}: the model returned {_describe(out)}; the default cross-entropy needs one logits tensor. "
            f"Pass loss_fn= taking the whole output, e.g. loss_fn=lambda out, y: F.cross_entropy({pick}, y)")
    _check_targets(out, targets, bi)


def _loss_at_output(out_p, targets, loss_fn, user_loss, bi):
    if not user_loss:
        check_default_loss_output(out_p, targets, bi)
    try:
        loss = loss_fn(out_p, targets)
    except Exception as err:  # noqa: BLE001
        raise CalibrationError(
            f"batch {bi}: loss_fn(outputs of {_describe(out_p)}, targets "
            f"{tuple(getattr(targets, 'shape', ()))}) failed: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise CalibrationError(f"batch {bi}: loss_fn must return a scalar mean loss, got {type(loss).__name__}")
    if not torch.isfinite(loss):
        raise CalibrationError(f"batch {bi}: the loss is {loss.item()}; check the inputs and the model for NaN/inf")
    return loss


def _check_finite(vals: dict[str, torch.Tensor], what: str, bi: int) -> None:
    for name, v in vals.items():
        if not torch.isfinite(v).all():
            raise CalibrationError(f"batch {bi}: {what} of {name} is not finite (NaN or inf)")


class _Output:
    """A model output pytree (a tensor, or a dict/tuple/list of them, nested) split into its leaves.

    ``tensors`` are the floating-point tensor leaves in ``torch.utils._pytree``
    order: the ones tangents and cotangents flow through.  The loss ℓ(f) is a
    function of all of them, so ∂ℓ/∂f, ∇²ℓ·ḟ and Jᵀc are lists over these
    leaves, and Jᵀc = Σ_i J_iᵀ c_i.  Other leaves (integer tensors, None,
    numbers) are passed to the loss as they are.
    """

    def __init__(self, out, bi: int):
        self.leaves, self.spec = pytree.tree_flatten(out)
        self.index = [i for i, v in enumerate(self.leaves) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        if not self.index:
            raise CalibrationError(f"batch {bi}: the model returned {_describe(out)}, with no floating-point tensor "
                                   "to differentiate")

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.leaves[i] for i in self.index]

    def rebuild(self, tensors: Sequence[torch.Tensor]):
        """The output structure with ``tensors`` in place of the floating-point leaves."""
        leaves = list(self.leaves)
        for i, t in zip(self.index, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, self.spec)

    def full(self, tensors: Sequence[torch.Tensor]) -> list:
        """``tensors`` spread over all leaf positions, None at the non-differentiable ones."""
        out: list = [None] * len(self.leaves)
        for i, t in zip(self.index, tensors):
            out[i] = t
        return out


def _output_side(res: _Output, prims, tangents, targets, loss_fn, user_loss, bi):
    """At the output: the loss, c = ∂ℓ/∂f and (tangents given) u = ∇²ℓ·ḟ, per tensor leaf of the output.

    ∇²ℓ is the Hessian of ℓ with respect to the whole output structure, so
    u_i = Σ_j ∂²ℓ/∂f_i∂f_j ḟ_j couples the leaves (e.g. a loss on "out" + "aux").
    """
    os = [p.detach().requires_grad_(True) for p in prims]
    with torch.enable_grad():
        loss = _loss_at_output(res.rebuild(os), targets, loss_fn, user_loss, bi)
        second = tangents is not None
        c = torch.autograd.grad(loss, os, create_graph=second, allow_unused=True) if loss.requires_grad else \
            [None] * len(os)
        c = [torch.zeros_like(o) if x is None else x for x, o in zip(c, os)]
        u = None
        if second:  # leaves the loss is linear in (or ignores) have no curvature: their c carries no graph
            pairs = [(x, t) for x, t in zip(c, tangents) if x.requires_grad]
            u = torch.autograd.grad([x for x, _ in pairs], os, [t.detach() for _, t in pairs],
                                    allow_unused=True) if pairs else [None] * len(os)
            u = [torch.zeros_like(o) if x is None else x.detach() for x, o in zip(u, os)]
    return loss.detach(), [x.detach() for x in c], u


def _vjp(outs, leaves, cotangents, retain_graph=False):
    """Σ_i J_iᵀ c_i over the output leaves that depend on ``leaves`` (None where a leaf is unused)."""
    pairs = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
    if not pairs:
        return [None] * len(leaves)
    return torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs], retain_graph=retain_graph,
                               allow_unused=True)


# --------------------------------------------------------------------------- δ = −θ fast path
#
# With δ_W = −W a linear map's tangent needs one product instead of two:
#   d/dε [(W − εW)(x + εẋ)] = W ẋ − W x = W (ẋ − x)
# and the tangent of its input-gradient likewise: Wᵀ ġ − Wᵀ g = Wᵀ (ġ − g).  Only the
# weight-gradient's tangent keeps two products (ẋ ⊗ g + x ⊗ ġ).  That is 7 instead of 9
# matrix products per layer for the forward-over-reverse pass.  It applies exactly when
# a weight's tangent equals minus its value (checked, not assumed), so any other
# direction takes the ordinary path.

#: switch for tests (the ordinary forward-AD formulas when False)
FAST_NEG_THETA = True


def _is_neg_theta(w) -> bool:
    if not isinstance(w, torch.Tensor):
        return False
    p, t = fwAD.unpack_dual(w)
    return t is not None and t.shape == p.shape and torch.equal(t, -p)


class _NegThetaLinear(torch.autograd.Function):
    """``x Wᵀ`` with ``δ_W = −W``. The subtractions ride in the GEMM (``addmm`` with β = −1): the output's
    tangent ``ẋWᵀ − y`` and the input-gradient's ``ġW − gW`` each cost one product and no extra pass."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        y = F.linear(x, w)
        ctx.y = y  # for jvp, which forward AD calls right after this (w always has a tangent here)
        return y

    @staticmethod
    def jvp(ctx, x_t, w_t):
        y = ctx.y
        del ctx.y
        if x_t is None:
            return -y
        w = fwAD.unpack_dual(ctx.saved_tensors[1]).primal
        k = y.shape[-1]
        return torch.addmm(y.reshape(-1, k), x_t.reshape(-1, x_t.shape[-1]), w.t(), beta=-1).reshape(y.shape)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        g2 = gp.reshape(-1, gp.shape[-1])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            p = g2 @ wp
            t = torch.addmm(p, gt.reshape(-1, gt.shape[-1]), wp, beta=-1) if gt is not None else -p
            gx = fwAD.make_dual(p.reshape(xp.shape), t.reshape(xp.shape))
        if ctx.needs_input_grad[1]:
            x2 = xp.reshape(-1, xp.shape[-1])
            t = g2.t() @ xt.reshape(-1, xt.shape[-1]) if xt is not None else None
            if gt is not None:
                gt2 = gt.reshape(-1, gt.shape[-1]).t()
                t = gt2 @ x2 if t is None else t.addmm_(gt2, x2)
            gw = fwAD.make_dual(g2.t() @ x2, torch.zeros_like(wp) if t is None else t)
        return gx, gw


class _NegThetaConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, conv, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.conv_args = (conv, stride, padding, dilation, groups)
        return conv(x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, x_t, w_t, *_):
        conv, stride, padding, dilation, groups = ctx.conv_args
        x, w = (fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        if x_t is None:
            return -conv(x, w, None, stride, padding, dilation, groups)
        return conv(x_t - x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        conv, stride, padding, dilation, groups = ctx.conv_args
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        nd = wp.ndim - 2
        expand = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
        st, pd, dl = expand(stride), expand(padding), expand(dilation)

        def bwd(grad, inp, mask):
            return torch.ops.aten.convolution_backward(grad, inp, wp, None, st, pd, dl, False, [0] * nd, groups,
                                                       mask)

        # 3 fused calls instead of 5: (g, x) and (ġ, x) each give their input- and weight-gradient in one
        # call (the input-gradient's tangent Wᵀ(ġ − g) is Wᵀġ − Wᵀg by linearity); only (g, ẋ) stands apart.
        nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        px, pw, _ = bwd(gp, xp, [nx, nw, False])
        tx = tw = None
        if gt is not None:
            tx, tw, _ = bwd(gt, xp, [nx, nw, False])
        gx = gw = None
        if nx:
            gx = fwAD.make_dual(px, tx - px if tx is not None else -px)
        if nw:
            t = bwd(gp, xt, [False, True, False])[1] if xt is not None else torch.zeros_like(wp)
            if tw is not None:
                t = t + tw
            gw = fwAD.make_dual(pw, t)
        return gx, gw, None, None, None, None, None


class _NegThetaBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm, a per-channel affine map ``y = x·a + b`` with ``a = γ/√(v+ε)``, ``b = β − μa``.

    With δ = −θ on γ (and on β, or no β) both ``a`` and ``b`` scale by (1 − ε), so ``ẏ = a ẋ − y``; the
    backward's dual products are ``∂L/∂x = g a`` (tangent ``ġ a − g a``), ``∂L/∂γ = Σ g x̂`` (tangent
    ``Σ ġ x̂ + Σ g ẋ/σ``) and ``∂L/∂β = Σ g`` (tangent ``Σ ġ``). Each of those is one call of PyTorch's fused
    eval-mode batch-norm backward (``Σ g ẋ/σ`` with a zero mean), where PyTorch's own forward AD of
    ``native_batch_norm_backward`` composes about twenty elementwise passes and costs as much as the
    convolutions around it.
    """

    @staticmethod
    def forward(ctx, x, w, b, mean, var, eps):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w, b)
        ctx.stats = (mean, var, eps, b is not None)
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        mean, var, eps, _ = ctx.stats
        x, w, b = (None if v is None else fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        if x_t is None:
            return -y
        a = (w * torch.rsqrt(var + eps)).reshape((1, -1) + (1,) * (x.ndim - 2))
        return (x_t * a).sub_(y)

    @staticmethod
    def backward(ctx, g):
        mean, var, eps, has_bias = ctx.stats
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = has_bias and ctx.needs_input_grad[2]

        def nbb(grad, inp, m, mask):  # fused eval-mode backward: (grad·a, Σ grad·(inp − m)/σ, Σ grad)
            return torch.ops.aten.native_batch_norm_backward(grad, inp, wp, m, var, None, None, False, eps, mask)

        gx_p, gw_p, gb_p = nbb(gp, xp, mean, [need_x, need_w, need_b])
        if gt is not None:
            gx_2, gw_2, gb_2 = nbb(gt, xp, mean, [need_x, need_w, need_b])
        gx = gw = gb = None
        if need_x:
            gx = fwAD.make_dual(gx_p, gx_2.sub_(gx_p) if gt is not None else -gx_p)
        if need_w:
            t = nbb(gp, xt, torch.zeros_like(mean), [False, True, False])[1] if xt is not None else \
                torch.zeros_like(wp)
            gw = fwAD.make_dual(gw_p, t + gw_2 if gt is not None else t)
        if need_b:
            gb = fwAD.make_dual(gb_p, gb_2 if gt is not None else torch.zeros_like(wp))
        return gx, gw, gb, None, None, None


def _gelu_second(x, approximate: str):
    """f''(x) of GELU, elementwise: exact ``φ(x)(2 − x²)``; tanh form ``(1 − t²)(u' + ½x(u'' − 2t u'²))``."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = x * x
        t = torch.tanh(c * (x + 0.044715 * x2 * x))
        du = c * (1.0 + 3 * 0.044715 * x2)
        return (1.0 - t * t) * (du + 0.5 * x * (c * 6 * 0.044715 * x - 2.0 * t * du * du))
    c = 1.0 / math.sqrt(2.0 * math.pi)
    h = x * x
    return h.mul(-c).add_(2.0 * c).mul_(h.mul_(-0.5).exp_())  # two buffers, six passes


class _DualGelu(torch.autograd.Function):
    """GELU whose input carries a tangent: ``ẏ = f'(x)ẋ`` and, in the backward, ``∂L/∂x = g f'(x)`` with
    tangent ``ġ f'(x) + g ẋ f''(x)``. ``f'`` products are PyTorch's fused ``gelu_backward``; PyTorch's own
    forward AD of ``gelu_backward`` composes about fifteen elementwise passes (a fifth of a ViT's scoring)."""

    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def jvp(ctx, x_t, _):
        x = fwAD.unpack_dual(ctx.saved_tensors[0]).primal
        return torch.ops.aten.gelu_backward(x_t, x, approximate=ctx.approximate)

    @staticmethod
    def backward(ctx, g):
        xp, xt = fwAD.unpack_dual(ctx.saved_tensors[0])
        gp, gt = fwAD.unpack_dual(g)
        a = ctx.approximate
        p = torch.ops.aten.gelu_backward(gp, xp, approximate=a)
        t = torch.ops.aten.gelu_backward(gt, xp, approximate=a) if gt is not None else None
        if xt is not None:
            s = _gelu_second(xp, a).mul_(gp)
            t = s.mul_(xt) if t is None else t.addcmul_(s, xt)
        return fwAD.make_dual(p, torch.zeros_like(p) if t is None else t), None


# --------------------------------------------------------------------------- group marginals
#
# A coupled group's score needs a weight's per-parameter score only summed along its member dims: its rows
# (output channels, dim 0) and columns (input channels, dim 1).  For a layer y = W·x with δ_W = −W those sums
# need no weight gradient at all.  For rows, Σ_c W_oc (gᵀx)_oc = Σ_n g_no (Wx)_no, and for columns,
# Σ_o W_oc (gᵀx)_oc = Σ_n x_nc (Wᵀg)_nc.  The same holds for the weight gradient's tangent ġᵀx + gᵀẋ, with
# Wẋ = ẏ + y and Wᵀġ = (Wᵀġ − Wᵀg) + Wᵀg, which the pass has anyway.  (For convolutions the sums run over
# batch and space, and for grouped ones the column sum folds the groups together.)  So with marginals a
# layer's backward costs its two input-gradient products and no weight-gradient product: 4 instead of 7
# matrix products per layer, plus a few elementwise passes.  The output y (bias included) and its tangent
# are kept by the mode for the batch.  An in-place op on them afterwards (a ReLU(inplace=True) straight after
# a bias-carrying conv) bumps their version, and the backward then recomputes them from x.


class _Marginals:
    """Per-batch store of the δ⊙(gradient) and δ⊙(gradient tangent) marginals of routed weights."""

    def __init__(self, by_id: dict[int, tuple[str, tuple[int, ...]]]):
        self.by_id = by_id
        self.q = None  # the quantity of the backward now running (set by _batch_fwad)
        self.records: dict[tuple[str, str], dict[str, dict[int, torch.Tensor]]] = {}
        self.kept: list = []

    def keep(self, *ts):
        self.kept.append([ts, [None if t is None else t._version for t in ts]])
        return len(self.kept) - 1

    def add(self, name: str, part: str, dim: int, vec: torch.Tensor):
        slot = self.records.setdefault((self.q, name), {}).setdefault(part, {})
        slot[dim] = vec.to(torch.float64) if dim not in slot else slot[dim].add_(vec.to(torch.float64))


def _bview(b, conv, ndim):
    return b if conv is None else b.reshape((1, -1) + (1,) * (ndim - 2))


#: elements per chunk of _dot's products (about 1 MB of float32: the product stays in cache)
_DOT_CHUNK = 1 << 18


def _dots(pairs: list, red: tuple[int, ...]) -> list:
    """``[(a * b).sum(red) for a, b in pairs]`` (red includes dim 0; every tensor of the same shape, a pair
    with None gives None) in one loop over chunks along dim 0: no product of the whole size is allocated (those
    of large activations page-fault in otherwise), and each chunk is read from memory once for all pairs."""
    live = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not live:
        return [None] * len(pairs)
    first = live[0][0]
    k = max(1, _DOT_CHUNK // max(1, first[0].numel())) if first.ndim else 1
    sums = None
    for i in range(0, first.shape[0] if first.ndim else 1, k):
        part = [(a[i:i + k] * b[i:i + k]).sum(red) if first.ndim else a * b for a, b in live]
        sums = part if sums is None else [acc.add_(v) for acc, v in zip(sums, part)]
    it = iter(sums)
    return [None if a is None or b is None else next(it) for a, b in pairs]


def _fold_groups(v: torch.Tensor, groups: int) -> torch.Tensor:
    return v if groups == 1 else v.reshape(groups, -1).sum(0)


class _MarginalLayer(torch.autograd.Function):
    """``y = W·x + b`` (F.linear or F.conv{1,2,3}d) with δ = −θ on W (and b); the backward returns the input
    gradient and the bias gradient as dual numbers and writes W's row and column marginals to the store,
    returning no weight gradient."""

    @staticmethod
    def forward(ctx, x, w, b, store, name, dims, frozen_bias, conv, stride, padding, dilation, groups):
        xp, wp = fwAD.unpack_dual(x).primal, fwAD.unpack_dual(w).primal
        bp = None if b is None else fwAD.unpack_dual(b).primal
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.meta = (store, name, dims, conv, stride, padding, dilation, groups, bp)
        ctx.frozen_bias = frozen_bias  # ḃ = 0 instead of −b (decided by the mode: forward sees no tangents)
        if conv is None:  # into a fresh tensor: F.linear of an N-d input returns a view, which in-place ops
            # on a custom Function's output reject (Swin V2's ReLU(inplace=True) after its MLP's linear)
            o, c = wp.shape
            y = torch.empty((*xp.shape[:-1], o), dtype=torch.result_type(xp, wp), device=xp.device)
            x2 = xp.reshape(-1, c)
            if bp is None:
                torch.mm(x2, wp.t(), out=y.view(-1, o))
            else:
                torch.addmm(bp, x2, wp.t(), out=y.view(-1, o))
        else:
            y = conv(xp, wp, bp, stride, padding, dilation, groups)
        ctx.slot = store.keep(y, None)
        return y

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        store, _, _, conv, stride, padding, dilation, groups, bp = ctx.meta
        kept = store.kept[ctx.slot]
        y = kept[0][0]
        if x_t is None:  # ẏ = −Wx − b = −y (or −Wx = b − y for a frozen bias); Wẋ = 0
            return _bview(bp, conv, y.ndim) - y if ctx.frozen_bias else -y
        x, w = (fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        if conv is None:
            k = y.shape[-1]
            yt = torch.addmm(y.reshape(-1, k), x_t.reshape(-1, x_t.shape[-1]), w.t(), beta=-1).reshape(y.shape)
        else:
            yt = conv(x_t, w, None, stride, padding, dilation, groups).sub_(y)
        if ctx.frozen_bias:
            yt = yt.add_(_bview(bp, conv, y.ndim))
        kept[0] = (y, yt)
        kept[1] = [y._version, yt._version]
        return yt

    @staticmethod
    def backward(ctx, g):
        store, name, dims, conv, stride, padding, dilation, groups, bp = ctx.meta
        x, w = ctx.saved_tensors
        xshape = x.shape
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        (y, yt), versions = store.kept[ctx.slot]
        dirty = y._version != versions[0] or (yt is not None and yt._version != versions[1])
        # the kept output is the very tensor forward AD attached ẏ to: its primal only (else every product with it
        # below would carry a tangent product too)
        y = fwAD.unpack_dual(y).primal
        yt = None if yt is None else fwAD.unpack_dual(yt).primal
        if dirty:  # modified in place after the forward: recompute from x (exact, one or two more products)
            y = F.linear(xp, wp, bp) if conv is None else conv(xp, wp, bp, stride, padding, dilation, groups)
            yt = None
            if xt is not None:
                wx = F.linear(xt, wp) if conv is None else conv(xt, wp, None, stride, padding, dilation, groups)
                yt = wx.sub_(y)
                if ctx.frozen_bias:
                    yt = yt.add_(_bview(bp, conv, y.ndim))
        if conv is None:
            red = (0,)
            o, c = wp.shape[0], wp.shape[-1]
            xp, xt = xp.reshape(-1, c), None if xt is None else xt.reshape(-1, c)
            gp, gt = gp.reshape(-1, o), None if gt is None else gt.reshape(-1, o)
            y, yt = y.reshape(-1, o), None if yt is None else yt.reshape(-1, o)
        else:
            red = (0,) + tuple(range(2, gp.ndim))
            nd = wp.ndim - 2
            expand = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
            st, pd, dl = expand(stride), expand(padding), expand(dilation)
        need_x = ctx.needs_input_grad[0]
        need_b = bp is not None and ctx.needs_input_grad[2]
        fold = groups if conv is not None else 1
        sums = need_b or (0 in dims and bp is not None)
        gsum = gp.sum(red) if sums else None
        gtsum = gt.sum(red) if sums and gt is not None else None
        if 0 in dims:
            # rows: −Σ g⊙(Wx) and −Σ (ġ⊙(Wx) + g⊙(Wẋ)), with Wx = y − b and Wẋ = ẏ + y (− b when b is frozen)
            gy, gty, gyt = _dots([(gp, y), (gt, y), (gp, yt)], red)
            store.add(name, "prim", 0, -(gy if bp is None else gy - bp * gsum))
            rt = None
            if gty is not None:
                rt = gty if bp is None else gty - bp * gtsum
            if gyt is not None:
                wxt = gyt + gy if not ctx.frozen_bias else gyt + gy - bp * gsum
                rt = wxt if rt is None else rt + wxt
            if rt is not None:
                store.add(name, "tan", 0, -rt)
        p = t = None  # Wᵀg and Wᵀġ − Wᵀg (the input gradient and its tangent)
        if need_x or 1 in dims:
            if conv is None:
                p = gp @ wp
                if gt is not None:
                    # Wᵀ(ġ − g): the difference on the narrower side of the product
                    t = (gt - gp) @ wp if wp.shape[0] < wp.shape[1] else torch.addmm(p, gt, wp, beta=-1)
            else:
                def back(grad):
                    return torch.ops.aten.convolution_backward(grad, xp, wp, None, st, pd, dl, False, [0] * nd,
                                                               groups, [True, False, False])[0]
                p = back(gp)
                if gt is not None:
                    t = back(gt).sub_(p)
        if 1 in dims:
            # columns: −Σ x⊙(Wᵀg) and −Σ (x⊙(Wᵀġ) + ẋ⊙(Wᵀg)), with Wᵀġ = t + Wᵀg
            xg, xtt, xtg = _dots([(xp, p), (xp, t), (xt, p)], red)
            store.add(name, "prim", 1, _fold_groups(-xg, fold))
            ct = None if xtt is None else xtt + xg
            if xtg is not None:
                ct = xtg if ct is None else ct + xtg
            if ct is not None:
                store.add(name, "tan", 1, _fold_groups(-ct, fold))
        gx = gb = None
        if need_x:
            gx = fwAD.make_dual(p.reshape(xshape), (t if t is not None else -p).reshape(xshape))
        if need_b:
            gb = fwAD.make_dual(gsum.reshape(bp.shape), (gtsum if gtsum is not None else torch.zeros_like(gsum))
                                .reshape(bp.shape))
        return gx, None, gb, None, None, None, None, None, None, None, None, None


class _NegThetaMode(torch.overrides.TorchFunctionMode):
    """Routes F.linear / F.conv{1,2,3}d whose weight has tangent −weight, eval-mode F.batch_norm whose
    weight (and bias) do, and F.gelu whose input has a tangent, to the functions above."""

    CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

    def __init__(self, marginals: _Marginals | None = None):
        super().__init__()
        self.hits = 0  # δ = −θ shortcuts taken (their condition is on the direction)
        self.gelu_hits = 0  # dual GELUs (exact for any direction)
        self.marginal_hits = 0  # layers whose weight gave marginals instead of a weight gradient
        self.marginals = marginals

    def _marginal(self, w, b, x):
        """(name, dims) when this weight is a routed leaf with δ = −θ (and its bias too, or none)."""
        if self.marginals is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        hit = self.marginals.by_id.get(id(w))
        frozen = b is not None and fwAD.unpack_dual(b).tangent is None
        if hit is None or not _is_neg_theta(w) or not (b is None or frozen or _is_neg_theta(b)):
            return None
        return (*hit, frozen)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            a = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                 **dict(zip(names, args)), **kwargs}
            stats = (a["running_mean"], a["running_var"])
            if (not a["training"] and all(isinstance(v, torch.Tensor) and fwAD.unpack_dual(v).tangent is None
                                          for v in stats)
                    and _is_neg_theta(a["weight"]) and (a["bias"] is None or _is_neg_theta(a["bias"]))
                    and a["input"].ndim >= 2):
                self.hits += 1
                return _NegThetaBatchNorm.apply(a["input"], a["weight"], a["bias"], a["running_mean"],
                                                a["running_var"], a["eps"])
            return func(*args, **kwargs)
        if func is F.gelu:
            a = {"approximate": "none", **dict(zip(("input", "approximate"), args)), **kwargs}
            x = a["input"]
            if (isinstance(x, torch.Tensor) and x.is_floating_point() and fwAD.unpack_dual(x).tangent is not None
                    and a["approximate"] in ("none", "tanh")):
                self.gelu_hits += 1
                return _DualGelu.apply(x, a["approximate"])
            return func(*args, **kwargs)
        if func is F.linear:
            a = {"bias": None, **dict(zip(("input", "weight", "bias"), args)), **kwargs}
            hit = self._marginal(a.get("weight"), a["bias"], a.get("input"))
            if hit is not None:
                self.hits += 1
                self.marginal_hits += 1
                return _MarginalLayer.apply(a["input"], a["weight"], a["bias"], self.marginals, *hit, None, 1, 0,
                                            1, 1)
            if _is_neg_theta(a.get("weight")):
                self.hits += 1
                y = _NegThetaLinear.apply(a["input"], a["weight"])
                return y if a["bias"] is None else y + a["bias"]
        elif func in self.CONVS:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            hit = None if isinstance(a["padding"], str) else self._marginal(a["weight"], a["bias"], a["input"])
            if hit is not None:
                self.hits += 1
                self.marginal_hits += 1
                return _MarginalLayer.apply(a["input"], a["weight"], a["bias"], self.marginals, *hit, func,
                                            a["stride"], a["padding"], a["dilation"], a["groups"])
            if not isinstance(a["padding"], str) and _is_neg_theta(a["weight"]):
                self.hits += 1
                y = _NegThetaConv.apply(a["input"], a["weight"], func, a["stride"], a["padding"], a["dilation"],
                                        a["groups"])
                b = a["bias"]
                return y if b is None else y + b.reshape((1, -1) + (1,) * self.CONVS[func])
        return func(*args, **kwargs)


def _batch_fwad(model, scored, direction, inputs, targets, loss_fn, user_loss, want, bi, sg=None, marginals=None):
    names = list(scored)
    leaves = [scored[n].detach().requires_grad_(True) for n in names]
    if "T3" in want:
        return _batch_third_order(model, names, leaves, direction, inputs, targets, loss_fn, user_loss, want, bi)
    results: dict[str, dict[str, torch.Tensor]] = {}
    if set(want) == {"g"}:  # first order only: a plain forward and backward, no dual numbers
        with torch.enable_grad():
            if sg is None:
                out = stateless.call(model, dict(zip(names, leaves)), inputs)
                res = _Output(out, bi)
                loss = _loss_at_output(out, targets, loss_fn, user_loss, bi)
                grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else \
                    [None] * len(leaves)
            else:
                out, saved = sg.forward(dict(zip(names, leaves)), inputs)
                res = _Output(out, bi)
                loss, c, _ = _output_side(res, res.tensors, None, targets, loss_fn, user_loss, bi)
                (grads,) = sg.backward(saved, dict(zip(names, leaves)), None, [res.full(c)])
        results["g"] = {n: torch.zeros_like(l) if gr is None else gr.detach() for n, gr, l in zip(names, grads, leaves)}
        _check_finite(results["g"], "the gradient", bi)
        return float(loss.detach()), results
    dirs = {n: direction[n].to(leaf.dtype) for leaf, n in zip(leaves, names)}
    store = None
    if marginals and sg is None and FAST_NEG_THETA:
        store = _Marginals({})
    fast = _NegThetaMode(store) if FAST_NEG_THETA else contextlib.nullcontext()
    with fwAD.dual_level(), fast:
        if sg is None:
            duals = [fwAD.make_dual(leaf, dirs[n]) for leaf, n in zip(leaves, names)]
            if store is not None:
                store.by_id = {id(d): (n, tuple(marginals[n])) for d, n in zip(duals, names) if n in marginals}
            out = stateless.call(model, dict(zip(names, duals)), inputs)
        else:
            out, saved = sg.forward({n: fwAD.make_dual(leaf, dirs[n]) for leaf, n in zip(leaves, names)}, inputs)
        res = _Output(out, bi)
        outs = res.tensors
        prims, tangents = [], []
        for o in outs:
            p, t = fwAD.unpack_dual(o)
            prims.append(p)
            tangents.append(torch.zeros_like(p) if t is None else t)
        second = "H" in want or "G" in want
        loss, c, u = _output_side(res, prims, tangents if second else None, targets, loss_fn, user_loss, bi)
        plan = []
        if "H" in want:
            plan.append(("H", [fwAD.make_dual(ci, ui) for ci, ui in zip(c, u)]))
        if "F" in want:
            plan.append(("F", [fwAD.make_dual(ci, torch.zeros_like(ci)) for ci in c]))
        if "G" in want and "H" in want and "F" in want:
            pass  # G = H - F below
        elif "G" in want:
            plan.append(("G", u))
        if not any(q in ("H", "F") for q, _ in plan):
            plan.append(("g", c))  # the gradient needs its own backward when neither H nor F is asked for
        if sg is not None:  # all cotangents in one recomputing backward
            all_grads = sg.backward(saved, dict(zip(names, leaves)), dirs, [res.full(cot) for _, cot in plan])
        for i, (q, cot) in enumerate(plan):
            if store is not None:
                store.q = q
            if sg is None:
                grads = _vjp(outs, leaves, cot, retain_graph=i < len(plan) - 1)
            else:
                grads = all_grads[i]
            prim, tang = {}, {}
            for n, gr, leaf in zip(names, grads, leaves):
                if gr is None and store is not None and n in marginals:
                    continue  # only marginals (or nothing) for this weight
                if gr is None:
                    prim[n] = torch.zeros_like(leaf)
                    tang[n] = torch.zeros_like(leaf)
                    continue
                p, t = fwAD.unpack_dual(gr)
                prim[n] = p.detach()
                tang[n] = torch.zeros_like(leaf) if t is None else t.detach()
            if q == "G":
                results["G"] = prim
            else:
                if "g" not in results:
                    results["g"] = prim
                if q != "g":
                    results[q] = tang
        marg: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
        if store is not None:
            g_from = next(q for q, _ in plan if q != "G")
            for (q, n), parts in store.records.items():
                if q == "G":
                    marg.setdefault("G", {})[n] = parts.get("prim", {})
                    continue
                if q == g_from:
                    marg.setdefault("g", {})[n] = parts.get("prim", {})
                if q != "g":
                    marg.setdefault(q, {})[n] = parts.get("tan", {})
            store.kept.clear()
    if "G" in want and "G" not in results:
        results["G"] = {n: _sub(results["H"].get(n), results["F"].get(n)) for n in names
                        if n in results["H"] or n in results["F"]}
        if marg:
            marg["G"] = {n: {d: v for d in marginals[n]
                             if (v := _sub(marg.get("H", {}).get(n, {}).get(d), marg.get("F", {}).get(n, {}).get(d)))
                             is not None} for n in set(marg.get("H", {})) | set(marg.get("F", {}))}
    for q, vals in marg.items():
        _check_finite({f"{n}[dim {d}]": v for n, m in vals.items() for d, v in m.items()}, f"the {q} marginals", bi)
    if store is not None:
        results["_marginals"] = {q: v for q, v in marg.items() if q in want}
    _check_finite(results["g"] if "g" in results else {}, "the gradient", bi)
    for q in ("H", "G", "F"):
        if q in results:
            _check_finite(results[q], f"the {q}δ product", bi)
    return float(loss), {q: v for q, v in results.items() if q in want or q == "_marginals"}


def _sub(a, b):
    if a is None:
        return None if b is None else -b
    return a if b is None else a - b


def _batch_double_backward(model, scored, direction, inputs, targets, loss_fn, user_loss, want, bi):
    """Pearlmutter's trick with create_graph: for ops without forward-mode AD."""
    names = list(scored)
    leaves = [scored[n].detach().requires_grad_(True) for n in names]
    if "T3" in want:
        return _batch_third_order(model, names, leaves, direction, inputs, targets, loss_fn, user_loss, want, bi,
                                  force_backward=True)
    dirs = [direction[n].to(leaf.dtype) for n, leaf in zip(names, leaves)]
    results = {}
    with torch.enable_grad():
        out = stateless.call(model, dict(zip(names, leaves)), inputs)
        res = _Output(out, bi)
        loss = _loss_at_output(out, targets, loss_fn, user_loss, bi)
        need_hess = any(q in want for q in ("H", "G", "F"))
        g = torch.autograd.grad(loss, leaves, create_graph=need_hess, allow_unused=True) if loss.requires_grad else \
            [None] * len(leaves)
        g = [torch.zeros_like(l) if x is None else x for x, l in zip(g, leaves)]
        results["g"] = {n: x.detach() for n, x in zip(names, g)}
        if "H" in want or "F" in want:
            pairs = [(x, d) for x, d in zip(g, dirs) if x.requires_grad]
            Hd = torch.autograd.grad([x for x, _ in pairs], leaves, [d for _, d in pairs], retain_graph=True,
                                     allow_unused=True) if pairs else [None] * len(leaves)
            results["H"] = {n: (torch.zeros_like(l) if x is None else x.detach()) for n, x, l in zip(names, Hd, leaves)}
        if "G" in want or "F" in want:
            # Jδ per output leaf by the double-vjp trick (s = Σ_i J_iᵀ w_i is linear in w, ∂⟨s, δ⟩/∂w_i = J_i δ),
            # then u = ∇²ℓ Jδ at the output, then Gδ = Jᵀu
            outs = res.tensors
            live = [k for k, o in enumerate(outs) if o.requires_grad]
            ws = [torch.zeros_like(outs[k], requires_grad=True) for k in live]
            Jd = [torch.zeros_like(o) for o in outs]
            if live:
                s = torch.autograd.grad([outs[k] for k in live], leaves, ws, create_graph=True, allow_unused=True)
                pairs = [(x, d) for x, d in zip(s, dirs) if x is not None and x.requires_grad]
                if pairs:
                    got = torch.autograd.grad([x for x, _ in pairs], ws, [d for _, d in pairs], retain_graph=True,
                                              allow_unused=True)
                    for k, x in zip(live, got):
                        if x is not None:
                            Jd[k] = x.detach()
            _, _, u = _output_side(res, [o.detach() for o in outs], Jd, targets, loss_fn, user_loss, bi)
            Gd = _vjp(outs, leaves, u)
            results["G"] = {n: (torch.zeros_like(l) if x is None else x.detach()) for n, x, l in zip(names, Gd, leaves)}
        if "F" in want:
            results["F"] = {n: results["H"][n] - results["G"][n] for n in names}
    _check_finite(results["g"], "the gradient", bi)
    return float(loss.detach()), {q: v for q, v in results.items() if q in want}


def _batch_third_order(model, names, leaves, direction, inputs, targets, loss_fn, user_loss, want, bi,
                       force_backward=False):
    """g, Hδ and ∇³L[δ,δ] by nested differentiation (triple backward); G and F as in the first-order pass."""
    dirs = [direction[n].to(leaf.dtype) for n, leaf in zip(names, leaves)]
    results = {}
    with torch.enable_grad(), composite_norms():
        out = stateless.call(model, dict(zip(names, leaves)), inputs)
        _Output(out, bi)
        loss = _loss_at_output(out, targets, loss_fn, user_loss, bi)
        g = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True) if loss.requires_grad else \
            [None] * len(leaves)
        g = [torch.zeros_like(l) if x is None else x for x, l in zip(g, leaves)]
        gd = sum((x * d).sum() for x, d in zip(g, dirs))
        Hd = torch.autograd.grad(gd, leaves, create_graph=True, allow_unused=True) if gd.requires_grad else \
            [None] * len(leaves)
        Hd = [torch.zeros_like(l) if x is None else x for x, l in zip(Hd, leaves)]
        hd = sum((x * d).sum() for x, d in zip(Hd, dirs))
        T3 = torch.autograd.grad(hd, leaves, allow_unused=True) if hd.requires_grad else [None] * len(leaves)
    results["g"] = {n: x.detach() for n, x in zip(names, g)}
    results["H"] = {n: x.detach() for n, x in zip(names, Hd)}
    results["T3"] = {n: (torch.zeros_like(l) if x is None else x.detach()) for n, x, l in zip(names, T3, leaves)}
    _check_finite(results["g"], "the gradient", bi)
    _check_finite(results["T3"], "the third-order term", bi)
    rest = [q for q in want if q in ("G", "F")]
    if rest:
        scored = dict(zip(names, [l.detach() for l in leaves]))
        fn = _batch_double_backward if force_backward else _batch_fwad
        _, more = fn(model, scored, direction, inputs, targets, loss_fn, user_loss, tuple(rest), bi)
        results.update(more)
    return float(loss.detach()), {q: v for q, v in results.items() if q in want}


def hvp(model, calibration, vector: dict[str, torch.Tensor], which: str = "H", loss_fn=None, progress=False):
    """``{name: (which)·v}`` for which in H, G, F over the calibration data (a convenience wrapper)."""
    res = curvature(model, calibration, want=(which,), direction=vector, loss_fn=loss_fn,
                    params=list(vector), progress=progress)
    return getattr(res, which)
