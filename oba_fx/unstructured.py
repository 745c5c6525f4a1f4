"""Unstructured (per-weight) pruning from per-parameter scores, with held masks.

Owns :func:`compress_unstructured` (score, threshold, mask, optionally fine-tune, per step),
:func:`make_permanent`, :func:`sparsity_report` and :func:`refresh_masked_weights` (graph-free masked
weights, so a masked model can be deep-copied; ``oba_fx.finetune`` calls it too).
"""
from __future__ import annotations

import copy
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from .passes import distributed as _dist
from .passes.calibration import BatchStream, CalibrationError

from .compress import CompressResult
from .scoring import criteria, get_criterion, parameter_scores
from .passes.errors import UsageError

__all__ = ["compress_unstructured", "make_permanent", "sparsity_report", "refresh_masked_weights"]

_PRUNABLE = (nn.modules.conv._ConvNd, nn.Linear)


def _targets(model: nn.Module, include_last: bool) -> list[tuple[str, nn.Module]]:
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, _PRUNABLE)]
    return mods if include_last else mods[:-1] if len(mods) > 1 else mods


def _effective_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.detach()  # with a prune reparametrization this is weight_orig * weight_mask


def sparsity_report(model: nn.Module, scored: Iterable[str] | None = None) -> dict[str, Any]:
    """Real fraction of exactly-zero weights per Conv/Linear layer.

    ``overall`` is over the ``scored`` layers (default: all Conv/Linear layers);
    ``overall_all_layers`` over every Conv/Linear weight.
    """
    layers, zeros, total, zs, ts = {}, 0, 0, 0, 0
    scored = None if scored is None else set(scored)
    for name, m in model.named_modules():
        if isinstance(m, _PRUNABLE):
            w = _effective_weight(m)
            z = int((w == 0).sum())
            layers[name] = {"sparsity": z / w.numel(), "numel": w.numel(), "pruned": scored is None or name in scored}
            zeros += z
            total += w.numel()
            if scored is None or name in scored:
                zs += z
                ts += w.numel()
    return {"layers": layers, "overall": zs / ts if ts else 0.0, "overall_all_layers": zeros / total if total else 0.0}


