"""``oba-joint``: second-order selection of the removal set itself.

Every per-channel criterion predicts one channel's loss change on its own (``group-exact``), or its share of
deleting the whole network at once (``oba``: δ = −θ everywhere). Neither sees what decides a one-shot removal:
how the removed channels interact. This module works on the removal set P.

With δ_P = −θ on exactly the parameter entries that vanish with P, the quadratic model of the loss change is

    L(P) = gᵀδ_P + ½ δ_PᵀHδ_P,

exact to second order and computed from one curvature pass (g and Hδ_P: one Hessian-vector product, H the
full Hessian of the mean calibration loss). The same pass gives every channel's marginal cost, exactly to
second order:

    adding c ∉ P:     L(P ∪ c) − L(P) = gᵀd_c + d_cᵀ(Hδ_P) + ½ d_cᵀHd_c,   d_c: δ on c's entries not in P yet
    removing c ∈ P:   L(P) − L(P ∖ c) = gᵀd_c + d_cᵀ(Hδ_P) − ½ d_cᵀHd_c,   d_c: δ on the entries only c removes

Both are v_c = L(P ∪ c) − L(P ∖ c), the loss of having c removed given the rest of P, so one ranking by v
says which channels to give back and which to take instead. The self terms d_cᵀHd_c come from
``group-exact`` (δ_cᵀH_ccδ_c over all of c's entries, exact by vmap or estimated by probes); d_c = δ_c unless
c shares a weight entry with another removed channel (the conv weight between two pruned groups), and there
the self term is the one approximation in v_c. The joint prediction L(P) itself is always exact.

Selection (:func:`select`): the cheaper-predicted of the group-exact and magnitude rankings' fills gives the
start P; each round re-ranks by v at the current P (movable: the ``m`` channels of P with the largest v and
the ``m`` outside with the smallest), refills to the FLOPs goal with the caller's fill, and evaluates the
proposal with one HVP. A proposal that lowers L(P) is taken; otherwise ``m`` halves, as it does when the
refill gives a set already evaluated (no HVP is spent on it). The rounds, their predictions and the swaps
are returned for the report.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .passes.curvature import curvature
from .passes.errors import UsageError

__all__ = ["JointModel", "Marginals", "select", "JOINT_ROUNDS"]

#: HVP rounds of swaps after the start (each evaluates one proposal).
JOINT_ROUNDS = 5


@dataclass
class Marginals:
    """The quadratic model at one removal set.

    Attributes:
        predicted: L(P) = gᵀδ_P + ½ δ_PᵀHδ_P (exact to second order).
        first: gᵀδ_P.
        value: ``{group id: v}``, v_c = L(P ∪ c) − L(P ∖ c) per channel (add cost outside P, saving inside).
        in_p: ``{group id: bool tensor}``, membership of each channel in P.
    """

    predicted: float
    first: float
    value: dict[int, torch.Tensor]
    in_p: dict[int, torch.Tensor]


@dataclass
class JointModel:
    """Evaluates the quadratic model at removal sets of one graph (one HVP per set).

    Args:
        graph: the traced ``oba_fx.Graph``.
        calibration: the batches (the mean loss over them).
        self_terms: ``{group id: tensor}`` of δ_cᵀH_ccδ_c per channel (group-exact's quadratic term).
        loss_fn: batch-mean loss; default cross-entropy.
    """

    graph: object
    calibration: list
    self_terms: dict[int, torch.Tensor]
    loss_fn: Callable | None = None
    micro_batch: int | None = None
    checkpoint: bool | int = False
    hvps: int = field(default=0, init=False)

    def __post_init__(self):
        from .scoring import channel_maps

        named = dict(self.graph.gm.named_parameters())
        self.names = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
        self.maps = channel_maps(self.graph, set(self.names))
        self.delta = {n: named[n].detach().neg() for n in self.names}
        self.sizes = {g.id: g.size for g in self.graph.prunable_groups}
        self._g = None

    def cover(self, removal: dict[int, Iterable[int]]) -> dict[str, torch.Tensor]:
        """Per scored parameter: how many channels of ``removal`` remove each entry (0 = kept)."""
        cov = {n: torch.zeros(d.shape, dtype=torch.int64, device=d.device) for n, d in self.delta.items()}
        for gid, chans in removal.items():
            ind = torch.zeros(self.sizes[gid], dtype=torch.int64)
            ind[torch.as_tensor(list(chans), dtype=torch.long)] = 1
            for n, cm in self.maps[gid].items():
                cov[n] += cm.spread(ind).to(cov[n].device)
        return cov

    def direction(self, cover: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """δ_P: −θ on every removed entry, 0 elsewhere."""
        return {n: torch.where(cover[n] > 0, self.delta[n], torch.zeros_like(self.delta[n])) for n in self.names}

    def at(self, removal: dict[int, Iterable[int]], progress: bool = False) -> Marginals:
        """The quadratic model and every channel's marginal cost at ``removal`` (one curvature pass)."""
        cover = self.cover(removal)
        d_p = self.direction(cover)
        want = ("H",) if self._g is not None else ("g", "H")
        r = curvature(self.graph.gm, self.calibration, want=want, direction=d_p, loss_fn=self.loss_fn,
                      params=self.names, progress=progress, micro_batch=self.micro_batch, checkpoint=self.checkpoint)
        self.hvps += 1
        if self._g is None:
            self._g = r.g
        g, hd = self._g, r.H
        first = float(sum((g[n] * d_p[n].to(torch.float64)).sum() for n in self.names))
        quad = float(sum((d_p[n].to(torch.float64) * hd[n]).sum() for n in self.names))
        return self._marginals(removal, cover, g, hd, first + 0.5 * quad, first)

    def _marginals(self, removal, cover, g, hd, predicted, first) -> Marginals:
        d64 = {n: self.delta[n].to(torch.float64) for n in self.names}
        # entries only one removed channel removes (its own share of P) / entries not removed yet (what adding
        # a channel removes)
        own = {n: (cover[n] == 1).to(torch.float64) for n in self.names}
        new = {n: (cover[n] == 0).to(torch.float64) for n in self.names}
        value, in_p = {}, {}
        for gid, size in self.sizes.items():
            inside = torch.zeros(size, dtype=torch.bool)
            if gid in removal:
                inside[torch.as_tensor(list(removal[gid]), dtype=torch.long)] = True
            lin_in = torch.zeros(size, dtype=torch.float64)
            lin_out = torch.zeros(size, dtype=torch.float64)
            for n, cm in self.maps[gid].items():
                per_entry = (g[n] + hd[n]) * d64[n]  # gᵀd_c + d_cᵀHδ_P, summed over c's entries of the mask
                lin_in += cm.reduce((per_entry * own[n]).cpu(), size)
                lin_out += cm.reduce((per_entry * new[n]).cpu(), size)
            half = 0.5 * self.self_terms[gid].to(torch.float64)
            value[gid] = torch.where(inside, lin_in - half, lin_out + half)
            in_p[gid] = inside
        return Marginals(predicted=predicted, first=first, value=value, in_p=in_p)


def units(removal) -> frozenset[tuple[int, int]]:
    """The (group id, channel) pairs of a removal ``{group id: [channels]}``."""
    return frozenset((gid, int(c)) for gid, cs in removal.items() for c in cs)


def _proposal(order_ids: list[tuple[int, int]], marg: Marginals, current: set, m: int) -> list[tuple[int, int]]:
    """The ranked list the fill takes its prefix from: P's fixed part, then the movable channels by v, then
    the rest of the channels outside P by v.

    Movable: the ``m`` channels of P with the largest v (the costliest to keep removed) and the ``m`` outside
    with the smallest (the cheapest to add).
    """
    v = {(gid, c): float(marg.value[gid][c]) for gid, c in order_ids}
    inside = sorted((u for u in order_ids if u in current), key=lambda u: (v[u], u))
    outside = sorted((u for u in order_ids if u not in current), key=lambda u: (v[u], u))
    fixed, leave = inside[:max(len(inside) - m, 0)], inside[max(len(inside) - m, 0):]
    enter, rest = outside[:m], outside[m:]
    movable = sorted(leave + enter, key=lambda u: (v[u], u))
    return fixed + movable + rest


def select(model: JointModel, starts: dict[str, list[tuple[int, int]]], fill: Callable, *,
           rounds: int = JOINT_ROUNDS, progress: bool = False) -> tuple[dict[int, list[int]], dict]:
    """The removal with the lowest predicted joint loss change found by swap rounds.

    Args:
        model: the quadratic model of one graph.
        starts: ``{name: ranked (group, channel) list}``; each is filled to the goal and evaluated (one HVP
            each), the lower-predicted one starts the rounds.
        fill: ``fill(ranked list) -> removal {group id: [channels]}`` meeting the goal (the caller's FLOPs
            fill, caps and rounding).
        rounds: proposals evaluated after the start (one HVP each).

    Returns:
        (removal, report): the report has the start's and final predictions and one entry per round.
    """
    if rounds < 0:
        raise UsageError(f"rounds must be >= 0, got {rounds}")
    evaluated = {}
    for name, order in starts.items():
        removal = fill(order)
        evaluated[name] = (removal, model.at(removal, progress=progress), order)
    start = min(evaluated, key=lambda k: evaluated[k][1].predicted)
    removal, marg, order = evaluated[start]
    ids = list(order)
    current = units(removal)
    m = max(len(current), 1)
    history = []
    seen = {units(v[0]) for v in evaluated.values()}
    while len(history) < rounds and m >= 1:
        proposal = fill(_proposal(ids, marg, current, m))
        prop_set = units(proposal)
        if prop_set in seen:  # this set (or P itself) was evaluated already: a smaller move
            m //= 2
            continue
        new = model.at(proposal, progress=progress)
        seen.add(prop_set)
        changed = len(prop_set ^ current)
        accepted = new.predicted < marg.predicted
        history.append({"trust": m, "changed": changed, "predicted": new.predicted, "accepted": bool(accepted)})
        if accepted:
            removal, marg, current = proposal, new, prop_set
        else:
            m //= 2
    report = {
        "starts": {k: v[1].predicted for k, v in evaluated.items()},
        "start": start,
        "predicted_start": evaluated[start][1].predicted,
        "predicted": marg.predicted,
        "predicted_first_order": marg.first,
        "rounds": history,
        "hvps": model.hvps,
        "swapped_channels": len(current ^ units(evaluated[start][0])),
    }
    return removal, report
