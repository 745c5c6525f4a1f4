"""Compensation: after channels are removed, refit every consumer's remaining input weights.

A layer ``y = W x + b`` whose input lost the channels R keeps only the columns K. Its output on the
calibration data changes by ``X_R W_Rᵀ``. The least-squares refit of the kept weights (and the bias, as the
weight of a constant input) restores as much of the original output as the kept inputs can explain:

    W'_K = argmin_V ‖X_K Vᵀ − X Wᵀ‖² + λ‖V − W_K‖²
         = W_K + W_R G_RK (G_KK + λI)⁻¹,             G = XᵀX over the calibration data,

the Optimal Brain Surgeon update restricted to one consumer (ThiNet, Luo et al. 2017; He et al. 2017's
channel pruning; ZipLM's structured OBS). X is the layer's *original* input (from the unpruned model), so
every layer is refit against what it used to compute, independently of the others. λ is ``damping``
times the mean of diag(G_KK) (SparseGPT's dampening), which keeps the solve well posed when kept inputs
are collinear (a BatchNorm'd channel and its ReLU, padding columns of a conv).

Handled consumers: ``nn.Linear``, ``nn.Conv1d`` / ``nn.Conv2d`` (input unfolded into kernel columns, any
padding mode), grouped convs whose groups each lost the same columns (each group refit on its own
columns), and attention output projections (``nn.MultiheadAttention``'s ``out_proj``, whose input the
fused kernel never exposes, is captured by re-running the attention with an identity projection; timm-style
``self.proj`` Linears are plain Linears). A depthwise conv never needs it (its input channel vanishes with
its output). Layers whose Gram matrix would exceed ``max_dim`` columns, transposed convs, Conv3d and
weights used functionally (``F.linear(x, self.w)``) are left as sliced and listed in the report.

Owns :func:`compensate` (plan, Gram capture over ``passes.calibration.batches``, refit).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.stateless import _reparametrize_module

from .calibration import CalibrationError, batches as calibration_batches
from .modes import kept_modes
from .errors import UsageError

__all__ = ["compensate", "DEFAULT_DAMPING"]

#: λ as a fraction of the mean diagonal of the kept inputs' Gram matrix.
DEFAULT_DAMPING = 1e-2


def _columns(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the columns its weight multiplies: (samples, in · kernel), channel-major
    like ``weight.reshape(out, -1)`` (all groups side by side)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    pad = list(m._reversed_padding_repeated_twice)  # explicit, 'same' (also uneven) and 'valid' alike
    if isinstance(m, nn.Conv1d):
        x, pad = x.unsqueeze(-2), pad + [0, 0]  # (N, C, 1, L)
        k, s, d = (1, m.kernel_size[0]), (1, m.stride[0]), (1, m.dilation[0])
    else:
        k, s, d = m.kernel_size, m.stride, m.dilation
    if any(pad):
        x = F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
    cols = F.unfold(x, k, dilation=d, stride=s)  # (N, C·kh·kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class _Gram:
    """Σ xxᵀ over the calibration rows of one layer input (float64, optionally with a constant column)."""

    def __init__(self, dim: int, bias: bool, device):
        self.bias = bias
        self.G = torch.zeros(dim + bias, dim + bias, dtype=torch.float64, device=device)
        self.rows = 0

    def add(self, cols: torch.Tensor) -> None:
        c = cols.detach().to(torch.float64)
        if self.bias:
            c = torch.cat([c, torch.ones(c.shape[0], 1, dtype=c.dtype, device=c.device)], 1)
        self.G += c.T @ c
        self.rows += c.shape[0]


def _mha_parent(model: nn.Module, name: str) -> tuple[str, nn.MultiheadAttention] | None:
    owner, _, attr = name.rpartition(".")
    if attr != "out_proj":
        return None
    try:
        parent = model.get_submodule(owner)
    except AttributeError:
        return None
    return (owner, parent) if isinstance(parent, nn.MultiheadAttention) else None


def _plan(original: nn.Module, slim: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]], max_dim: int):
    """{name: (original module, slim module, groups, per-group removed columns)} and {name: why skipped}."""
    plan, skipped = {}, {}
    orig_modules = dict(original.named_modules())
    slim_modules = dict(slim.named_modules())
    for wname, dims in cuts.items():
        if 1 not in dims or not wname.endswith(".weight"):
            continue
        name = wname[: -len(".weight")]
        om, sm = orig_modules.get(name), slim_modules.get(name)
        if om is None or sm is None:
            continue  # a functional weight (not a module's)
        if isinstance(om, nn.Linear) and isinstance(sm, nn.Linear):
            groups = 1
        elif isinstance(om, (nn.Conv1d, nn.Conv2d)) and isinstance(sm, type(om)) and not om.transposed:
            groups = om.groups
            if sm.groups != om.groups:
                skipped[name] = "grouped conv whose number of groups changed"
                continue
            if om.groups == om.in_channels and om.groups > 1:
                continue  # depthwise: inputs vanish with their outputs
        else:
            skipped[name] = f"{type(om).__name__} input: not compensated"
            continue
        per_group = om.weight.shape[1]
        kernel = int(np.prod(om.weight.shape[2:])) if om.weight.ndim > 2 else 1
        dim = per_group * kernel
        if dim + 1 > max_dim:
            skipped[name] = f"{dim} input columns per group (max_dim={max_dim})"
            continue
        plan[name] = (om, sm, groups, np.asarray(dims[1]), dims.get(0))
    return plan, skipped


@contextlib.contextmanager
def _capture(original: nn.Module, plan, grams):
    """Hooks on the original model feeding each planned layer's input into its Gram matrix."""
    handles = []
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for name, (om, sm, groups, _, _) in plan.items():
            mha = _mha_parent(original, name)
            if mha is not None:
                owner, parent = mha

                def hook(mod, args, kwargs, out, _name=name):
                    e = mod.out_proj.weight.shape[1]
                    eye = torch.eye(e, dtype=mod.out_proj.weight.dtype, device=mod.out_proj.weight.device)
                    with _reparametrize_module(mod, {"out_proj.weight": eye,
                                                     "out_proj.bias": torch.zeros_like(eye[0])}):
                        pre = mod.forward(*args, **kwargs)[0]
                    grams[_name].add(pre.reshape(-1, e))

                handles.append(parent.register_forward_hook(hook, with_kwargs=True))
            else:
                def pre_hook(mod, args, _name=name):
                    grams[_name].add(_columns(mod, args[0]))

                handles.append(om.register_forward_pre_hook(pre_hook))
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in handles:
            h.remove()


