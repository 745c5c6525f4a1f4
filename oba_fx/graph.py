"""The public graph object: a traced model, its coupled groups, and the rewrite."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import networkx as nx
import torch

from .passes.dependency import CouplingResult, Group, coupled_groups
from .passes.compensate import compensate
from .passes.rewrite import rewrite, tensor_cuts
from .passes.trace import TracedGraph, trace_module

__all__ = ["Graph", "trace"]


class Graph:
    """A model traced by torch.fx, with its coupled channel groups.

    Build it with :func:`oba_fx.trace`.  The graph owns a private copy of the
    model; nothing here modifies the model it was traced from.

    Attributes:
        groups: every coupled group, prunable or frozen, ordered by id.
        ir: networkx DiGraph of the traced graph (op kind, module type, shapes).
        gm: the traced ``torch.fx.GraphModule`` (a private copy of the model).
        traced: the trace pass's ``TracedGraph`` (what later passes read).
        coupling: the coupling pass's ``CouplingResult``.
        warnings: messages about ops the coupling analysis did not understand.
    """

    def __init__(self, traced: TracedGraph, result: CouplingResult):
        self._traced = traced
        self._result = result

    # -- views ---------------------------------------------------------------
    @property
    def traced(self) -> TracedGraph:
        """The trace pass's result (read-only view): the GraphModule, recorded specs, example inputs, IR."""
        return self._traced

    @property
    def coupling(self) -> CouplingResult:
        """The coupling pass's result (read-only view): groups, position labels, closures, warnings."""
        return self._result

    @property
    def groups(self) -> list[Group]:
        return self._result.groups

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self._result.groups if g.prunable]

    @property
    def ir(self) -> nx.DiGraph:
        return self._traced.ir

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self._traced.gm

    @property
    def example_inputs(self) -> tuple:
        return self._traced.example_inputs

    @property
    def warnings(self) -> list[str]:
        return list(self._traced.warnings) + list(self._result.warnings)

    def group(self, gid: int) -> Group:
        for g in self._result.groups:
            if g.id == gid:
                return g
        raise KeyError(f"no group with id {gid}; valid ids are 0..{len(self._result.groups) - 1}")

    # -- the rewrite -----------------------------------------------------------
    def prune(self, removal: Mapping[int, Iterable[int]], allow_empty: bool = False) -> torch.fx.GraphModule:
        """Remove channels and return a new, smaller module.

        Args:
            removal: ``{group_id: [channel indices to remove]}``.
            allow_empty: allow removing every channel of a group (the layer then
                has zero width). Off by default: at least one channel is kept.

        Returns:
            A ``torch.fx.GraphModule`` with every parameter, buffer and module
            attribute sliced. It is checked against the predicted shapes on the
            example inputs before it is returned. The traced model and the
            user's model are untouched.

        Raises:
            ValueError: empty removal, unknown or frozen group, bad indices.
        """
        return rewrite(self._traced, self._result, removal, allow_empty=allow_empty)

    def cuts(self, removal: Mapping[int, Iterable[int]]) -> dict[str, dict[int, Any]]:
        """``{parameter/buffer name: {dim: removed indices}}``: what ``prune(removal)`` slices from each tensor."""
        return tensor_cuts(self._result, removal)

    def compensate(self, slim: torch.nn.Module, removal: Mapping[int, Iterable[int]], batches,
                   **kwargs) -> dict[str, Any]:
        """Refit the kept input weights of every consumer of ``slim = prune(removal)`` in place, by least
        squares against this graph's (original) layer outputs on ``batches``; see ``passes.compensate``."""
        return compensate(self._traced.gm, slim, self.cuts(removal), batches, **kwargs)

    # -- reporting ---------------------------------------------------------------
    def summary(self, max_rows: int | None = None) -> str:
        """A text table of the groups."""
        rows = [f"{'id':>4}  {'size':>5}  {'members':>7}  {'state':<10}  label / reason"]
        for g in self.groups[: max_rows or None]:
            state = "prunable" if g.prunable else "frozen"
            extra = g.label if g.prunable else f"{g.label}: {g.reason}"
            rows.append(f"{g.id:>4}  {g.size:>5}  {len(g.members):>7}  {state:<10}  {extra}")
        if max_rows is not None and len(self.groups) > max_rows:
            rows.append(f"... {len(self.groups) - max_rows} more")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable description of the groups (for JSON)."""
        return {
            "groups": [
                {
                    "id": g.id,
                    "size": g.size,
                    "prunable": g.prunable,
                    "reason": g.reason,
                    "label": g.label,
                    "members": [
                        {"name": m.name, "dim": m.dim, "role": m.role, "module": m.module, "numel": int(m.index.numel())}
                        for m in g.members
                    ],
                }
                for g in self.groups
            ],
            "warnings": self.warnings,
            "nodes": self.ir.number_of_nodes(),
        }

    def to_json(self, indent: int = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        n = len(self.prunable_groups)
        return f"Graph({type(self._traced.gm).__name__}: {self.ir.number_of_nodes()} nodes, {len(self.groups)} groups, {n} prunable)"


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    leaf_modules: Iterable[type | str] = (),
    ignore: Iterable[str] = (),
) -> Graph:
    """Trace ``model`` with torch.fx and find its coupled channel groups.

    Args:
        model: any ``torch.nn.Module``. It is deep-copied and never modified.
        example_inputs: a tensor or tuple of positional tensors for shape propagation.
        leaf_modules: module types or qualified names torch.fx should not trace into.
        ignore: qualified module/parameter names whose channels must be kept. The
            model's outputs (the classifier's classes) are always kept.

    Returns:
        A :class:`Graph`.

    Raises:
        oba_fx.TraceFailure: when torch.fx cannot trace the model; the message
            names the failing code and suggests ``leaf_modules``.
    """
    traced = trace_module(model, example_inputs, leaf_modules)
    return Graph(traced, coupled_groups(traced, ignore=ignore))
