"""``oba_fx.compress``: score coupled groups, remove the least important to a FLOPs target, rewrite.

Each step traces the current model, scores every prunable group's channels on
calibration data, and removes the lowest-importance channels until the step's
FLOPs (or parameter) target is met.  The number of channels to remove is found
by bisection over the ranked list, so a step stops as soon as its target is met:
it overshoots by at most one channel's FLOPs.  Step targets follow a geometric
schedule and never pass the final target.

Every FLOPs figure (the original model, the bisection's candidates, the step
reports, the final before/after) comes from one counter,
:func:`oba_fx.counting.forward_cost`: on the meta device (the candidates are
rewrites of a meta copy of the traced graph; no weights are copied), or, when
the original model cannot run on meta, on its own device with the fused
attention/RNN kernels off.  The path taken is in ``report["flops_counter"]``.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from .passes import distributed as _dist
from .passes.curvature import CalibrationError, _check_targets, _to, default_loss, scoring_mode, split_batch
from .passes.compensate import DEFAULT_DAMPING
from .passes.modes import apply_modes
from .passes.norm_stats import reestimate_batchnorm
from .passes.rewrite import rewrite
from .passes.trace import TracedGraph

from .counting import COUNTERS, _to_meta, example_args, forward_cost
from .graph import Graph, trace
from .joint import JOINT_ROUNDS, JointModel
from .joint import select as select_joint
from .joint import units as removal_units
from .scoring import CRITERIA, _group_exact_parts, group_scores, rank_scores
from .latency_model import MAX_CORRECTIONS, LATENCY_TOLERANCE, LatencyTarget
from .widths import group_multiple, resolve_round_to

__all__ = ["compress", "CompressResult", "evaluate_loss", "DEFAULT_CRITERION", "DEFAULT_NORMALIZE", "SELECTIONS",
           "COMPRESS_CRITERIA"]

#: Criteria that select the removal set as a whole (``oba_fx.joint``) rather than rank channels one by one.
SELECTIONS = ("oba-joint",)
#: What ``compress(criterion=...)`` accepts by name.
COMPRESS_CRITERIA = CRITERIA + SELECTIONS

#: The defaults of ``compress`` and the CLI, chosen from benchmarks/results/accuracy.json by the rule in
#: ``benchmarks/report.py:recommend`` (tests/test_benchmarks.py checks they agree with the recorded data).
DEFAULT_CRITERION = "magnitude"
DEFAULT_NORMALIZE = "none"


@dataclass
class CompressResult:
    """What :func:`compress` returns.

    Attributes:
        model: the slimmed ``torch.fx.GraphModule``.
        report: JSON-able dict: FLOPs/params before and after, the counter
            that produced them (``flops_counter``: ``method`` "meta" or
            "device", ``fallback_reason``, ``description``), per-layer widths,
            groups removed, predicted vs measured ΔL per step, timings.
    """

    model: nn.Module
    report: dict = field(default_factory=dict)


@_dist.accepts_process_group
def evaluate_loss(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None) -> float:
    """Mean loss over ``batches`` in eval mode (mode restored, buffers untouched).

    With the default cross-entropy the targets are checked against the output
    first (class indices in [0, classes - 1], or probabilities of the output's
    shape), so a bad label is a ``CalibrationError`` naming the valid range.
    """
    user_loss = loss_fn is not None
    loss_fn = loss_fn or default_loss
    total, n = 0.0, 0
    device = next(model.parameters()).device
    with scoring_mode(model), torch.no_grad():
        for bi, batch in enumerate(batches):
            if not _dist.mine(bi):
                continue
            inputs, targets = split_batch(batch, bi)
            inputs, targets = _to(inputs, device), _to(targets, device)
            b = int(inputs[0].shape[0])
            out = model(*inputs)
            if not user_loss:
                if not isinstance(out, torch.Tensor):
                    raise CalibrationError(f"batch {bi}: the model returned {type(out).__name__}; the default "
                                           "cross-entropy needs one logits tensor: pass loss_fn=")
                _check_targets(out, targets, bi)
            total += float(loss_fn(out, targets)) * b
            n += b
    total, n = _dist.all_reduce_values(total, n)
    if n == 0:
        raise CalibrationError("calibration data is empty: give at least one (inputs, targets) batch")
    if not math.isfinite(total / n):
        raise CalibrationError(f"the calibration loss is {total / n} (not finite): check the inputs and the model "
                               "for NaN/inf")
    return total / n


class _Stream:
    """Calibration batches per step: all of them, or the next ``per_step`` of a cycling iterator."""

    def __init__(self, calibration, per_step: int | None):
        self.calibration = calibration
        self.per_step = per_step
        self._it = None

    def next(self) -> list:
        if self.per_step is None:
            batches = list(self.calibration)
        else:
            batches = []
            for _ in range(self.per_step):
                try:
                    if self._it is None:
                        raise StopIteration
                    batches.append(next(self._it))
                except StopIteration:
                    self._it = iter(self.calibration)
                    try:
                        batches.append(next(self._it))
                    except StopIteration:
                        break
        if not batches:
            raise CalibrationError("calibration data is empty: give at least one (inputs, targets) batch")
        return batches


def _bisection_graph(graph: Graph, method: str) -> TracedGraph:
    """The traced graph the bisection rewrites: a meta copy (no weights copied), or the real one.

    ``method`` is the path :func:`forward_cost` took for the original model; the
    candidates are counted on the same path, so the goal and the figures it is
    compared with come from one counter.
    """
    t = graph._traced
    if method != "meta":
        return t
    return TracedGraph(gm=_meta_copy(t.gm), example_inputs=_to_meta(t.example_inputs), ir=t.ir,
                       source_training=False)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose tensors are meta tensors; the weights are never copied.

    The deepcopy memo maps every parameter, buffer and plain tensor attribute to
    its meta stand-in before the copy starts, so the copy allocates no storage.
    """
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo.setdefault(id(b), b.detach().to("meta"))
    for m in module.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor):
                memo.setdefault(id(v), v.detach().to("meta"))
    return copy.deepcopy(module, memo)


