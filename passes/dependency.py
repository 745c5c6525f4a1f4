"""Pass 2: which channels vanish together (coupled groups).

Model.  Every dimension of every tensor in the traced graph -- node values,
parameters, buffers, and a few module attributes such as a grouped conv's
``groups`` -- is a *slot*; each index along it is a *position*.  Op rules
(``passes/coupling/``) state two kinds of facts:

* ``equal``: two positions vanish together (an add's operands, a conv's output
  channel and its weight row, a cat's input and its offset in the output);
* ``product``: a composite slot is the row-major product of factor slots
  (``reshape(B, N, C) -> (B, N, H, D)`` makes ``C = H x D``; a flatten makes
  ``C*H*W = C x H x W``).  A composite position vanishes when any factor does.

Solving is union-find over positions (scipy connected components), then
unification of product derivations until nothing changes.  Each resulting
component is one *channel*.  A component no product derives is independent;
removing it removes, transitively, every component derived from it.  Independent
components that touch the same slots with the same multiplicity form a *group*
(e.g. the 64 output channels of a conv, with its BN entries and its consumers'
input columns); the group's channels are ordered by position.

A component is frozen when it, or anything removed with it, touches a frozen
position: a model input or output, an op no rule understands, an integer index,
a dimension whose size the model reads in arithmetic, or a layer the user
ignores.  Never guess: unknown means frozen.

This module owns the slot model (``Coupling``), the solver (``coupled_groups``)
and the result types (``Group``, ``Member``, ``CouplingResult``); the per-op
facts live in ``passes/coupling/``.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import torch

from .coupling import apply_rules
from .fxutil import get_qualified
from .meta import SPEC
from .trace import TensorSpec, TracedGraph

__all__ = ["Member", "Group", "Coupling", "CouplingResult", "coupled_groups", "UnknownOpWarning"]


class UnknownOpWarning(UserWarning):
    """An op the coupling analysis does not understand froze the dims it touches."""


@dataclass(frozen=True)
class SlotInfo:
    """One dimension of one tensor (or module attribute)."""

    kind: str  # "value" | "param" | "virtual"
    ref: str  # node name (value), qualified tensor name (param), "module.attr" (virtual)
    path: tuple[int, ...]  # output index path for values of multi-output nodes
    dim: int
    size: int
    role: str = ""  # for params: producer | consumer | norm | bias | head | embedding | buffer


@dataclass
class Member:
    """A parameter or buffer slice that vanishes with a group's channels.

    Removing channel ``c`` of the group removes ``index[channel == c]`` along
    ``dim`` of tensor ``name``.

    Attributes:
        name: qualified parameter/buffer name in the traced module.
        dim: the sliced dimension.
        index: LongTensor of positions along ``dim``.
        channel: LongTensor, same length, the group channel each position belongs to.
        role: producer (output rows), consumer (input columns), norm, bias,
            head (attention projections), embedding (token/position tables), buffer.
        module: qualified name of the owning module ("" for top-level tensors).
    """

    name: str
    dim: int
    index: torch.Tensor
    channel: torch.Tensor
    role: str
    module: str

    def __repr__(self) -> str:
        return f"Member({self.name}, dim={self.dim}, n={self.index.numel()}, role={self.role})"


@dataclass
class Group:
    """A prunable dimension: ``size`` channels that each vanish as a unit.

    Attributes:
        id: stable integer id (graph order).
        size: number of channels.
        members: every parameter/buffer slice that vanishes with a channel.
        prunable: False when frozen.
        reason: why it is frozen ("" when prunable).
        label: short human-readable description (the slot that defines it).
        key: the group's identity across re-traces of the same model: its first
            producer / head / norm / embedding / consumer slice (``"conv1.weight[dim 0]"``),
            else its defining slot.  ``label`` starts with it.
    """

    id: int
    size: int
    members: list[Member]
    prunable: bool
    reason: str
    label: str
    key: str = ""
    _components: np.ndarray = field(repr=False, default=None)  # component id per channel
    _sort_key: tuple = field(repr=False, default=())

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else f"frozen: {self.reason}"
        return f"Group(id={self.id}, size={self.size}, {self.label}, {len(self.members)} members, {state})"


class Coupling:
    """Collects slots and facts; op rules talk to this object."""

    def __init__(self, traced: TracedGraph):
        self.traced = traced
        self.slots: list[SlotInfo] = []
        self.offsets: list[int] = []
        self._index: dict[tuple, int] = {}
        self._n = 0
        self._edges_a: list[np.ndarray] = []
        self._edges_b: list[np.ndarray] = []
        self.products: list[tuple[int, tuple[int, ...]]] = []
        self.frozen: dict[int, str] = {}  # position -> reason (first reason wins)
        self._frozen_slots: list[tuple[int, np.ndarray | None, str]] = []
        # python values computed from tensor shapes (``B, N, C = x.shape``; ``C // heads``):
        # node name -> the slots whose sizes they depend on
        self.size_reads: dict[str, frozenset[int]] = {}
        self.warnings: list[str] = []

    # -- slots ---------------------------------------------------------
    def _slot(self, key: tuple, info: SlotInfo) -> int:
        sid = self._index.get(key)
        if sid is None:
            sid = len(self.slots)
            self._index[key] = sid
            self.slots.append(info)
            self.offsets.append(self._n)
            self._n += info.size
        return sid

    def slot_of(self, node_name: str, path: tuple[int, ...], dim: int) -> int | None:
        """The slot of dim ``dim`` of a node's value (at ``path`` of a multi-output node); None if it has none."""
        return self._index.get(("value", node_name, tuple(path), dim))

    def value(self, node, path: tuple[int, ...] = ()) -> list[int] | None:
        """Slot ids of each dim of a node's tensor value (None if not a tensor)."""
        spec = node.meta.get(SPEC)
        for p in path:
            if not isinstance(spec, tuple) or p >= len(spec):
                return None
            spec = spec[p]
        if not isinstance(spec, TensorSpec):
            return None
        return [
            self._slot(("value", node.name, path, d), SlotInfo("value", node.name, path, d, size))
            for d, size in enumerate(spec.shape)
        ]

    def param(self, qualname: str, roles: dict[int, str]) -> dict[int, int]:
        """Slot ids of the given dims of a parameter/buffer: ``{dim: role}`` -> ``{dim: slot}``.

        Only dims that can shrink get slots (a conv kernel's spatial dims never do).
        """
        t = get_qualified(self.traced.gm, qualname)
        if not isinstance(t, torch.Tensor):
            raise AssertionError(f"{qualname} is not a tensor")
        out = {}
        for d, role in roles.items():
            key = ("param", qualname, (), d)
            out[d] = self._slot(key, SlotInfo("param", qualname, (), d, int(t.shape[d]), role))
        return out

    def virtual(self, ref: str, size: int) -> int:
        """A module attribute with ``size`` positions (conv groups, attention heads)."""
        return self._slot(("virtual", ref, (), 0), SlotInfo("virtual", ref, (), 0, size))

    def size(self, sid: int) -> int:
        return self.slots[sid].size

    # -- facts -----------------------------------------------------------
    def equal(self, a: int, b: int, ia=None, ib=None) -> None:
        """Positions ``ia`` of slot a vanish together with positions ``ib`` of slot b."""
        ia = np.arange(self.size(a)) if ia is None else np.asarray(ia, dtype=np.int64)
        ib = np.arange(self.size(b)) if ib is None else np.asarray(ib, dtype=np.int64)
        if ia.shape != ib.shape:
            raise AssertionError(f"equal(): mismatched positions {self.slots[a]} vs {self.slots[b]}")
        self._edges_a.append(ia + self.offsets[a])
        self._edges_b.append(ib + self.offsets[b])

    def product(self, composite: int, factors: list[int]) -> None:
        """``composite`` is the row-major product of ``factors``."""
        if int(np.prod([self.size(f) for f in factors])) != self.size(composite):
            raise AssertionError("product(): sizes do not multiply out")
        if len(factors) == 1:
            self.equal(composite, factors[0])
        else:
            self.products.append((composite, tuple(factors)))

    def freeze(self, sid: int, reason: str, idx=None) -> None:
        self._frozen_slots.append((sid, None if idx is None else np.asarray(idx, dtype=np.int64), reason))

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, UnknownOpWarning, stacklevel=4)

    # -- solving ---------------------------------------------------------
    @property
    def n_positions(self) -> int:
        """Positions over all slots."""
        return self._n

    def edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Every ``equal`` fact as two aligned arrays of positions."""
        a = np.concatenate(self._edges_a) if self._edges_a else np.zeros(0, dtype=np.int64)
        b = np.concatenate(self._edges_b) if self._edges_b else np.zeros(0, dtype=np.int64)
        return a, b

    def frozen_facts(self) -> list[tuple[int, np.ndarray | None, str]]:
        """Every ``freeze`` fact: (slot, positions or None for all, reason), in the order stated."""
        return list(self._frozen_slots)

    def positions(self, sid: int) -> np.ndarray:
        return np.arange(self.offsets[sid], self.offsets[sid] + self.size(sid))


class _UnionFind:
    """Connected components over positions, with extra unions added in rounds."""

    def __init__(self, n: int, a: np.ndarray, b: np.ndarray):
        self.n = n
        self.a, self.b = a, b
        self.labels = self._solve()

    def _solve(self) -> np.ndarray:
        m = scipy.sparse.coo_matrix((np.ones(len(self.a), dtype=np.int8), (self.a, self.b)), shape=(self.n, self.n))
        _, labels = scipy.sparse.csgraph.connected_components(m, directed=False)
        return labels

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a = np.concatenate([self.a, a])
        self.b = np.concatenate([self.b, b])
        self.labels = self._solve()


@dataclass
class CouplingResult:
    """Everything later passes need about coupling."""

    coupling: Coupling
    groups: list[Group]
    labels: np.ndarray  # component per position
    closure: dict[int, np.ndarray]  # independent component -> components removed with it
    warnings: list[str]

    def removed_positions(self, removal: dict[int, Iterable[int]]) -> np.ndarray:
        """Boolean mask over all positions for removing ``{group_id: channels}``."""
        comps: set[int] = set()
        by_id = {g.id: g for g in self.groups}
        for gid, channels in removal.items():
            g = by_id[gid]
            for c in channels:
                comps.update(self.closure[int(g._components[c])].tolist())
        if not comps:
            return np.zeros(len(self.labels), dtype=bool)
        return np.isin(self.labels, np.fromiter(comps, dtype=np.int64))


def _solve_products(c: Coupling, uf: _UnionFind) -> tuple[dict[int, tuple[int, ...]], dict[int, str]]:
    """Unify product derivations until each derived component has one derivation.

    Returns (derivation per derived component, conflicts: component -> reason, and the factors of
    every derivation of a conflicting component).
    Two derivations of one component with the same arity are unified factor by
    factor (a coarser grouping, always valid); different arity is a conflict
    and freezes the component and its factors.
    """
    while True:
        conflicts: dict[int, str] = {}  # only the final round's labels count
        conflict_factors: dict[int, set[int]] = defaultdict(set)  # factors of every disagreeing derivation
        labels = uf.labels
        deriv: dict[int, tuple[int, ...]] = {}
        extra_a, extra_b = [], []
        for comp_slot, factors in c.products:
            sizes = [c.size(f) for f in factors]
            coords = np.unravel_index(np.arange(c.size(comp_slot)), sizes)
            table = np.stack([labels[c.positions(f)][coords[i]] for i, f in enumerate(factors)], axis=1)
            kc = labels[c.positions(comp_slot)]
            # first derivation per component, vectorised over positions
            order = np.argsort(kc, kind="stable")
            kc_sorted, table_sorted = kc[order], table[order]
            first = np.r_[True, kc_sorted[1:] != kc_sorted[:-1]]
            heads = np.maximum.accumulate(np.where(first, np.arange(len(kc_sorted)), 0))
            diff = np.any(table_sorted != table_sorted[heads], axis=1)
            if diff.any():
                # one derivation of this component disagrees with another: unify factors
                for col in range(table.shape[1]):
                    extra_a.append(table_sorted[diff, col])
                    extra_b.append(table_sorted[heads[diff], col])
            for k, row in zip(kc_sorted[first].tolist(), table_sorted[first].tolist()):
                t = tuple(row)
                old = deriv.get(k)
                if old is None:
                    deriv[k] = t
                elif old != t:
                    if len(old) == len(t):
                        extra_a.append(np.asarray(old, dtype=np.int64))
                        extra_b.append(np.asarray(t, dtype=np.int64))
                    else:
                        conflicts[k] = "reshaped in two incompatible ways"
                        conflict_factors[k].update(old)
                        conflict_factors[k].update(t)
        if not extra_a:
            break
        # union component representatives: pick any position of each component
        rep = np.zeros(labels.max() + 1, dtype=np.int64)
        rep[labels[::-1]] = np.arange(len(labels))[::-1]
        uf.add(rep[np.concatenate(extra_a)], rep[np.concatenate(extra_b)])
    for k, t in list(deriv.items()):
        if k in t:
            conflicts[k] = "a reshape derives this dimension from itself"
    # (B*nW) = B x nW in one reshape and B x H/ws x W/ws in another: the factors of both must stay
    return deriv, conflicts, conflict_factors


def _component_closures(deriv: dict[int, tuple[int, ...]]) -> dict[int, set[int]]:
    """For every component: itself plus all components derived from it (transitively)."""
    children: dict[int, set[int]] = defaultdict(set)
    for k, factors in deriv.items():
        for f in factors:
            children[f].add(k)
    memo: dict[int, frozenset[int]] = {}

    def closure(k: int, stack: frozenset = frozenset()) -> frozenset[int]:
        if k in memo:
            return memo[k]
        out = {k}
        for ch in children.get(k, ()):
            if ch not in stack:
                out |= closure(ch, stack | {k})
        memo[k] = frozenset(out)
        return memo[k]

    return {k: closure(k) for k in set(children) | set(deriv)}


def coupled_groups(traced: TracedGraph, ignore: Iterable[str] = ()) -> CouplingResult:
    """Run the coupling rules over the IR and assemble coupled groups.

    Args:
        traced: output of ``trace_module``.
        ignore: qualified module or parameter names whose output channels the
            user wants kept (frozen).
    """
    c = Coupling(traced)
    apply_rules(c, ignore=tuple(ignore))
    n = c.n_positions
    a, b = c.edges()
    uf = _UnionFind(n, a, b)
    deriv, conflicts, conflict_factors = _solve_products(c, uf)
    labels = uf.labels
    n_comp = int(labels.max()) + 1 if n else 0

    # frozen components, with the first reason seen
    comp_reason: dict[int, str] = {}
    for sid, idx, reason in c.frozen_facts():
        pos = c.positions(sid) if idx is None else c.offsets[sid] + idx
        for k in np.unique(labels[pos]).tolist():
            comp_reason.setdefault(k, reason)
    for k, reason in conflicts.items():
        comp_reason.setdefault(k, reason)
        for f in set(deriv.get(k, ())) | conflict_factors.get(k, set()):
            comp_reason.setdefault(f, reason)

    closures = _component_closures(deriv)

    # which slots each component touches, and its parameter positions
    slot_of_pos = np.repeat(np.arange(len(c.slots)), [s.size for s in c.slots])
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_comp + 1))

    def comp_positions(k: int) -> np.ndarray:
        return order[bounds[k] : bounds[k + 1]]

    param_slot = np.array([s.kind == "param" for s in c.slots], dtype=bool)

    def signature(positions: np.ndarray) -> tuple:
        slots, counts = np.unique(slot_of_pos[positions], return_counts=True)
        return tuple(zip(slots.tolist(), counts.tolist()))

    comp_has_param = np.zeros(n_comp, dtype=bool)
    comp_has_param[labels[param_slot[slot_of_pos]]] = True
    independent = [k for k in range(n_comp) if k not in deriv]
    by_sig: dict[tuple, list[int]] = defaultdict(list)
    comp_closure: dict[int, np.ndarray] = {}
    for k in independent:
        clo = closures.get(k, (k,))
        comp_closure[k] = np.fromiter(sorted(clo), dtype=np.int64)
        if not comp_has_param[comp_closure[k]].any():
            continue  # no tensor shrinks with it (spatial, batch, token positions)
        all_pos = np.concatenate([comp_positions(j) for j in clo])
        own = signature(comp_positions(k))
        by_sig[(own, signature(all_pos))].append(k)

    groups: list[Group] = []
    for (own, _), comps in by_sig.items():
        first_slot = own[0][0]
        first_pos = [comp_positions(k)[slot_of_pos[comp_positions(k)] == first_slot].min() for k in comps]
        comps = [k for _, k in sorted(zip(first_pos, comps))]
        groups.append(_assemble(c, comps, comp_closure, comp_positions, slot_of_pos, comp_reason, first_slot))
    groups.sort(key=lambda g: (g._sort_key))
    for i, g in enumerate(groups):
        g.id = i
    return CouplingResult(c, groups, labels, comp_closure, list(c.warnings))


def _assemble(c, comps, comp_closure, comp_positions, slot_of_pos, comp_reason, first_slot) -> Group:
    """Build a Group from its ordered independent components."""
    per_slot_idx: dict[int, list[np.ndarray]] = defaultdict(list)
    per_slot_ch: dict[int, list[np.ndarray]] = defaultdict(list)
    reason = ""
    for ch, k in enumerate(comps):
        for j in comp_closure[k].tolist():
            if not reason and j in comp_reason:
                reason = comp_reason[j]
            pos = comp_positions(j)
            for sid in np.unique(slot_of_pos[pos]).tolist():
                if c.slots[sid].kind != "param":
                    continue
                local = pos[slot_of_pos[pos] == sid] - c.offsets[sid]
                per_slot_idx[sid].append(local)
                per_slot_ch[sid].append(np.full(len(local), ch))
    members = []
    for sid in sorted(per_slot_idx):
        s = c.slots[sid]
        idx = np.concatenate(per_slot_idx[sid])
        chan = np.concatenate(per_slot_ch[sid])
        idx, first = np.unique(idx, return_index=True)  # a position removed by two channels counts once
        members.append(
            Member(
                name=s.ref,
                dim=s.dim,
                index=torch.from_numpy(idx.astype(np.int64)),
                channel=torch.from_numpy(chan[first].astype(np.int64)),
                role=s.role,
                module=s.ref.rpartition(".")[0],
            )
        )
    size = len(comps)
    if not reason and size < 2:
        reason = "a single channel: at least one must remain"
    key, label = _key_and_label(c.slots[first_slot], members)
    g = Group(id=-1, size=size, members=members, prunable=not reason, reason=reason, label=label, key=key)
    g._components = np.asarray(comps, dtype=np.int64)
    g._sort_key = (first_slot, int(comp_positions(comps[0]).min()))
    return g


def _key_and_label(fs: SlotInfo, members: list[Member]) -> tuple[str, str]:
    """A group's key (its first producer / head / norm / embedding / consumer slice, else its defining slot)
    and its label (the key, with the slice's role and the defining slot)."""
    defining = f"{fs.ref}{list(fs.path) if fs.path else ''}[dim {fs.dim}]"
    for role in ("producer", "head", "norm", "embedding", "consumer"):
        m = next((m for m in members if m.role == role), None)
        if m is not None:
            kind = {"producer": "out", "consumer": "in"}.get(role, role)
            key = f"{m.name}[dim {m.dim}]"
            return key, f"{key} ({kind}; first seen at {defining})"
    return defining, defining