def refresh_masked_weights(model: nn.Module) -> nn.Module:
    """Recompute masked weights as graph-free tensors, so the module can be deep-copied.

    ``torch.nn.utils.prune`` stores ``weight = weight_orig * weight_mask`` as a
    non-leaf tensor, which ``copy.deepcopy`` refuses; the forward pre-hook
    recomputes it on every call anyway.
    """
    with torch.no_grad():
        for _, m in model.named_modules():
            if prune.is_pruned(m) and hasattr(m, "weight_mask"):
                setattr(m, "weight", m.weight_orig.detach() * m.weight_mask)
    return model


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold held masks into the weights (``torch.nn.utils.prune.remove``), in place."""
    for _, m in model.named_modules():
        if prune.is_pruned(m) and hasattr(m, "weight_mask"):
            prune.remove(m, "weight")
    return model


@_dist.accepts_process_group
def compress_unstructured(
    model: nn.Module,
    calibration: Iterable,
    sparsity: float = 0.9,
    criterion: str = "oba",
    scope: str = "global",
    steps: int = 1,
    *,
    loss_fn: Callable | None = None,
    finetune: Callable[[nn.Module, int], Any] | None = None,
    include_last: bool = False,
    batches_per_step: int | None = None,
    probes: int = 16,
    seed: int = 0,
    progress: bool = True,
    micro_batch: int | None = None,
    checkpoint: bool | int = False,
) -> CompressResult:
    """Zero the least important weights of Conv/Linear layers, holding masks for fine-tuning.

    Masks come from per-parameter scores (|ΔL| of each weight).  Step s reaches
    sparsity 1 − (1 − sparsity)^(s/steps) of the scored weights; its scores use
    δ = −θ on the still-unpruned weights only (pruned weights are already zero,
    so their δ is zero).  The returned model carries ``torch.nn.utils.prune``
    reparametrizations (``weight_orig`` × ``weight_mask``), so fine-tuning keeps
    the zeros; :func:`make_permanent` folds them in.

    Args:
        model: never modified; a deep copy is pruned.
        sparsity: fraction of scored weights set to zero, in [0, 1).
        scope: "global" (one threshold) or "layer" (the same sparsity per layer).
        include_last: also prune the final classifier layer (off by default).
        micro_batch, checkpoint: memory controls for scoring, see ``oba_fx.compress``.

    Returns:
        CompressResult; ``report["sparsity"]`` gives the real per-layer sparsity.
    """
    if not (0 <= sparsity < 1):
        raise UsageError(f"sparsity must be in [0, 1), got {sparsity}")
    per_parameter = [c for c in criteria() if get_criterion(c).scores is not None]
    if criterion not in per_parameter:
        raise UsageError(f"criterion must be one of {per_parameter}, got {criterion!r}")
    if scope not in ("global", "layer"):
        raise UsageError(f"scope must be 'global' or 'layer', got {scope!r}")
    if not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive int, got {steps!r}")
    if calibration is None:
        raise CalibrationError("calibration is None: give an iterable of (inputs, targets) batches")
    if iter(calibration) is calibration:
        calibration = list(calibration)
    scoring = {"probes": probes, "progress": progress, "micro_batch": micro_batch, "checkpoint": checkpoint}
    t_start = time.perf_counter()
    work = copy.deepcopy(model)
    targets = _targets(work, include_last)
    if not targets:
        raise UsageError("the model has no Conv/Linear layers to prune")
    stream = BatchStream(calibration, batches_per_step)
    step_reports = []
    for step in range(1, steps + 1):
        goal = 1 - (1 - sparsity) ** (step / steps)
        t0 = time.perf_counter()
        scores, names = _step_scores(work, stream.next(), criterion, loss_fn, include_last,
                                     dict(scoring, seed=seed + step))
        rep = {"step": step, "goal": goal, "seconds": {"score": time.perf_counter() - t0}}
        _apply_masks(targets, _select(targets, names, scores, goal, scope))
        if finetune is not None:
            t0 = time.perf_counter()
            finetune(work, step)
            rep["seconds"]["finetune"] = time.perf_counter() - t0
        refresh_masked_weights(work)
        rep["sparsity"] = sparsity_report(work, [n for n, _ in targets])["overall"]
        step_reports.append(rep)
    report = {
        "criterion": criterion,
        "scope": scope,
        "steps": steps,
        "target_sparsity": sparsity,
        "sparsity": sparsity_report(work, [n for n, _ in targets]),
        "step_reports": step_reports,
        "seconds_total": time.perf_counter() - t_start,
    }
    return CompressResult(model=work, report=report)


def _step_scores(work, batches, criterion, loss_fn, include_last, scoring: dict):
    """Per-weight scores of one step: on a plain copy whose weights are the masked ones (δ = −θ is zero on
    pruned weights)."""
    plain = make_permanent(copy.deepcopy(refresh_masked_weights(work)))
    names = [f"{n}.weight" if n else "weight" for n, _ in _targets(plain, include_last)]
    return parameter_scores(plain, batches, criterion, loss_fn, params=names, **scoring), names


def _select(targets, names, scores, goal: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks reaching sparsity ``goal`` of the scored weights (one threshold, or one per layer)."""
    masks = {}
    for (mname, m), pname in zip(targets, names):
        w = _effective_weight(m)
        alive = w != 0 if prune.is_pruned(m) else torch.ones_like(w, dtype=torch.bool)
        imp = scores[pname].abs().to(torch.float64)
        masks[mname] = torch.where(alive, imp, torch.full_like(imp, -1.0))  # pruned stay pruned
    new_masks = {}
    if scope == "global":
        flat = torch.cat([v.reshape(-1) for v in masks.values()])
        k = int(round(goal * flat.numel()))
        chosen = torch.zeros(flat.numel(), dtype=torch.bool)
        if k:
            chosen[torch.argsort(flat, stable=True)[:k]] = True
        offset = 0
        for mname, v in masks.items():
            n = v.numel()
            new_masks[mname] = ~chosen[offset : offset + n].reshape(v.shape)
            offset += n
    else:
        for mname, v in masks.items():
            k = int(round(goal * v.numel()))
            keep = torch.ones(v.numel(), dtype=torch.bool)
            if k:
                keep[torch.argsort(v.reshape(-1), stable=True)[:k]] = False
            new_masks[mname] = keep.reshape(v.shape)
    return new_masks


def _apply_masks(targets, new_masks) -> None:
    for mname, m in targets:
        mask = new_masks[mname].to(m.weight.device, dtype=m.weight.dtype)
        if prune.is_pruned(m):
            prune.remove(m, "weight")
        prune.custom_from_mask(m, "weight", mask)