def _candidate_cost(traced: TracedGraph, result, removal, measure: str, method: str) -> int:
    """Cost of ``traced`` with ``removal`` applied, by the library's one counter."""
    slim = rewrite(traced, result, removal, check=False) if removal else traced.gm
    if measure == "params":
        return sum(p.numel() for p in {id(p): p for p in slim.parameters()}.values())
    return forward_cost(slim, traced.example_inputs, on=method).flops


def _group_key(g) -> str:
    """Identity of a group across re-traces: its first producer/head/norm slice."""
    return g.label.split(" (")[0]


def _removal_from_order(units, counts_cap, sizes, multiples):
    """Remove the (group, channel) pairs ``units``, in order, capped per group, each group's kept count
    rounded up to its multiple (``multiples[gid]``, see ``oba_fx.widths.group_multiple``)."""
    take: dict[int, list[int]] = {}
    for gid, ch in units:
        take.setdefault(gid, []).append(ch)
    out = {}
    for gid, chans in take.items():
        n = min(len(chans), counts_cap[gid])
        m = multiples.get(gid, 1)
        if m > 1:
            keep = sizes[gid] - n
            keep = int(math.ceil(keep / m) * m) if keep % m else keep
            n = sizes[gid] - min(keep, sizes[gid])
        if n > 0:
            out[gid] = chans[:n]
    return out


def _blocked_order(values, caps, sizes, multiples, per_ms=None):
    """Global ranking in the blocks a rounded group can lose (``round_to``).

    A group of ``size`` channels with multiple ``m`` keeps ``size`` or a multiple of ``m``: it first loses
    ``size % m`` channels (or ``m`` when the size is a multiple), then ``m`` at a time, its least important
    channels first, up to its cap. Each block is ranked by the mean importance of its channels (divided by
    the milliseconds a channel of its group saves, with ``per_ms``: blocks that save nothing go last), and its
    channels follow one another in the order, so a ranked prefix removes whole blocks and the bisection lands
    block by block instead of stepping over channels that rounding would keep.
    """
    keyed = []
    for gid, vec in values.items():
        cap, m, size = caps[gid], multiples.get(gid, 1), sizes[gid]
        if cap <= 0:
            continue
        vals = vec.tolist()
        chans = torch.argsort(vec, stable=True).tolist()
        ms = None if per_ms is None else per_ms.get(gid, 0.0)
        start, b = 0, (size % m or m)
        while start + b <= cap:
            block = chans[start:start + b]
            mean = sum(vals[c] for c in block) / b
            key = (0, mean) if ms is None else (0, mean / ms) if ms > 1e-9 else (1, mean)
            keyed.append((key, gid, start, block))
            start, b = start + b, m
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [(gid, c) for _, gid, _, block in keyed for c in block]


#: The selection refines while it lands more than this fraction of the original below the goal.
FILL_TOLERANCE = 0.005
#: A FLOPs or params target may land at most this fraction of the original below its goal because of rounded
#: widths; beyond it every group's multiple halves (16 -> 8 -> ... -> 1) until the selection lands within it.
ROUNDING_SLACK = 0.02
#: At most this many refinements per step.
MAX_REFINEMENTS = 8


