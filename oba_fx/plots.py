"""Plots for compression runs (matplotlib, Agg backend, atomic PNG writes)."""
from __future__ import annotations

import os
from pathlib import Path

from .io import atomic_write

__all__ = ["plot_widths", "plot_steps"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_widths(widths_before: dict, widths_after: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of each layer's output width (weight dim 0) before and after pruning."""
    plt = _plt()
    names = [n for n in widths_before if widths_before[n]]
    before = [widths_before[n][0] for n in names]
    after = [(widths_after.get(n) or [0])[0] for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(names) + 2), 4.2))
    xs = range(len(names))
    ax.bar(xs, before, color="#c8d3e6", label="before")
    ax.bar(xs, after, color="#2b6cb0", width=0.55, label="after")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("output channels / features")
    ax.set_title(title or "per-layer width before and after pruning")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)


def plot_steps(records: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Test accuracy and FLOPs fraction after each step (step 0 = the original model)."""
    plt = _plt()
    steps = [r["step"] for r in records]
    acc = [100 * r["accuracy"] for r in records]
    flops = [100 * r["flops_fraction"] for r in records]
    fig, ax1 = plt.subplots(figsize=(6.4, 4.0))
    ax1.plot(steps, acc, "o-", color="#2b6cb0", label="test accuracy")
    ax1.set_xlabel("pruning step (0 = original)")
    ax1.set_ylabel("test accuracy (%)", color="#2b6cb0")
    ax1.set_xticks(steps)
    ax2 = ax1.twinx()
    ax2.plot(steps, flops, "s--", color="#c05621", label="FLOPs")
    ax2.set_ylabel("FLOPs (% of original)", color="#c05621")
    ax2.set_ylim(0, 105)
    ax1.set_title(title or "accuracy and FLOPs across steps")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