class _GroupGrams(list):
    """One ``_Gram`` per conv group; ``add`` splits the columns (groups side by side) among them."""

    def add(self, cols: torch.Tensor) -> None:
        per = cols.shape[1] // len(self)
        for j, gram in enumerate(self):
            gram.add(cols[:, j * per:(j + 1) * per])


def compensate(original: nn.Module, slim: nn.Module, cuts: Mapping[str, Mapping[int, np.ndarray]],
               batches: Iterable, *, damping: float = DEFAULT_DAMPING, max_dim: int = 8192,
               max_batches: int | None = None) -> dict[str, Any]:
    """Refit the kept input weights (and biases) of every consumer in ``slim`` (in place).

    Args:
        original: the model before removal (its modules named as in ``slim``); not modified.
        slim: the rewritten model; consumers' weights and biases are overwritten.
        cuts: ``{weight name: {dim: removed indices}}`` (``passes.rewrite.tensor_cuts``).
        batches: calibration ``(inputs, targets)`` pairs; the original model's layer inputs are collected
            on them.
        damping: λ relative to the mean diagonal of each kept Gram block.
        max_dim: layers with more input columns per group are left as sliced.
        max_batches: use at most this many batches.

    Returns:
        ``{"layers": [names refit], "skipped": {name: why}, "rows": calibration rows per layer,
        "output_error": {name: (relative error before, after)}}``; the error is
        ‖X_K W'ᵀ − X Wᵀ‖ / ‖X Wᵀ‖ on the calibration data (from the Gram matrices, exact).
    """
    if damping < 0:
        raise UsageError(f"damping must be >= 0, got {damping}")
    plan, skipped = _plan(original, slim, cuts, max_dim)
    report: dict[str, Any] = {"layers": [], "skipped": skipped, "rows": {}, "output_error": {}}
    if not plan:
        return report
    device = next(original.parameters()).device
    grams = {}
    for name, (om, sm, groups, _, _) in plan.items():
        dim = om.weight.shape[1] * (int(np.prod(om.weight.shape[2:])) if om.weight.ndim > 2 else 1)
        grams[name] = _GroupGrams(_Gram(dim, sm.bias is not None, device) for _ in range(groups))
    used = 0
    with kept_modes(original, training=False):
        with torch.no_grad(), _capture(original, plan, grams):
            for batch in calibration_batches(batches, device, shard=False, max_batches=max_batches,
                                             move_targets=False):
                original(*batch.inputs)
                used += 1
    if used == 0:
        raise CalibrationError("compensation got no calibration batches")
    with torch.no_grad():
        for name, (om, sm, groups, removed_cols, removed_rows) in plan.items():
            errs = _refit(om, sm, groups, removed_cols, removed_rows, grams[name], damping)
            report["layers"].append(name)
            report["rows"][name] = grams[name][0].rows
            report["output_error"][name] = errs
    return report