def _fill_to_goal(order, cost_of, goal, *, tol, on_unreachable, max_refinements=MAX_REFINEMENTS):
    """The removal (units taken in ranked order) whose cost is at most ``goal`` and closest to it.

    ``cost_of(units)`` is the cost after removing ``units``; it is non-increasing along any prefix of ``order``
    and of the reorderings below. Bisection finds the shortest prefix of ``order`` that meets the goal. Its last
    unit can remove much more than the gap left before it (a channel of a grouped-conv group is a whole conv
    group; a stem channel costs more than a head channel), landing more than ``tol`` below the goal. Two
    refinements then look for a removal closer to the goal, each repeated while the result stays more than
    ``tol`` below it (at most ``max_refinements`` times); the closest of the three results wins:

    - *defer*: the crossing unit is kept, its group stops at the width the prefix gave it, and the finer
      units of other groups ranked after it fill the gap (galloping, then bisection, from the prefix before it);
    - *pin*: the crossing unit is removed, and the most important units ranked before it are given back
      (bisection for the shortest ``pinned + prefix`` that still meets the goal).

    Returns (units, cost evaluations, the crossing units a refinement moved: deferred ones kept, pinned ones
    removed).
    """
    evals = 0

    def cost(seq):
        nonlocal evals
        evals += 1
        return cost_of(seq)

    def shortest(seq, lo, hi, c_hi):
        # cost(seq[:lo]) > goal >= cost(seq[:hi]) = c_hi: the smallest such hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            c = cost(seq[:mid])
            if c <= goal:
                hi, c_hi = mid, c
            else:
                lo = mid
        return hi, c_hi

    def gallop(seq, lo):
        # cost(seq[:lo]) > goal: the smallest k > lo with cost(seq[:k]) <= goal, or (None, None)
        step, hi = 1, len(seq)
        while lo < hi:
            probe = min(lo + step, hi)
            c = cost(seq[:probe])
            if c <= goal:
                return shortest(seq, lo, probe, c)
            lo, step = probe, step * 2
        return None, None

    c_all = cost(order)
    if c_all > goal:
        raise on_unreachable(c_all)
    # the caller knows that removing nothing misses the goal
    k0, c0 = shortest(list(order), 0, len(order), c_all)
    results = [(c0, list(order[:k0]), [])]

    def defer():
        seq, k, moved = list(order), k0, []
        for _ in range(max_refinements):
            if goal - results[-1][0] <= tol:
                return
            unit = seq[k - 1]
            moved.append(unit)
            # the crossing unit's group is kept at its prefix width: its next units would cross the same way
            seq = seq[:k - 1] + [u for u in seq[k:] if u[0] != unit[0]]
            k, c = gallop(seq, k - 1)
            if k is None:
                return
            results.append((c, seq[:k], list(moved)))

    def pin():
        seq, k, c, pinned = list(order), k0, c0, []
        for _ in range(max_refinements):
            if goal - c <= tol or k - 1 <= len(pinned):
                return
            pinned.append(seq[k - 1])
            head = len(pinned)
            seq = pinned + [u for u in seq[:k - 1] if u not in pinned] + seq[k:]
            c_head = cost(seq[:head])
            k, c = (head, c_head) if c_head <= goal else shortest(seq, head, k, c)
            results.append((c, seq[:k], list(pinned)))

    if goal - c0 > tol:
        defer()
        pin()
    c, best, moved = max(results, key=lambda r: r[0])
    return best, evals, moved


def _frozen_summary(graph: Graph, limit: int = 8) -> str:
    reasons = Counter(g.reason for g in graph.groups if not g.prunable)
    lines = [f"  {n} group(s): {r}" for r, n in reasons.most_common(limit)]
    return "\n".join(lines) if lines else "  (no groups at all)"


#: Layers the coupling analysis cannot slim yet (their channel structure lives inside one opaque kernel).
_UNSUPPORTED_LAYERS = (nn.RNNBase, nn.RNNCellBase, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                       nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _unsupported_layers(graph: Graph) -> list[str]:
    """``'name' (nn.Type)`` for every recurrent/Transformer module the traced graph calls as a leaf."""
    modules = dict(graph.gm.named_modules())
    found = {}
    for n in graph.gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, _UNSUPPORTED_LAYERS):
            found[n.target] = f"'{n.target}' (nn.{type(m).__name__})"
    return list(found.values())


def _unreachable_fix(graph: Graph, best: float) -> str:
    """The "Fix:" part of a target-cannot-be-reached message; ``best`` is the lowest reachable fraction."""
    layers = _unsupported_layers(graph)
    if not layers:
        return "Fix: a higher target, a larger max_layer_ratio, fewer ignored layers, or rules for the ops above."
    head = (f"Recurrent and Transformer layers (nn.LSTM/GRU/RNN, nn.TransformerEncoder/Decoder) are not yet "
            f"supported for pruning: {', '.join(layers)}. They keep all their channels, and so do the layers "
            "coupled to them, so compress can only prune the rest of the model")
    if best < 1 - 1e-9:
        return (f"{head}: at best {best:.1%} of the original here. Fix: a target of at least {best:.1%}, with "
                "ignore=[...] for any other layer to keep whole.")
    return (f"{head}, and here nothing else is removable. Fix: compress the parts of the model without these "
            "layers on their own (e.g. a convolutional or MLP submodule with its own example inputs), and "
            "ignore=[...] any layer there to keep whole.")


