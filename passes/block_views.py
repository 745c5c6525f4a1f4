"""Views of a Hessian-block analysis: text, JSON dict, networkx / GraphML, Graphviz DOT and a PNG heat map.

Owns how a :class:`~passes.hessian_blocks.HessianBlocks` result is shown: the heat-map categories of a block
(:data:`CATEGORIES`, :func:`category_of`) and their colours, and every renderer. ``HessianBlocks.to_text``,
``to_dict``, ``to_networkx``, ``to_dot``, ``write_graphml``, ``write_dot`` and ``plot`` are one-line
delegations to the functions here.

Design (dependency direction): the analysis (``hessian_blocks``) imports this module, never the reverse — the
renderers read the result through its public methods only, spelled out by the :class:`BlockResult` protocol.
matplotlib is imported inside :func:`heatmap`, so importing the analysis does not import it. Files are written atomically through :mod:`passes.fileio`, the
passes' own copy of ``oba_fx.io``'s writer, because the passes must not import ``oba_fx`` top-level modules.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import networkx as nx
import numpy as np

from .fileio import atomic_write, write_text

if TYPE_CHECKING:  # annotations only: matplotlib is imported when a heat map is drawn
    from matplotlib.figure import Figure

__all__ = ["CATEGORIES", "COLOURS", "BlockResult", "category_of", "text", "as_dict", "to_networkx", "dot", "heatmap",
           "write_graphml", "write_dot", "plot"]

#: Heat-map categories of a block, in legend order.
CATEGORIES = ("zero", "series", "parallel", "smooth", "several", "unknown")
BASE_REASONS = ("series", "parallel", "smooth")
COLOURS = {
    "zero": "#f2f2f2",
    "series": "#4c78a8",
    "parallel": "#f58518",
    "smooth": "#54a24b",
    "several": "#7d3c98",
    "unknown": "#e45756",
}


class BlockResult(Protocol):
    """What the views read of a ``passes.hessian_blocks.HessianBlocks`` (which imports this module)."""

    layers: list[str]
    warnings: list[str]

    def counts(self) -> dict[str, int]: ...
    def pairs(self) -> Iterator[tuple[str, str, str]]: ...
    def params(self, layer: str) -> list[str]: ...
    def reaches_output(self, layer: str) -> bool: ...
    def zero(self, l: str, m: str) -> bool: ...
    def category(self, l: str, m: str) -> str: ...


def category_of(reasons: Sequence[str]) -> str:
    """The category of a block with these reasons: zero, one base reason, several, or unknown (an unknown op)."""
    reasons = [r for r in reasons if r]
    if not reasons:
        return "zero"
    if len(reasons) == 1:
        return reasons[0] if reasons[0] in BASE_REASONS else "unknown"
    return "several"


def _reason_category(reason: str) -> str:
    return category_of(reason.split(", "))


def _dot_id(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def text(blocks: BlockResult, max_rows: int | None = None) -> str:
    """A summary of the counts followed by a table of the non-zero ``F`` blocks (at most ``max_rows`` rows)."""
    c = blocks.counts()
    reach = sum(1 for l in blocks.layers if blocks.reaches_output(l))
    lines = [
        f"Hessian blocks: {c['layers']} layers, {c['pairs']} layer pairs (l <= m, diagonal included)",
        f"  F (network curvature): {c['zero']} zero, {c['nonzero']} non-zero "
        f"({c['diagonal_nonzero']} on the diagonal): "
        + ", ".join(f"{k} {c[k]}" for k in CATEGORIES[1:]),
        f"  G (Gauss-Newton): {c['gauss_newton_nonzero']} non-zero "
        f"({reach} of {c['layers']} layers reach the loss)",
    ]
    rows = list(blocks.pairs())
    if rows:
        wl = max(len("layer l"), *(len(r[0]) for r in rows))
        wm = max(len("layer m"), *(len(r[1]) for r in rows))
        lines.append(f"{'layer l':<{wl}}  {'layer m':<{wm}}  reason")
        for l, m, reason in rows[: max_rows if max_rows is not None else None]:
            lines.append(f"{l:<{wl}}  {m:<{wm}}  {reason}")
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more")
    for w in blocks.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def as_dict(blocks: BlockResult) -> dict[str, Any]:
    """JSON-able description: layers, their parameters, counts, non-zero blocks, warnings."""
    return {
        "layers": [
            {"name": l, "params": blocks.params(l), "reaches_output": blocks.reaches_output(l)}
            for l in blocks.layers
        ],
        "counts": blocks.counts(),
        "blocks": [
            {"l": l, "m": m, "reason": reason, "category": _reason_category(reason)}
            for l, m, reason in blocks.pairs()
        ],
        "warnings": list(blocks.warnings),
    }


def to_networkx(blocks: BlockResult) -> nx.Graph:
    """Undirected graph: nodes are layers, edges (self-loops included) the non-zero ``F`` blocks.

    Node attributes: ``index``, ``params`` (comma-joined), ``reaches_output``.
    Edge attributes: ``reason``, ``category``.
    """
    g = nx.Graph()
    for i, l in enumerate(blocks.layers):
        g.add_node(l, index=i, params=",".join(blocks.params(l)), reaches_output=blocks.reaches_output(l))
    for l, m, reason in blocks.pairs():
        g.add_edge(l, m, reason=reason, category=_reason_category(reason))
    return g


def dot(blocks: BlockResult) -> str:
    """Graphviz DOT text of :func:`to_networkx` (undirected, edges labelled by reason, coloured by category)."""
    lines = ["graph hessian_blocks {", "  node [shape=box];"]
    for l in blocks.layers:
        style = "" if blocks.reaches_output(l) else ", style=dashed"
        lines.append(f"  {_dot_id(l)} [label={_dot_id(l)}{style}];")
    for l, m, reason in blocks.pairs():
        colour = COLOURS[_reason_category(reason)]
        lines.append(f"  {_dot_id(l)} -- {_dot_id(m)} [label={_dot_id(reason)}, color=\"{colour}\"];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _category_codes(blocks: BlockResult) -> np.ndarray:
    """``(n, n)`` indices into :data:`CATEGORIES`, symmetric, 0 (zero) where ``F_lm`` is zero."""
    layers = blocks.layers
    n = len(layers)
    codes = np.zeros((n, n), dtype=int)
    for i in range(n):
        for j in range(i, n):
            if not blocks.zero(layers[i], layers[j]):
                codes[i, j] = codes[j, i] = CATEGORIES.index(blocks.category(layers[i], layers[j]))
    return codes


def heatmap(blocks: BlockResult, title: str | None = None) -> Figure:
    """A matplotlib figure (Agg canvas) of the block structure of ``F``, one cell per layer pair.

    Layers run along both axes in graph order; each cell is coloured by category (zero, series, parallel,
    smooth, several reasons, unknown op). ``title`` defaults to a summary of the counts.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    n = len(blocks.layers)
    codes = _category_codes(blocks)
    side = min(max(5.0, 0.22 * n + 3.0), 40.0)
    fig = Figure(figsize=(side + 2.5, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap([COLOURS[c] for c in CATEGORIES])
    ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(CATEGORIES) - 0.5, interpolation="nearest")
    if n <= 120:
        size = max(3.0, min(9.0, 400.0 / max(n, 1)))
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(blocks.layers, rotation=90, fontsize=size)
        ax.set_yticklabels(blocks.layers, fontsize=size)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    if n <= 60:
        ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    c = blocks.counts()
    present = [k for k in CATEGORIES if k != "unknown" or c["unknown"]]
    ax.legend(
        handles=[Patch(facecolor=COLOURS[k], edgecolor="grey", label=f"{k} ({c[k]})") for k in present],
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        fontsize=8,
    )
    ax.set_title(title or f"F block structure: {c['nonzero']} of {c['pairs']} blocks non-zero", fontsize=10)
    fig.tight_layout()
    return fig


def write_graphml(blocks: BlockResult, path: str | os.PathLike) -> None:
    """Writes :func:`to_networkx` as GraphML (atomically)."""
    g = to_networkx(blocks)
    atomic_write(path, lambda tmp: nx.write_graphml(g, tmp))


def write_dot(blocks: BlockResult, path: str | os.PathLike) -> None:
    """Writes :func:`dot` to ``path`` (atomically)."""
    write_text(path, dot(blocks))


def plot(blocks: BlockResult, path: str | os.PathLike, title: str | None = None) -> None:
    """Writes the :func:`heatmap` as a PNG (atomically)."""
    fig = heatmap(blocks, title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
