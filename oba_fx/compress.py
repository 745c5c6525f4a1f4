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

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .passes import distributed as _dist
from .passes.calibration import BatchStream, CalibrationError, Sums, check_targets, default_loss, reduce
from .passes.compensate import DEFAULT_DAMPING
from .passes.curvature import scoring_mode
from .passes.errors import UsageError
from .passes.modes import apply_modes
from .passes.norm_stats import reestimate_batchnorm

from .compress_plan import (COMPRESS_CRITERIA, DEFAULT_CRITERION, DEFAULT_NORMALIZE, SELECTIONS, CompressConfig,
                            StepReport, step_goals)
from .counting import COUNTERS, example_args, forward_cost
from .graph import Graph, trace
from .joint import JOINT_ROUNDS, JointModel
from .joint import select as select_joint
from .latency_model import MAX_CORRECTIONS, LATENCY_TOLERANCE, LatencyTarget
from .scoring import group_exact_parts, group_scores, rank_scores
from .selection import Selector, bisection_graph, removal_from_order
from .widths import group_multiple

__all__ = ["compress", "CompressResult", "evaluate_loss", "DEFAULT_CRITERION", "DEFAULT_NORMALIZE", "SELECTIONS",
           "COMPRESS_CRITERIA", "CompressConfig", "StepReport"]


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

    def step(batch, sums: Sums) -> None:
        out = model(*batch.inputs)
        if not user_loss:
            if not isinstance(out, torch.Tensor):
                raise CalibrationError(f"batch {batch.index}: the model returned {type(out).__name__}; the default "
                                       "cross-entropy needs one logits tensor: pass loss_fn=")
            check_targets(out, batch.targets, batch.index)
        sums.add("loss", float(loss_fn(out, batch.targets)), batch.size)

    with scoring_mode(model), torch.no_grad():
        loss = reduce(batches, step, device=next(model.parameters()).device).mean()["loss"]
    if not math.isfinite(loss):
        raise CalibrationError(f"the calibration loss is {loss} (not finite): check the inputs and the model "
                               "for NaN/inf")
    return loss


def frozen_summary(graph: Graph, limit: int = 8) -> str:
    reasons = Counter(g.reason for g in graph.groups if not g.prunable)
    lines = [f"  {n} group(s): {r}" for r, n in reasons.most_common(limit)]
    return "\n".join(lines) if lines else "  (no groups at all)"