@_dist.accepts_process_group
def compress(
    model: nn.Module,
    example_inputs: Any,
    calibration: Iterable,
    *,
    target_flops: float | None = 0.5,
    target_params: float | None = None,
    target_latency: float | None = None,
    criterion: str = DEFAULT_CRITERION,
    loss_fn: Callable | None = None,
    steps: int = 1,
    scope: str = "global",
    max_layer_ratio: float = 0.9,
    round_to: int | str | None = "auto",
    backend: str = "onnxruntime",
    latency_batch: int = 1,
    ignore: Iterable[str] = (),
    finetune: Callable[[nn.Module, int], Any] | None = None,
    leaf_modules: Iterable = (),
    batches_per_step: int | None = None,
    normalize: str = DEFAULT_NORMALIZE,
    signed: bool = False,
    schedule: str = "geometric",
    probes: int = 16,
    seed: int = 0,
    progress: bool = True,
    micro_batch: int | None = None,
    checkpoint: bool | int = False,
    reestimate_bn: bool | Iterable = True,
    compensate: bool = True,
    damping: float = DEFAULT_DAMPING,
    joint_rounds: int = JOINT_ROUNDS,
) -> CompressResult:
    """Structured pruning to a FLOPs (or parameter) target.

    Args:
        model: the trained model; never modified.
        example_inputs: inputs for tracing and FLOPs counting: a tensor, or a
            tuple/list with one element per positional argument of ``forward``.
        calibration: iterable of (inputs, targets) batches; a DataLoader works.
        target_flops: fraction of the original FLOPs to keep, in (0, 1].
        target_params: fraction of the original parameters to keep (instead of FLOPs).
        target_latency: fraction of the original's measured latency to keep, in (0, 1]
            (instead of FLOPs), in ``backend`` at batch ``latency_batch`` on this machine's
            CPU. Selection runs against a per-layer latency table measured once per
            machine and cached (``oba_fx.latency_model``): units are ranked by importance
            per millisecond saved, the ranking is filled to the predicted goal, and the
            slim model is re-measured against the original (interleaved medians); while
            it misses the target by more than 5% the goal is corrected by the
            measured / predicted ratio (at most 3 times). ``report["latency"]`` holds the
            predicted and measured figures. Global scope, single-tensor-input models;
            not with ``oba-joint``.
        criterion: a name from ``oba_fx.CRITERIA`` (default ``DEFAULT_CRITERION``, the
            accuracy benchmark's choice by the rule in BENCHMARKS.md); ``"oba-joint"``,
            which selects the removal set as a whole by its exact second-order loss
            change (``oba_fx.joint``: the better of the group-exact and magnitude
            fills, then ``joint_rounds`` swap rounds of one HVP each); or a callable
            ``criterion(graph, batches) -> {group id: per-channel scores}`` (signed
            predicted loss changes, ranked like the built-in ones).
        loss_fn: batch-mean loss ``loss_fn(outputs, targets)``; default cross-entropy.
        steps: >1 prunes iteratively, re-tracing and re-scoring after each step.
        scope: "global" (one ranking over all groups) or "local" (the same
            fraction of every group).
        max_layer_ratio: at most this fraction of a group's original channels is removed.
        round_to: keep channel counts at multiples of this: ``"auto"`` (default) takes the
            multiple measured fastest for ``backend`` (``oba_fx.ROUND_TO``, from
            benchmarks/widths.py); an int; or None / 1 for any width. Heads, grouped
            convs and small groups round sensibly (``oba_fx.widths.group_multiple``).
            The target comes first: where whole blocks would land a FLOPs or params
            target more than ``ROUNDING_SLACK`` (2% of the original) below its goal,
            the multiples halve until it lands within that; the step report's
            ``rounding_relaxed`` lists the multiples tried.
        backend: the runtime the slim model is for, "onnxruntime" or "pytorch" (CPU);
            it picks ``round_to="auto"``'s multiple, and the runtime ``target_latency``
            is measured in.
        latency_batch: the batch size ``target_latency`` is measured at.
        ignore: module/parameter names whose channels are kept.
        finetune: ``finetune(model, step)`` run after each step (trains in place),
            e.g. ``lambda m, s: oba_fx.finetune(m, loader, epochs=1)``.
        leaf_modules: module types/names torch.fx should not trace into.
        batches_per_step: calibration batches per step (the next ones from a
            cycling iterator, so steps see fresh data); default all of them.
        normalize, signed: ranking options, see ``oba_fx.rank_scores``.
        schedule: "geometric" (keep target^(s/S) after step s) or "linear".
        probes: probes for obd / group-exact.
        seed: seed for random / probe criteria.
        micro_batch: split calibration batches into chunks of this many samples
            while scoring (less memory, same scores for a per-sample mean loss).
        checkpoint: activation checkpointing while scoring (True, or a number of
            graph segments): less memory for one more forward, same scores.
        reestimate_bn: True (default): after each step's rewrite, replace every
            BatchNorm's running statistics by their average over the step's
            calibration batches (``passes.norm_stats``); or an iterable of batches
            to use instead (a training loader: more data, better estimates); False
            keeps the sliced, stale statistics.
        compensate: True (default): after each rewrite, refit every consumer's kept
            input weights and bias by damped least squares against the original
            layer's output on the step's calibration batches (``passes.compensate``),
            before the BatchNorm re-estimation. Both defaults follow the one-shot
            benchmark by the rule in BENCHMARKS.md (``report.py:recommend_post``).
        damping: the compensation's λ, relative to the mean diagonal of each kept
            input Gram matrix.
        joint_rounds: swap rounds of ``oba-joint`` (one Hessian-vector product each).

    Returns:
        CompressResult with ``.model`` and ``.report``.

    Raises:
        ValueError: bad targets or options, or a target that frozen groups make
            unreachable (the message lists what is frozen and why, and names
            recurrent/Transformer layers, which are not yet supported).
        TypeError: ``example_inputs`` that ``model.forward`` cannot take.
        CalibrationError: empty data, NaN loss, targets that do not fit.
        TraceFailure: the model cannot be traced.
    """
    if target_flops is None and target_params is None and target_latency is None:
        raise ValueError("give target_flops=, target_params= or target_latency=, a fraction of the original "
                         "in (0, 1]")
    if target_latency is not None and target_params is not None:
        raise ValueError("give one of target_params= and target_latency=, not both")
    # target_latency, then target_params, take precedence over target_flops (which has a default)
    measure = "latency" if target_latency is not None else "params" if target_params is not None else "flops"
    target = {"latency": target_latency, "params": target_params, "flops": target_flops}[measure]
    if not isinstance(target, (int, float)) or isinstance(target, bool):
        raise ValueError(f"target_{measure} must be a number in (0, 1], got {target!r}")
    target = float(target)
    if not (0 < target <= 1) or math.isnan(target):
        raise ValueError(f"target_{measure}={target} must be a fraction of the original in (0, 1], e.g. 0.5")
    if not callable(criterion) and criterion not in COMPRESS_CRITERIA:
        raise ValueError(f"unknown criterion '{criterion}'; choose from {', '.join(COMPRESS_CRITERIA)}, or pass a "
                         "callable criterion(graph, batches) -> {group id: per-channel predicted loss change}")
    if criterion in SELECTIONS and scope != "global":
        raise ValueError(f"criterion '{criterion}' selects the removal set over all groups at once; use "
                         "scope='global' (or a per-channel criterion with scope='local')")
    if not isinstance(joint_rounds, int) or isinstance(joint_rounds, bool) or joint_rounds < 0:
        raise ValueError(f"joint_rounds must be an int >= 0, got {joint_rounds!r}")
    if scope not in ("global", "local"):
        raise ValueError(f"scope must be 'global' or 'local', got {scope!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not (0 < max_layer_ratio <= 1):
        raise ValueError(f"max_layer_ratio must be in (0, 1], got {max_layer_ratio}")
    round_multiple = resolve_round_to(round_to, backend)
    if measure == "latency":
        if criterion == "oba-joint":
            raise ValueError("target_latency does not support criterion 'oba-joint' yet (its swaps keep a FLOPs "
                             "budget); use target_flops=, or another criterion")
        if scope != "global":
            raise ValueError("target_latency ranks channels by importance per millisecond over all groups; use "
                             "scope='global'")
    if schedule not in ("geometric", "linear"):
        raise ValueError(f"schedule must be 'geometric' or 'linear', got {schedule!r}")
    if calibration is None:
        raise CalibrationError("calibration is None: give an iterable of (inputs, targets) batches")
    if iter(calibration) is calibration:  # a one-shot iterator: keep it for all steps
        calibration = list(calibration)
    if reestimate_bn is not True and reestimate_bn is not False:
        if not isinstance(reestimate_bn, Iterable) or isinstance(reestimate_bn, (str, bytes)):
            raise ValueError(f"reestimate_bn must be True, False or an iterable of (inputs, targets) batches, "
                             f"got {type(reestimate_bn).__name__}")
        if iter(reestimate_bn) is reestimate_bn:
            reestimate_bn = list(reestimate_bn)
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate must be True or False, got {compensate!r}")
    if not (isinstance(damping, (int, float)) and damping >= 0):
        raise ValueError(f"damping must be a number >= 0, got {damping!r}")
    ignore = tuple(ignore)
    args = example_args(model, example_inputs)
    t_start = time.perf_counter()

    cost0 = forward_cost(model, args)
    flops0, params0, method = cost0.flops, cost0.params, cost0.method
    lat = None
    if measure == "latency":
        lat = LatencyTarget(model, args, backend, latency_batch, None, LATENCY_REPEATS, progress)
    base = lat.original_ms if lat else params0 if measure == "params" else flops0
    final_goal = target * base
    stream = _Stream(calibration, batches_per_step)
    current: nn.Module = model
    original_sizes: dict[str, int] = {}
    step_reports = []
    widths_before = _widths(model)
    for step in range(1, steps + 1):
        frac = target ** (step / steps) if schedule == "geometric" else 1 - (1 - target) * step / steps
        goal = final_goal if step == steps else max(frac * base, final_goal)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if step > 1 else "default")
            graph = trace(current, args, leaf_modules=leaf_modules, ignore=ignore)
        t_trace = time.perf_counter() - t0
        groups = graph.prunable_groups
        if step == 1:
            original_sizes = {_group_key(g): g.size for g in graph.groups}
        counted = _bisection_graph(graph, method)
        multiples = {g.id: group_multiple(g, round_multiple) for g in groups}
        sizes = {g.id: g.size for g in groups}
        if lat is None:
            now = _candidate_cost(counted, graph._result, {}, measure, method)
        else:  # the current model, measured (step 1: the original)
            now = lat.original_ms if step == 1 else lat.measure(current)
        if now <= goal:
            step_reports.append({"step": step, "goal": goal, "before": now, "after": now, "removed": {},
                                 "removed_channels": {}, "channels_removed": 0, "note": "already at the target"})
            continue
        caps = {}
        for g in groups:
            orig = original_sizes.get(_group_key(g), g.size)
            max_removed_total = min(int(math.floor(max_layer_ratio * orig)), orig - 1)
            caps[g.id] = max(0, min(g.size - 1, max_removed_total - (orig - g.size)))
        lm = None
        if lat is not None:
            # uniformly slimmed copies (every group keeps about this fraction) calibrate the latency table
            slimmed = [_removal_from_order([(g.id, c) for g in groups for c in range(int(round((1 - f) * g.size)))],
                                           caps, sizes, multiples) for f in LATENCY_PROBES]
            lm = lat.model_for(graph, multiples, now, [r for r in slimmed if r])
        everything = {gid: list(range(n)) for gid, n in caps.items() if n}
        if lm is not None:
            floor_cost = lm.predict(everything) if everything else now
        else:
            floor_cost = _candidate_cost(counted, graph._result, everything, measure, method) if everything else now
        if floor_cost > goal:
            raise ValueError(
                f"the {measure} target cannot be reached: removing every removable channel "
                f"(max_layer_ratio={max_layer_ratio}) leaves {floor_cost / base:.1%} of the original {measure}, "
                f"above the step-{step} goal {goal / base:.1%}. {len(groups)} of {len(graph.groups)} groups are "
                f"prunable; frozen groups:\n{_frozen_summary(graph)}\n{_unreachable_fix(graph, floor_cost / base)}"
            )
        batches = stream.next()
        t0 = time.perf_counter()
        if callable(criterion):
            scores = {int(k): torch.as_tensor(v, dtype=torch.float64) for k, v in criterion(graph, batches).items()}
            bad = [g.id for g in groups if g.id not in scores or scores[g.id].shape != (g.size,)]
            if bad:
                raise ValueError(f"criterion callable must return one score per channel for every prunable group; "
                                 f"missing or mis-shaped for group ids {bad[:8]}")
        elif criterion == "oba-joint":
            # group-exact's two parts: its ranking is one start, its self terms enter the marginal costs
            first, self_terms, _ = _group_exact_parts(graph, batches, loss_fn, "auto", probes, seed + step,
                                                      progress)
            scores = {gid: first[gid] + 0.5 * self_terms[gid] for gid in first}
        else:
            scores = group_scores(graph, batches, criterion, loss_fn, probes=probes, seed=seed + step,
                                  progress=progress, micro_batch=micro_batch, checkpoint=checkpoint)
        t_score = time.perf_counter() - t0
        importance = rank_scores(scores, signed=signed, normalize=normalize)
        t0 = time.perf_counter()

        def ranked(values):
            rounded = any(m > 1 for m in multiples.values())
            if lm is not None:  # importance per millisecond saved, in removable blocks (1 channel unrounded)
                return _blocked_order(values, caps, sizes, multiples, lm.marginal(groups, multiples))
            if scope == "global" and rounded:
                return _blocked_order(values, caps, sizes, multiples)
            if scope == "global":
                keyed = sorted((float(v), gid, ch) for gid, vec in values.items() for ch, v in enumerate(vec.tolist()))
                return [(gid, ch) for _, gid, ch in keyed if caps[gid] > 0]
            # local: every group loses the same fraction; channels are ordered by their fractional rank
            # within their group ((r + 1) / size), so the bisection moves one channel at a time and the
            # per-group fractions never differ by more than one channel
            keyed = []
            for gid, vec in values.items():
                for r, ch in enumerate(torch.argsort(vec, stable=True).tolist()):
                    keyed.append(((r + 1) / sizes[gid], gid, int(ch)))
            keyed.sort()
            return [(gid, ch) for _, gid, ch in keyed if caps[gid] > 0]

        def removal_at(seq):
            return _removal_from_order(seq, caps, sizes, multiples)

        fills = {"evaluations": 0, "moved": {}}
        rounding_relaxed = []  # the multiples tried after rounding overshot the goal (see ROUNDING_SLACK)

        def cost_of(sub):
            if lm is not None:
                return lm.predict(removal_at(sub))
            return _candidate_cost(counted, graph._result, removal_at(sub), measure, method)

        def fill(seq, goal=goal):
            # the shortest ranked prefix whose rewrite meets the goal, refined when its last unit is coarse
            units, evals, moved = _fill_to_goal(
                seq, cost_of, goal, tol=FILL_TOLERANCE * base, on_unreachable=lambda c: ValueError(
                    f"the {measure} target cannot be reached with scope={scope!r}: the most this step can remove "
                    f"leaves {c / base:.1%} (goal {goal / base:.1%}). Frozen groups:\n{_frozen_summary(graph)}\n"
                    f"{_unreachable_fix(graph, c / base)}"))
            out = removal_at(units)
            fills["evaluations"] += evals
            fills["moved"][removal_units(out)] = moved
            return out

        joint_report = None
        if criterion == "oba-joint":
            model_q = JointModel(graph, batches, self_terms, loss_fn, micro_batch=micro_batch, checkpoint=checkpoint)
            starts = {"group-exact": ranked(importance),
                      "magnitude": ranked(group_scores(graph, batches, "magnitude", progress=False))}
            removal, joint_report = select_joint(model_q, starts, fill, rounds=joint_rounds, progress=progress)
        else:
            order = ranked(importance)
            removal = fill(order)
            while lm is None and max(multiples.values(), default=1) > 1:
                # rounding yields to the target: whole blocks that overshoot it by more than ROUNDING_SLACK
                # (few, wide groups: timm mobileone_s0 landed at 47.6% for a 50% goal) halve every multiple
                landed = _candidate_cost(counted, graph._result, removal, measure, method)
                if goal - landed <= ROUNDING_SLACK * base:
                    break
                multiples = {gid: max(1, m // 2) for gid, m in multiples.items()}
                finer = fill(ranked(importance))
                if _candidate_cost(counted, graph._result, finer, measure, method) > landed:
                    removal = finer
                rounding_relaxed.append({"multiple": max(multiples.values()), "overshoot": (goal - landed) / base})
        latency_report = None
        if lm is not None and step == steps:
            removal, latency_report = _land_latency(lat, lm, graph, order, fill, removal, goal, target, base)
        evals, moved = fills["evaluations"], fills["moved"][removal_units(removal)]
        t_select = time.perf_counter() - t0
        if not removal:  # target_latency only: the measured model already sits at the predicted goal
            step_reports.append({"step": step, "goal": goal, "before": now, "after": now, "removed": {},
                                 "removed_channels": {}, "channels_removed": 0,
                                 "note": "the selection removed nothing", **({"latency": latency_report}
                                                                             if latency_report else {})})
            continue
        # magnitude and random scores are not loss changes: no prediction to report for them; oba-joint
        # predicts the removal set's loss change as a whole
        if joint_report is not None:
            predicted = joint_report["predicted"]
        elif criterion in ("magnitude", "random"):
            predicted = None
        else:
            predicted = float(sum(scores[gid][torch.as_tensor(ch)].sum() for gid, ch in removal.items()))
        t0 = time.perf_counter()
        loss_before = evaluate_loss(graph.gm, batches, loss_fn)
        slim = graph.prune(removal)
        t_rewrite = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss_after = evaluate_loss(slim, batches, loss_fn)
        post = {"loss_after_rewrite": loss_after}
        if compensate:
            post["compensation"] = graph.compensate(slim, removal, batches, damping=damping)
            post["loss_after_compensation"] = loss_after = evaluate_loss(slim, batches, loss_fn)
        if reestimate_bn is not False:
            post["batchnorm"] = reestimate_batchnorm(slim, batches if reestimate_bn is True else reestimate_bn)
            post["loss_after_batchnorm"] = loss_after = evaluate_loss(slim, batches, loss_fn)
        t_post = time.perf_counter() - t0
        by_id = {g.id: g for g in groups}
        step_report = {
            "step": step,
            "goal": goal,
            "goal_fraction": goal / base,
            "before": now,
            "after": None,
            "channels_removed": int(sum(len(v) for v in removal.values())),
            "removed": {_group_key(by_id[gid]): len(ch) for gid, ch in removal.items()},
            "removed_channels": {_group_key(by_id[gid]): sorted(int(c) for c in ch) for gid, ch in removal.items()},
            "predicted_delta_loss": predicted,
            "measured_delta_loss": loss_after - loss_before,
            # the prediction is for the plain removal: compare it with this one
            "measured_delta_loss_rewrite": post["loss_after_rewrite"] - loss_before,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "bisection_evaluations": evals,
            # channels taken out of rank order to land on the goal (see _fill_to_goal)
            "out_of_order_channels": {_group_key(by_id[gid]): sorted(int(c) for g2, c in moved if g2 == gid)
                                      for gid in sorted({gid for gid, _ in moved})},
            "post_rewrite": post,
            **({"joint": joint_report} if joint_report is not None else {}),
            **({"latency": latency_report} if latency_report is not None else {}),
            **({"rounding_relaxed": rounding_relaxed} if rounding_relaxed else {}),
            "seconds": {"trace": t_trace, "score": t_score, "select": t_select, "rewrite": t_rewrite,
                        "post_rewrite": t_post},
        }
        if finetune is not None:
            t0 = time.perf_counter()
            finetune(slim, step)
            step_report["seconds"]["finetune"] = time.perf_counter() - t0
            step_report["loss_after_finetune"] = evaluate_loss(slim, batches, loss_fn)
        cost = forward_cost(slim, args, on=method)
        f, p = cost.flops, cost.params
        step_report["after"] = (lat.measure(slim) if step < steps else latency_report["measured_ms"]) \
            if lat is not None else p if measure == "params" else f
        step_report["flops_after"], step_report["params_after"] = f, p
        step_reports.append(step_report)
        current = slim
    if current is model:
        current = trace(model, args, leaf_modules=leaf_modules, ignore=ignore).gm
        apply_modes(current, {name: m.training for name, m in model.named_modules()}, model.training)
    cost1 = forward_cost(current, args, on=method)
    flops1, params1 = cost1.flops, cost1.params
    report = {
        "criterion": criterion if isinstance(criterion, str) else getattr(criterion, "__name__", "custom"),
        "scope": scope,
        "steps": steps,
        "target": {measure: target},
        "widths_rounding": {"round_to": round_to, "backend": backend, "multiple": round_multiple},
        "post_rewrite": {"compensate": compensate, "damping": damping if compensate else None,
                         "reestimate_bn": ("calibration batches" if reestimate_bn is True else
                                           "given batches" if reestimate_bn is not False else False)},
        "flops": {"before": flops0, "after": flops1, "ratio": flops1 / flops0 if flops0 else None},
        **({"latency": {"backend": backend, "batch": latency_batch, "threads": lat.threads,
                        "original_ms": lat.original_ms, **step_reports[-1].get("latency", {})}} if lat else {}),
        "flops_counter": {"method": method, "fallback_reason": cost0.note or None,
                          "description": COUNTERS[method]},
        "params": {"before": params0, "after": params1, "ratio": params1 / params0},
        "widths": {"before": widths_before, "after": _widths(current)},
        "step_reports": step_reports,
        "seconds_total": time.perf_counter() - t_start,
    }
    return CompressResult(model=current, report=report)


#: timed runs per latency measurement of a whole model (target_latency)
LATENCY_REPEATS = 15
#: width fractions of the uniformly slimmed copies that calibrate the latency table
LATENCY_PROBES = (0.3, 0.6)


def _land_latency(lat, lm, graph, order, fill, removal, goal, target, base):
    """Re-measure the selection against the original; correct the predicted goal while it misses the target.

    Each attempt rewrites the candidate and times it interleaved with the original. A miss by more than
    ``LATENCY_TOLERANCE`` scales the predicted goal by target / measured fraction and fills the ranking again
    (at most ``MAX_CORRECTIONS`` times); the attempt closest to the target wins.
    """
    attempts = []
    pred_goal = goal
    for k in range(MAX_CORRECTIONS + 1):
        if removal:
            o_ms, s_ms = lat.measure_pair(graph.prune(removal))
        else:  # the prediction put the unpruned model at the goal
            o_ms, s_ms = lat.measure_pair(graph.gm)
        frac = s_ms / o_ms
        attempts.append({"predicted_goal_ms": pred_goal, "predicted_ms": lm.predict(removal),
                         "predicted_fraction": lm.predict(removal) / base, "original_ms": o_ms, "measured_ms": s_ms,
                         "measured_fraction": frac, "removal": removal})
        if abs(frac / target - 1) <= LATENCY_TOLERANCE or k == MAX_CORRECTIONS:
            break
        pred_goal = pred_goal * target / frac
        try:
            removal = fill(order, goal=pred_goal)
        except ValueError:  # the corrected goal is beyond what this step can remove
            break
    best = min(attempts, key=lambda a: abs(a["measured_fraction"] / target - 1))
    report = {k: v for k, v in best.items() if k != "removal"}
    report["target_fraction"] = target
    report["attempts"] = [{k: v for k, v in a.items() if k != "removal"} for a in attempts]
    report["layers_in_table"] = len(lm.layers)
    report["calibration"] = lm.calibration
    report["fit"] = {"rest_ms": lm.rest_ms, "scale": lm.scale}
    report["table"] = str(lm.path)
    return best["removal"], report


def _widths(model: nn.Module) -> dict[str, list[int]]:
    """Per layer with a weight: its weight shape (out, in, ...)."""
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.ndim >= 1 and m is not model:
            out[name] = list(w.shape)
        elif type(m).__name__ in ("MultiheadAttention", "SlimMultiheadAttention"):
            out[name] = list(m.in_proj_weight.shape)
    return out
