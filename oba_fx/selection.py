"""Selection: which channels a compress step removes, and what the removal costs.

A step ranks (group, channel) units by importance (:func:`ranked_units`: global, blocks of rounded widths,
per-millisecond for a latency target, or local fractions), then fills the ranking to the step's goal
(:func:`fill_to_goal`: bisection over the ranked prefix, refined where one unit is coarse). Every candidate's
cost comes from one counter: the candidate is rewritten on a meta copy of the traced graph
(:func:`bisection_graph`, no weights copied) and counted by :func:`oba_fx.counting.forward_cost`.
:class:`Selector` holds one step's state (caps, sizes, multiples, the counted graph) and applies the
rounding-yields-to-the-target rule (``ROUNDING_SLACK``).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from .passes.rewrite import rewrite
from .passes.trace import TracedGraph

from .counting import forward_cost, to_meta
from .graph import Graph
from .joint import units as removal_units

__all__ = ["FILL_TOLERANCE", "ROUNDING_SLACK", "MAX_REFINEMENTS", "bisection_graph", "meta_copy", "candidate_cost",
           "removal_from_order", "blocked_order", "fill_to_goal", "ranked_units", "Selector"]

#: The selection refines while it lands more than this fraction of the original below the goal.
FILL_TOLERANCE = 0.005
#: A FLOPs or params target may land at most this fraction of the original below its goal because of rounded
#: widths; beyond it every group's multiple halves (16 -> 8 -> ... -> 1) until the selection lands within it.
ROUNDING_SLACK = 0.02
#: At most this many refinements per step.
MAX_REFINEMENTS = 8


def bisection_graph(graph: Graph, method: str) -> TracedGraph:
    """The traced graph the bisection rewrites: a meta copy (no weights copied), or the real one.

    ``method`` is the path :func:`forward_cost` took for the original model; the
    candidates are counted on the same path, so the goal and the figures it is
    compared with come from one counter.
    """
    t = graph.traced
    if method != "meta":
        return t
    return TracedGraph(gm=meta_copy(t.gm), example_inputs=to_meta(t.example_inputs), ir=t.ir,
                       source_training=False)


def meta_copy(module: nn.Module) -> nn.Module:
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


def candidate_cost(traced: TracedGraph, result, removal, measure: str, method: str) -> int:
    """Cost of ``traced`` with ``removal`` applied, by the library's one counter."""
    slim = rewrite(traced, result, removal, check=False) if removal else traced.gm
    if measure == "params":
        return sum(p.numel() for p in {id(p): p for p in slim.parameters()}.values())
    return forward_cost(slim, traced.example_inputs, on=method).flops


def removal_from_order(units, counts_cap, sizes, multiples):
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


def blocked_order(values, caps, sizes, multiples, per_ms=None):
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


def fill_to_goal(order, cost_of, goal, *, tol, on_unreachable, max_refinements=MAX_REFINEMENTS):
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


def ranked_units(values: dict[int, torch.Tensor], caps: dict[int, int], sizes: dict[int, int],
                 multiples: dict[int, int], scope: str, per_ms: dict[int, float] | None = None) -> list:
    """(group, channel) units, least important first, in the order a step removes them.

    ``per_ms`` (a latency target): importance per millisecond saved, in removable blocks. Global scope with
    rounded widths: blocks (:func:`blocked_order`). Global: one ranking over all channels. Local: every group
    loses the same fraction; channels are ordered by their fractional rank within their group ((r + 1) / size),
    so the bisection moves one channel at a time and the per-group fractions never differ by more than one
    channel. Groups whose cap is 0 are left out.
    """
    rounded = any(m > 1 for m in multiples.values())
    if per_ms is not None:
        return blocked_order(values, caps, sizes, multiples, per_ms)
    if scope == "global" and rounded:
        return blocked_order(values, caps, sizes, multiples)
    if scope == "global":
        keyed = sorted((float(v), gid, ch) for gid, vec in values.items() for ch, v in enumerate(vec.tolist()))
        return [(gid, ch) for _, gid, ch in keyed if caps[gid] > 0]
    keyed = []
    for gid, vec in values.items():
        for r, ch in enumerate(torch.argsort(vec, stable=True).tolist()):
            keyed.append(((r + 1) / sizes[gid], gid, int(ch)))
    keyed.sort()
    return [(gid, ch) for _, gid, ch in keyed if caps[gid] > 0]


