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
(``passes.neg_theta``; ``shortcuts=False`` turns them off, same result): the
tangent of W·x is W(ẋ − x) and the tangent of its input gradient Wᵀ(ġ − g), one
product each instead of two.  With ``marginals=`` (what coupled-group scores need:
a weight's δ⊙q summed along its rows or columns) such a layer skips its
weight-gradient products altogether.  ``checkpoint=`` recomputes activations
segment by segment (``passes/checkpoint.py``).

The model output may be any pytree (a dict such as torchvision segmentation's
``{"out": …, "aux": …}``, a tuple, nested): f, Jδ, c and u are then lists over
its floating-point tensor leaves, ∇²ℓ is the loss Hessian over all of them, and
``loss_fn`` receives the structure itself.

Ops without forward-mode AD fall back to double backward (Pearlmutter's trick
with ``create_graph``), and the third-order term uses triple backward.  Ops
whose higher derivatives PyTorch lacks (hardsigmoid) run as exact composites
during scoring (``passes.exact_ops.ExactCurvatureOps``).  The data loop is
``passes.calibration.reduce``: batches are weighted by size, so streaming equals
the full-data computation; sums are accumulated in float64 and all-reduced over
the ranks of a process group.  The model runs in eval mode (restored afterwards),
with the math SDPA kernel, and its buffers are checked to be bit-identical afterwards.

This module owns the engine: :func:`curvature` (one pass, the per-batch products by
forward-over-reverse, double backward or triple backward) and :func:`scoring_mode`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
from torch.utils import _pytree as pytree

from . import distributed as _dist
from . import stateless
from .calibration import (Batch, CalibrationError, Sums, check_default_loss_output, default_loss, describe_output,
                          reduce, split_batch)
from .exact_ops import ExactCurvatureOps, composite_norms
from .modes import kept_modes
from .neg_theta import MarginalStore, NegThetaMode
from .errors import UsageError

__all__ = ["Curvature", "CalibrationError", "curvature", "default_loss", "split_batch", "QUANTITIES",
           "ExactCurvatureOps", "composite_norms", "check_default_loss_output", "scoring_mode"]

QUANTITIES = ("g", "H", "G", "F", "T3")
BACKENDS = ("auto", "fwad", "double-backward")


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


def _resolve_params(model: nn.Module, params: Sequence[str] | None) -> dict[str, torch.Tensor]:
    all_params = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in all_params.items() if p.requires_grad and p.is_floating_point()}
    missing = [n for n in params if n not in all_params]
    if missing:
        raise UsageError(f"params names no parameter of the model: {missing[:5]}; see model.named_parameters()")
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
    shortcuts: bool = True,
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
            ``checkpoint=``, distributed scoring and ``T3``; with ``shortcuts=False``
            every use lands in ``res.q``.
        shortcuts: the exact δ = −θ kernels of ``passes.neg_theta`` (linear,
            convolution, eval-mode batch norm) and the dual GELU; False runs
            PyTorch's own forward-AD formulas instead (same result, slower).

    Raises:
        CalibrationError: empty data, malformed batches, targets that do not fit
            the output, or a non-finite loss/gradient (naming the batch).
    """
    want = _check_request(want, backend)
    scored = _resolve_params(model, params)
    if not scored:
        raise UsageError("no parameters to score: the model has no floating parameters with requires_grad")
    direction = _direction(scored, direction)
    sg = _segmented(model, list(scored), want, backend, checkpoint) if checkpoint else None
    marginals = _marginal_request(scored, marginals, want, checkpoint)
    step = _Step(model, scored, direction, loss_fn, want, backend, sg, marginals, shortcuts)
    sums = Sums()
    device = next(iter(scored.values())).device
    lazy = set(marginals or ())
    for q in want:
        for n, p in scored.items():
            if n not in lazy:
                sums.zeros((q, n), p.shape, p.device)
    with scoring_mode(model), torch.enable_grad(), ExactCurvatureOps():
        reduce(calibration, step, device=device, sums=sums, micro_batch=micro_batch, progress=progress,
               desc=f"curvature {'+'.join(want)}")
    return _result(sums, step, direction, want, marginals)


def _check_request(want, backend: str) -> tuple[str, ...]:
    want = tuple(dict.fromkeys(want))
    bad = [w for w in want if w not in QUANTITIES]
    if bad:
        raise UsageError(f"unknown quantity {bad}; choose from {QUANTITIES}")
    if backend not in BACKENDS:
        raise UsageError(f"backend must be 'auto', 'fwad' or 'double-backward', got {backend!r}")
    return want


def _direction(scored, direction):
    """δ: the given one (checked against the scored parameters' shapes), or −θ."""
    if direction is None:
        return {n: -p.detach() for n, p in scored.items()}
    wrong = [n for n in scored if n not in direction or direction[n].shape != scored[n].shape]
    if wrong:
        raise UsageError(f"direction must give a tensor of the parameter's shape for {wrong[:5]}")
    return direction


def _segmented(model, names, want, backend, checkpoint):
    """The recomputing segmented graph of ``checkpoint=`` (``passes.checkpoint``)."""
    from .checkpoint import RecomputeError, SegmentedGraph

    if "T3" in want:
        raise RecomputeError("checkpoint= covers g, H, G and F; the third-order term (oba-k3) uses triple "
                             "backward, which recomputation cannot shorten. Use micro_batch= to save memory")
    if backend == "double-backward":
        raise RecomputeError("checkpoint= works with the forward-over-reverse backend; use backend='auto'")
    with scoring_mode(model):
        return SegmentedGraph(model, names, checkpoint)


def _marginal_request(scored, marginals, want, checkpoint):
    """``marginals=`` checked; None where it does not apply (checkpointing, T3, distributed scoring)."""
    if marginals is None:
        return None
    bad = {n: tuple(d) for n, d in marginals.items() if n not in scored or not set(d) <= {0, 1}
           or scored[n].ndim < 2}
    if bad:
        raise UsageError(f"marginals= takes scored weights (2-D or more) and dims 0 and 1, got {bad}")
    if checkpoint or "T3" in want or _dist.current() is not None:
        return None
    return marginals


class _Step:
    """One calibration batch's products, added to the sums weighted by its size.

    Keeps the backend across batches: "auto" starts with forward-over-reverse and falls back to double
    backward for good at the first op without forward-mode AD.
    """

    def __init__(self, model, scored, direction, loss_fn, want, backend, sg, marginals, shortcuts):
        self.model, self.scored, self.direction, self.want = model, scored, direction, want
        self.user_loss = loss_fn is not None
        self.loss_fn = loss_fn or default_loss
        self.backend, self.use = backend, backend
        self.sg, self.marginals, self.shortcuts = sg, marginals, shortcuts
        self.extra: dict[str, Any] = {}

    def __call__(self, batch: Batch, sums: Sums) -> None:
        loss_value, results = self._products(batch.inputs, batch.targets, batch.index)
        n = batch.size
        sums.add("loss", loss_value, n)
        for q, vals in results.pop("_marginals", {}).items():
            for name, dims in vals.items():
                for d, v in dims.items():
                    sums.add(("marginal", q, name, d), v, n)
        for q, vals in results.items():
            for name, v in vals.items():
                sums.add((q, name), v, n)

    def _products(self, inputs, targets, bi):
        args = (self.model, self.scored, self.direction, inputs, targets, self.loss_fn, self.user_loss, self.want,
                bi)
        if self.use in ("auto", "fwad"):
            try:
                with _clear_oom():
                    out = _batch_fwad(*args, sg=self.sg, marginals=self.marginals, shortcuts=self.shortcuts)
                self.use = "fwad"
                return out
            except NotImplementedError as err:
                self._fall_back(err)
        with _clear_oom():
            return _batch_double_backward(*args)

    def _fall_back(self, err: NotImplementedError) -> None:
        """Switch to double backward for an op without forward AD (or re-raise what is not that)."""
        if self.backend == "fwad" or "forward AD" not in str(err) and "forward-mode" not in str(err):
            raise err
        if self.sg is not None:
            from .checkpoint import RecomputeError

            raise RecomputeError(
                "checkpoint= needs forward-mode AD for every op, and this model has one without it "
                f"({str(err).splitlines()[0][:160]}). Score without checkpoint=, or with "
                "micro_batch= to save memory") from err
        self.use = "double-backward"
        self.extra["fallback_reason"] = str(err).splitlines()[0]


def _result(sums: Sums, step: _Step, direction, want, marginals) -> Curvature:
    """The per-sample means of the reduced sums, as a :class:`Curvature`."""
    res = Curvature(names=list(step.scored), direction=direction, n_samples=sums.samples, batches=sums.batches)
    res.extra.update(step.extra)
    means = sums.mean()
    macc: dict[str, dict[str, dict[int, torch.Tensor]]] = {q: {} for q in want}
    acc: dict[str, dict[str, torch.Tensor]] = {q: {} for q in want}
    for key, v in means.items():
        if key == "loss":
            continue
        if key[0] == "marginal":
            _, q, name, d = key
            macc[q].setdefault(name, {})[d] = v
        else:
            acc[key[0]][key[1]] = v
    for q in want:
        setattr(res, q, acc[q])
    res.marginals = macc if marginals is not None else None
    res.loss = means["loss"]
    res.backend = "forward-over-reverse" if step.use == "fwad" else "double-backward"
    return res


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


# --------------------------------------------------------------------------- forward-over-reverse, per batch


def _batch_fwad(model, scored, direction, inputs, targets, loss_fn, user_loss, want, bi, sg=None, marginals=None,
                shortcuts=True):
    """(loss, {q: {name: product}}) of one batch by forward-over-reverse (with ``"_marginals"`` when routed)."""
    names = list(scored)
    leaves = [scored[n].detach().requires_grad_(True) for n in names]
    if "T3" in want:
        return _batch_third_order(model, names, leaves, direction, inputs, targets, loss_fn, user_loss, want, bi,
                                  shortcuts=shortcuts)
    if set(want) == {"g"}:  # first order only: a plain forward and backward, no dual numbers
        return _batch_gradient(model, names, leaves, inputs, targets, loss_fn, user_loss, bi, sg)
    dirs = {n: direction[n].to(leaf.dtype) for leaf, n in zip(leaves, names)}
    store = MarginalStore({}) if marginals and sg is None and shortcuts else None
    fast = NegThetaMode(store) if shortcuts else contextlib.nullcontext()
    results: dict[str, dict[str, torch.Tensor]] = {}
    marg: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
    with fwAD.dual_level(), fast:
        res, saved = _dual_forward(model, names, leaves, dirs, inputs, bi, sg, store, marginals)
        outs = res.tensors
        prims, tangents = [], []
        for o in outs:
            p, t = fwAD.unpack_dual(o)
            prims.append(p)
            tangents.append(torch.zeros_like(p) if t is None else t)
        second = "H" in want or "G" in want
        loss, c, u = _output_side(res, prims, tangents if second else None, targets, loss_fn, user_loss, bi)
        plan = _cotangent_plan(want, c, u)
        _dual_backward(plan, outs, names, leaves, res, dirs, sg, saved, store, marginals, results)
        if store is not None:
            marg = _collected_marginals(store, plan)
    if "G" in want and "G" not in results:
        _gauss_newton_from_h_and_f(results, marg, names, marginals)
    for q, vals in marg.items():
        _check_finite({f"{n}[dim {d}]": v for n, m in vals.items() for d, v in m.items()}, f"the {q} marginals", bi)
    if store is not None:
        results["_marginals"] = {q: v for q, v in marg.items() if q in want}
    _check_finite(results["g"] if "g" in results else {}, "the gradient", bi)
    for q in ("H", "G", "F"):
        if q in results:
            _check_finite(results[q], f"the {q}δ product", bi)
    return float(loss), {q: v for q, v in results.items() if q in want or q == "_marginals"}


def _batch_gradient(model, names, leaves, inputs, targets, loss_fn, user_loss, bi, sg):
    """(loss, {"g": gradient}) by a plain forward and backward (no dual numbers)."""
    with torch.enable_grad():
        if sg is None:
            out = stateless.call(model, dict(zip(names, leaves)), inputs)
            _Output(out, bi)
            loss = _loss_at_output(out, targets, loss_fn, user_loss, bi)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else \
                [None] * len(leaves)
        else:
            out, saved = sg.forward(dict(zip(names, leaves)), inputs)
            res = _Output(out, bi)
            loss, c, _ = _output_side(res, res.tensors, None, targets, loss_fn, user_loss, bi)
            (grads,) = sg.backward(saved, dict(zip(names, leaves)), None, [res.full(c)])
    g = {n: torch.zeros_like(l) if gr is None else gr.detach() for n, gr, l in zip(names, grads, leaves)}
    _check_finite(g, "the gradient", bi)
    return float(loss.detach()), {"g": g}


def _dual_forward(model, names, leaves, dirs, inputs, bi, sg, store, marginals):
    """The forward on θ + εδ: (the output split into leaves, the segments' saved values or None)."""
    saved = None
    if sg is None:
        duals = [fwAD.make_dual(leaf, dirs[n]) for leaf, n in zip(leaves, names)]
        if store is not None:
            store.by_id = {id(d): (n, tuple(marginals[n])) for d, n in zip(duals, names) if n in marginals}
        out = stateless.call(model, dict(zip(names, duals)), inputs)
    else:
        out, saved = sg.forward({n: fwAD.make_dual(leaf, dirs[n]) for leaf, n in zip(leaves, names)}, inputs)
    return _Output(out, bi), saved


def _cotangent_plan(want, c, u) -> list:
    """(quantity, output cotangents) of each backward: H (c + εu), F (c + ε0), G (u); g rides on H or F."""
    plan = []
    if "H" in want:
        plan.append(("H", [fwAD.make_dual(ci, ui) for ci, ui in zip(c, u)]))
    if "F" in want:
        plan.append(("F", [fwAD.make_dual(ci, torch.zeros_like(ci)) for ci in c]))
    if "G" in want and not ("H" in want and "F" in want):  # with both, G = H − F afterwards
        plan.append(("G", u))
    if not any(q in ("H", "F") for q, _ in plan):
        plan.append(("g", c))  # the gradient needs its own backward when neither H nor F is asked for
    return plan


def _dual_backward(plan, outs, names, leaves, res, dirs, sg, saved, store, marginals, results) -> None:
    """Run the plan's backwards; the primal of a dual backward is g, its tangent the product (into results)."""
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


def _collected_marginals(store: MarginalStore, plan) -> dict:
    """``{q: {name: {dim: sum}}}`` from the store's records (g from the first backward that is not G's)."""
    marg: dict[str, dict[str, dict[int, torch.Tensor]]] = {}
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
    return marg


def _gauss_newton_from_h_and_f(results, marg, names, marginals) -> None:
    """Gδ = Hδ − Fδ (and its marginals), when both were computed and G had no backward of its own."""
    results["G"] = {n: _sub(results["H"].get(n), results["F"].get(n)) for n in names
                    if n in results["H"] or n in results["F"]}
    if marg:
        marg["G"] = {n: {d: v for d in marginals[n]
                         if (v := _sub(marg.get("H", {}).get(n, {}).get(d), marg.get("F", {}).get(n, {}).get(d)))
                         is not None} for n in set(marg.get("H", {})) | set(marg.get("F", {}))}


def _sub(a, b):
    if a is None:
        return None if b is None else -b
    return a if b is None else a - b


# --------------------------------------------------------------------------- the output side


def _loss_at_output(out_p, targets, loss_fn, user_loss, bi):
    if not user_loss:
        check_default_loss_output(out_p, targets, bi)
    try:
        loss = loss_fn(out_p, targets)
    except Exception as err:  # noqa: BLE001
        raise CalibrationError(
            f"batch {bi}: loss_fn(outputs of {describe_output(out_p)}, targets "
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
            raise CalibrationError(f"batch {bi}: the model returned {describe_output(out)}, with no floating-point tensor "
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


# --------------------------------------------------------------------------- double and triple backward


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
                       force_backward=False, shortcuts=True):
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
        if force_backward:
            _, more = _batch_double_backward(model, scored, direction, inputs, targets, loss_fn, user_loss,
                                             tuple(rest), bi)
        else:
            _, more = _batch_fwad(model, scored, direction, inputs, targets, loss_fn, user_loss, tuple(rest), bi,
                                  shortcuts=shortcuts)
        results.update(more)
    return float(loss.detach()), {q: v for q, v in results.items() if q in want}