def _refit(om, sm, groups, removed_cols, removed_rows, grams, damping) -> tuple[float, float]:
    W = om.weight.detach().to(torch.float64)
    out, per_group = W.shape[0], W.shape[1]
    kernel = int(np.prod(W.shape[2:])) if W.ndim > 2 else 1
    W = W.reshape(out, per_group * kernel)
    keep_rows = np.setdiff1d(np.arange(out), removed_rows if removed_rows is not None else [])
    keep_in = np.setdiff1d(np.arange(per_group), removed_cols)
    # kernel columns of the kept inputs, channel-major
    K = torch.as_tensor((keep_in[:, None] * kernel + np.arange(kernel)[None]).reshape(-1))
    bias = sm.bias is not None
    b = om.bias.detach().to(torch.float64) if om.bias is not None else torch.zeros(out, dtype=torch.float64)
    out_g = out // groups
    new_w = torch.empty(len(keep_rows), len(K), dtype=torch.float64)
    new_b = torch.empty(len(keep_rows), dtype=torch.float64)
    num_before = num_after = den = 0.0
    slim_row = 0
    for j, gram in enumerate(grams):
        rows = torch.as_tensor(keep_rows[(keep_rows >= j * out_g) & (keep_rows < (j + 1) * out_g)])
        if not len(rows):
            continue
        G = gram.G.cpu()
        Wj = W[rows]  # (r, dim)
        if bias:
            Wj = torch.cat([Wj, b[rows, None]], 1)
            Kb = torch.cat([K, torch.tensor([G.shape[0] - 1])])
        else:
            Kb = K
        G_KK = G[Kb][:, Kb]
        lam = damping * float(G_KK.diagonal().mean()) if len(Kb) else 0.0
        A = G_KK + lam * torch.eye(len(Kb), dtype=G.dtype)
        # W'_K = W_K + W_R G_RK A⁻¹, written as the normal equations of the full target: A V'ᵀ = G_K: Wᵀ + λ W_Kᵀ
        rhs = G[Kb] @ Wj.T + lam * Wj[:, Kb].T
        V = torch.linalg.solve(A, rhs).T  # (r, |Kb|)
        # output errors from the Gram matrix: ‖X_K Vᵀ − X Wᵀ‖² = tr(V G_KK Vᵀ) − 2 tr(V G_K: Wᵀ) + tr(W G Wᵀ)
        ref = float(torch.einsum("ri,ij,rj->", Wj, G, Wj))

        def err(Vk):
            return float(torch.einsum("ri,ij,rj->", Vk, G_KK, Vk) - 2 * torch.einsum("ri,ij,rj->", Vk, G[Kb], Wj)) + ref

        num_before += max(err(Wj[:, Kb]), 0.0)
        num_after += max(err(V), 0.0)
        den += ref
        n = len(rows)
        new_w[slim_row:slim_row + n] = V[:, :len(K)]
        new_b[slim_row:slim_row + n] = V[:, len(K)] if bias else 0.0
        slim_row += n
    shape = (len(keep_rows), len(keep_in)) + tuple(om.weight.shape[2:])
    if tuple(sm.weight.shape) != shape:
        raise RuntimeError(f"compensation: slim weight has shape {tuple(sm.weight.shape)}, expected {shape}")
    sm.weight.copy_(new_w.reshape(shape).to(sm.weight.dtype))
    if bias:
        sm.bias.copy_(new_b.to(sm.bias.dtype))
    scale = max(den, 1e-300)
    return (num_before / scale) ** 0.5, (num_after / scale) ** 0.5