class Selector:
    """One step's selection: ranks, fills to a goal, and lets rounding yield to the target.

    ``cost`` is the measure after a removal: the latency model's prediction when ``latency_model`` is given,
    else the counted FLOPs / params of the rewritten meta copy. ``unreachable(c, goal)`` builds the error
    raised when even the whole ranking leaves cost ``c`` above ``goal``.
    """

    def __init__(self, graph: Graph, counted: TracedGraph, *, caps, sizes, multiples, measure: str, method: str,
                 base: float, scope: str, unreachable: Callable[[float, float], Exception], latency_model=None,
                 groups=None):
        self.graph, self.counted = graph, counted
        self.caps, self.sizes, self.multiples = caps, sizes, dict(multiples)
        self.measure, self.method, self.base, self.scope = measure, method, base, scope
        self.unreachable, self.lm, self.groups = unreachable, latency_model, groups
        self.evaluations = 0
        self.moved: dict[Any, list] = {}
        self.costs: dict[Any, int] = {}  # counted cost per removal: the rounding check re-asks for the landed one
        self.rounding_relaxed: list[dict] = []

    def ranked(self, values: dict[int, torch.Tensor]) -> list:
        per_ms = None if self.lm is None else self.lm.marginal(self.groups, self.multiples)
        return ranked_units(values, self.caps, self.sizes, self.multiples, self.scope, per_ms)

    def removal_at(self, units) -> dict[int, list[int]]:
        return removal_from_order(units, self.caps, self.sizes, self.multiples)

    def counted_cost(self, removal) -> int:
        key = removal_units(removal)
        if key not in self.costs:
            self.costs[key] = candidate_cost(self.counted, self.graph.coupling, removal, self.measure, self.method)
        return self.costs[key]

    def cost_of(self, units) -> float:
        if self.lm is not None:
            return self.lm.predict(self.removal_at(units))
        return self.counted_cost(self.removal_at(units))

    def fill(self, seq, goal: float) -> dict[int, list[int]]:
        """The shortest ranked prefix whose rewrite meets the goal, refined when its last unit is coarse."""
        units, evals, moved = fill_to_goal(seq, self.cost_of, goal, tol=FILL_TOLERANCE * self.base,
                                           on_unreachable=lambda c: self.unreachable(c, goal))
        out = self.removal_at(units)
        self.evaluations += evals
        self.moved[removal_units(out)] = moved
        return out

    def select(self, importance: dict[int, torch.Tensor], goal: float) -> tuple[list, dict[int, list[int]]]:
        """(the ranked order, the removal) for one step's goal; rounding yields to the target.

        Whole blocks that land a FLOPs or params goal more than ``ROUNDING_SLACK`` of the original below it (few,
        wide groups: timm mobileone_s0 landed at 47.6% for a 50% goal) halve every multiple until it lands
        within; the tries are in ``rounding_relaxed``.
        """
        order = self.ranked(importance)
        removal = self.fill(order, goal)
        while self.lm is None and max(self.multiples.values(), default=1) > 1:
            landed = self.counted_cost(removal)
            if goal - landed <= ROUNDING_SLACK * self.base:
                break
            self.multiples = {gid: max(1, m // 2) for gid, m in self.multiples.items()}
            finer = self.fill(self.ranked(importance), goal)
            if self.counted_cost(finer) > landed:
                removal = finer
            self.rounding_relaxed.append({"multiple": max(self.multiples.values()),
                                          "overshoot": (goal - landed) / self.base})
        return order, removal

    def moved_for(self, removal) -> list:
        return self.moved[removal_units(removal)]