#: Layers the coupling analysis cannot slim yet (their channel structure lives inside one opaque kernel).
UNSUPPORTED_LAYERS = (nn.RNNBase, nn.RNNCellBase, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def unsupported_layers(graph: Graph) -> list[str]:
    """``'name' (nn.Type)`` for every recurrent/Transformer module the traced graph calls as a leaf."""
    modules = dict(graph.gm.named_modules())
    found = {}
    for n in graph.gm.graph.nodes:
        m = modules.get(n.target) if n.op == "call_module" else None
        if isinstance(m, UNSUPPORTED_LAYERS):
            found[n.target] = f"'{n.target}' (nn.{type(m).__name__})"
    return list(found.values())


def unreachable_fix(graph: Graph, best: float) -> str:
    """The "Fix:" part of a target-cannot-be-reached message; ``best`` is the lowest reachable fraction."""
    layers = unsupported_layers(graph)
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
    cfg = CompressConfig(
        target_flops=target_flops, target_params=target_params, target_latency=target_latency, criterion=criterion,
        loss_fn=loss_fn, steps=steps, scope=scope, max_layer_ratio=max_layer_ratio, round_to=round_to,
        backend=backend, latency_batch=latency_batch, ignore=ignore, finetune=finetune, leaf_modules=leaf_modules,
        batches_per_step=batches_per_step, normalize=normalize, signed=signed, schedule=schedule, probes=probes,
        seed=seed, progress=progress, micro_batch=micro_batch, checkpoint=checkpoint, reestimate_bn=reestimate_bn,
        compensate=compensate, damping=damping, joint_rounds=joint_rounds)
    if calibration is None:
        raise CalibrationError("calibration is None: give an iterable of (inputs, targets) batches")
    if iter(calibration) is calibration:  # a one-shot iterator: keep it for all steps
        calibration = list(calibration)
    return _Run(model, example_args(model, example_inputs), calibration, cfg).run()


#: timed runs per latency measurement of a whole model (target_latency)
LATENCY_REPEATS = 15
#: width fractions of the uniformly slimmed copies that calibrate the latency table
LATENCY_PROBES = (0.3, 0.6)


class _Run:
    """One compress run: the original's cost, then trace -> score -> select -> rewrite per planned step."""

    def __init__(self, model: nn.Module, args: tuple, calibration, cfg: CompressConfig):
        self.model, self.args, self.cfg = model, args, cfg
        self.t_start = time.perf_counter()
        self.cost0 = forward_cost(model, args)
        self.method = self.cost0.method
        self.lat = None
        if cfg.measure == "latency":
            self.lat = LatencyTarget(model, args, cfg.backend, cfg.latency_batch, None, LATENCY_REPEATS, cfg.progress)
        self.base = (self.lat.original_ms if self.lat else self.cost0.params if cfg.measure == "params"
                     else self.cost0.flops)
        self.stream = BatchStream(calibration, cfg.batches_per_step)
        self.current: nn.Module = model
        self.original_sizes: dict[str, int] = {}
        self.widths_before = _widths(model)

    def run(self) -> CompressResult:
        cfg = self.cfg
        reports = []
        for step, goal in enumerate(step_goals(cfg.target, cfg.steps, cfg.schedule, self.base), start=1):
            reports.append(self._step(step, goal))
        return self._result(reports)

    # -- one step ------------------------------------------------------------------------------------------
    def _step(self, step: int, goal: float) -> StepReport:
        cfg, t0 = self.cfg, time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if step > 1 else "default")
            graph = trace(self.current, self.args, leaf_modules=cfg.leaf_modules, ignore=cfg.ignore)
        t_trace = time.perf_counter() - t0
        groups = graph.prunable_groups
        if step == 1:
            self.original_sizes = {g.key: g.size for g in graph.groups}
        counted = bisection_graph(graph, self.method)
        sel = Selector(graph, counted, caps=self._caps(groups), sizes={g.id: g.size for g in groups},
                       multiples={g.id: group_multiple(g, cfg.round_multiple) for g in groups}, measure=cfg.measure,
                       method=self.method, base=self.base, scope=cfg.scope, groups=groups,
                       unreachable=lambda c, goal: self._unreachable(graph, c, goal))
        if self.lat is None:
            now = sel.counted_cost({})
        else:  # the current model, measured (step 1: the original)
            now = self.lat.original_ms if step == 1 else self.lat.measure(self.current)
        if now <= goal:
            return StepReport(step, goal, now, now, note="already at the target")
        if self.lat is not None:
            sel.lm = self._latency_model(graph, groups, sel, now)
        self._check_reachable(graph, sel, now, goal, step)
        batches = self.stream.next()
        t0 = time.perf_counter()
        scores, self_terms = self._score(graph, groups, batches, step)
        t_score = time.perf_counter() - t0
        importance = rank_scores(scores, signed=cfg.signed, normalize=cfg.normalize)
        t0 = time.perf_counter()
        removal, joint_report, latency_report = self._select(sel, graph, batches, importance, self_terms, goal, step)
        t_select = time.perf_counter() - t0
        if not removal:  # target_latency only: the measured model already sits at the predicted goal
            return StepReport(step, goal, now, now, note="the selection removed nothing", latency=latency_report)
        rep = self._removal_report(StepReport(step, goal, now), graph, groups, removal, sel, scores, joint_report)
        rep.latency, rep.joint = latency_report, joint_report
        rep.rounding_relaxed = sel.rounding_relaxed
        rep.seconds = {"trace": t_trace, "score": t_score, "select": t_select}
        self.current = self._rewrite(graph, removal, batches, rep)
        return rep

    def _caps(self, groups) -> dict[int, int]:
        """Channels each group may still lose: max_layer_ratio of its original size, and one kept."""
        caps = {}
        for g in groups:
            orig = self.original_sizes.get(g.key, g.size)
            max_removed_total = min(int(math.floor(self.cfg.max_layer_ratio * orig)), orig - 1)
            caps[g.id] = max(0, min(g.size - 1, max_removed_total - (orig - g.size)))
        return caps

    def _latency_model(self, graph, groups, sel: Selector, now: float):
        # uniformly slimmed copies (every group keeps about this fraction) calibrate the latency table
        slimmed = [removal_from_order([(g.id, c) for g in groups for c in range(int(round((1 - f) * g.size)))],
                                      sel.caps, sel.sizes, sel.multiples) for f in LATENCY_PROBES]
        return self.lat.model_for(graph, sel.multiples, now, [r for r in slimmed if r])

    def _check_reachable(self, graph, sel: Selector, now: float, goal: float, step: int) -> None:
        everything = {gid: list(range(n)) for gid, n in sel.caps.items() if n}
        if sel.lm is not None:
            floor_cost = sel.lm.predict(everything) if everything else now
        else:
            floor_cost = sel.counted_cost(everything) if everything else now
        if floor_cost > goal:
            measure, base = self.cfg.measure, self.base
            raise UsageError(
                f"the {measure} target cannot be reached: removing every removable channel "
                f"(max_layer_ratio={self.cfg.max_layer_ratio}) leaves {floor_cost / base:.1%} of the original "
                f"{measure}, above the step-{step} goal {goal / base:.1%}. {len(graph.prunable_groups)} of "
                f"{len(graph.groups)} groups are prunable; frozen groups:\n{frozen_summary(graph)}\n"
                f"{unreachable_fix(graph, floor_cost / base)}")

    def _unreachable(self, graph, c: float, goal: float) -> UsageError:
        measure, base = self.cfg.measure, self.base
        return UsageError(
            f"the {measure} target cannot be reached with scope={self.cfg.scope!r}: the most this step can remove "
            f"leaves {c / base:.1%} (goal {goal / base:.1%}). Frozen groups:\n{frozen_summary(graph)}\n"
            f"{unreachable_fix(graph, c / base)}")

    def _score(self, graph, groups, batches, step: int):
        """(per-channel signed scores per group, oba-joint's self terms or None)."""
        cfg = self.cfg
        if callable(cfg.criterion):
            raw = cfg.criterion(graph, batches)
            scores = {int(k): torch.as_tensor(v, dtype=torch.float64) for k, v in raw.items()}
            bad = [g.id for g in groups if g.id not in scores or scores[g.id].shape != (g.size,)]
            if bad:
                raise UsageError(f"criterion callable must return one score per channel for every prunable group; "
                                 f"missing or mis-shaped for group ids {bad[:8]}")
            return scores, None
        if cfg.criterion == "oba-joint":
            # group-exact's two parts: its ranking is one start, its self terms enter the marginal costs
            first, self_terms, _ = group_exact_parts(graph, batches, cfg.loss_fn, "auto", cfg.probes,
                                                     cfg.step_seed(step), cfg.progress)
            return {gid: first[gid] + 0.5 * self_terms[gid] for gid in first}, self_terms
        return group_scores(graph, batches, cfg.criterion, cfg.loss_fn, probes=cfg.probes, seed=cfg.step_seed(step),
                            progress=cfg.progress, micro_batch=cfg.micro_batch, checkpoint=cfg.checkpoint), None

    def _select(self, sel: Selector, graph, batches, importance, self_terms, goal: float, step: int):
        """(removal, oba-joint's report or None, the latency landing's report or None)."""
        cfg = self.cfg
        if cfg.criterion == "oba-joint":
            model_q = JointModel(graph, batches, self_terms, cfg.loss_fn, micro_batch=cfg.micro_batch,
                                 checkpoint=cfg.checkpoint)
            starts = {"group-exact": sel.ranked(importance),
                      "magnitude": sel.ranked(group_scores(graph, batches, "magnitude", progress=False))}
            removal, joint_report = select_joint(model_q, starts, lambda seq: sel.fill(seq, goal),
                                                 rounds=cfg.joint_rounds, progress=cfg.progress)
            return removal, joint_report, None
        order, removal = sel.select(importance, goal)
        if sel.lm is not None and step == cfg.steps:
            removal, latency_report = _land_latency(self.lat, sel.lm, graph, order,
                                                    lambda seq, goal=goal: sel.fill(seq, goal), removal, goal,
                                                    cfg.target, self.base)
            return removal, None, latency_report
        return removal, None, None

    def _removal_report(self, rep: StepReport, graph, groups, removal, sel: Selector, scores, joint_report):
        by_id = {g.id: g for g in groups}
        moved = sel.moved_for(removal)
        # magnitude and random scores are not loss changes: no prediction to report for them; oba-joint
        # predicts the removal set's loss change as a whole
        if joint_report is not None:
            rep.predicted_delta_loss = joint_report["predicted"]
        elif self.cfg.criterion in ("magnitude", "random"):
            rep.predicted_delta_loss = None
        else:
            rep.predicted_delta_loss = float(sum(scores[gid][torch.as_tensor(ch)].sum()
                                                 for gid, ch in removal.items()))
        rep.goal_fraction = rep.goal / self.base
        rep.channels_removed = int(sum(len(v) for v in removal.values()))
        rep.removed = {by_id[gid].key: len(ch) for gid, ch in removal.items()}
        rep.removed_channels = {by_id[gid].key: sorted(int(c) for c in ch) for gid, ch in removal.items()}
        rep.bisection_evaluations = sel.evaluations
        rep.out_of_order_channels = {by_id[gid].key: sorted(int(c) for g2, c in moved if g2 == gid)
                                     for gid in sorted({gid for gid, _ in moved})}
        return rep

    def _rewrite(self, graph, removal, batches, rep: StepReport) -> nn.Module:
        """Rewrite, then compensation and BatchNorm re-estimation, fine-tuning, and the step's after-figures."""
        cfg, t0 = self.cfg, time.perf_counter()
        loss_before = evaluate_loss(graph.gm, batches, cfg.loss_fn)
        slim = graph.prune(removal)
        rep.seconds["rewrite"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss_after = evaluate_loss(slim, batches, cfg.loss_fn)
        post = {"loss_after_rewrite": loss_after}
        if cfg.compensate:
            post["compensation"] = graph.compensate(slim, removal, batches, damping=cfg.damping)
            post["loss_after_compensation"] = loss_after = evaluate_loss(slim, batches, cfg.loss_fn)
        if cfg.reestimate_bn is not False:
            post["batchnorm"] = reestimate_batchnorm(slim, batches if cfg.reestimate_bn is True else cfg.reestimate_bn)
            post["loss_after_batchnorm"] = loss_after = evaluate_loss(slim, batches, cfg.loss_fn)
        rep.seconds["post_rewrite"] = time.perf_counter() - t0
        rep.loss_before, rep.loss_after, rep.post_rewrite = loss_before, loss_after, post
        rep.measured_delta_loss = loss_after - loss_before
        rep.measured_delta_loss_rewrite = post["loss_after_rewrite"] - loss_before
        if cfg.finetune is not None:
            t0 = time.perf_counter()
            cfg.finetune(slim, rep.step)
            rep.seconds["finetune"] = time.perf_counter() - t0
            rep.loss_after_finetune = evaluate_loss(slim, batches, cfg.loss_fn)
        cost = forward_cost(slim, self.args, on=self.method)
        rep.flops_after, rep.params_after = cost.flops, cost.params
        if self.lat is not None:
            rep.after = self.lat.measure(slim) if rep.step < cfg.steps else rep.latency["measured_ms"]
        else:
            rep.after = cost.params if cfg.measure == "params" else cost.flops
        return slim

    # -- the report ----------------------------------------------------------------------------------------
    def _result(self, reports: list[StepReport]) -> CompressResult:
        cfg, model, current = self.cfg, self.model, self.current
        if current is model:
            current = trace(model, self.args, leaf_modules=cfg.leaf_modules, ignore=cfg.ignore).gm
            apply_modes(current, {name: m.training for name, m in model.named_modules()}, model.training)
        cost1 = forward_cost(current, self.args, on=self.method)
        flops0, params0, lat = self.cost0.flops, self.cost0.params, self.lat
        step_reports = [r.to_dict() for r in reports]
        report = {
            "criterion": cfg.criterion_name,
            "scope": cfg.scope,
            "steps": cfg.steps,
            "target": {cfg.measure: cfg.target},
            "widths_rounding": {"round_to": cfg.round_to, "backend": cfg.backend, "multiple": cfg.round_multiple},
            "post_rewrite": {"compensate": cfg.compensate, "damping": cfg.damping if cfg.compensate else None,
                             "reestimate_bn": ("calibration batches" if cfg.reestimate_bn is True else
                                               "given batches" if cfg.reestimate_bn is not False else False)},
            "flops": {"before": flops0, "after": cost1.flops, "ratio": cost1.flops / flops0 if flops0 else None},
            **({"latency": {"backend": cfg.backend, "batch": cfg.latency_batch, "threads": lat.threads,
                            "original_ms": lat.original_ms, **step_reports[-1].get("latency", {})}} if lat else {}),
            "flops_counter": {"method": self.method, "fallback_reason": self.cost0.note or None,
                              "description": COUNTERS[self.method]},
            "params": {"before": params0, "after": cost1.params, "ratio": cost1.params / params0},
            "widths": {"before": self.widths_before, "after": _widths(current)},
            "step_reports": step_reports,
            "seconds_total": time.perf_counter() - self.t_start,
        }
        return CompressResult(model=current, report=report)



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
