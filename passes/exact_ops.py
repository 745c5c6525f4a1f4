"""Exact composites for ops whose higher derivatives PyTorch lacks or gets wrong, as a TorchFunctionMode.

Owned here: :class:`ExactCurvatureOps` and :func:`composite_norms`.  Inside their ``with`` block (and only
there, only on the entering thread: a ``torch.overrides.TorchFunctionMode``, no patch of
``torch.nn.functional``) hardsigmoid, and with ``norms=True`` LayerNorm / GroupNorm, run as equal
compositions of differentiable primitives.  ``passes.curvature`` enters it around every scoring pass.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ExactCurvatureOps", "composite_norms"]


def _layer_norm_composite(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(normalized_shape), 0))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _group_norm_composite(input, num_groups, weight=None, bias=None, eps=1e-5):
    B, C = input.shape[:2]
    x = input.reshape(B, num_groups, -1)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    out = ((x - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    shape = (1, C) + (1,) * (input.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


def _hardsigmoid_composite(input, inplace=False):
    # the CPU/CUDA kernel's own formula, min(max(x + 3, 0), 6) / 6, so values agree bit for bit
    out = torch.clamp(input + 3.0, 0.0, 6.0) / 6.0
    return input.copy_(out) if inplace else out


class ExactCurvatureOps(torch.overrides.TorchFunctionMode):
    """Runs ops whose higher derivatives PyTorch lacks, or gets wrong, as equal composites.

    * ``hardsigmoid`` (MobileNetV3's squeeze-excitation gate; in place too):
      ``aten::hardsigmoid_backward`` has neither a derivative nor a forward-AD
      formula, so Hδ, Fδ, ∇³L and every torch.func HVP fail.  The composite
      clamp(x + 3, 0, 6) / 6 has the exact derivatives: 1/6 on (−3, 3), 0
      elsewhere, and 0 for every higher order (the kinks at ±3 are measure zero).
    * with ``norms=True``, LayerNorm/GroupNorm (``F.*`` and ``torch.*``): the
      fused layer_norm's hand-written double backward is not itself correctly
      differentiable (its third derivative is wrong by ~10% on torch 2.14.1),
      and its vmap batching rules give asymmetric Hessians; the composite
      (mean, var, rsqrt) is exact to all orders.  Used for the third-order term
      and the vmapped group-exact products.

    The other piecewise-linear activations (hardswish, relu6, hardtanh,
    leaky_relu, elu) have correct derivatives of every order in all three paths
    (forward AD, double backward, torch.func), checked against dense Hessians in
    ``tests/test_piecewise_linear.py``, and run natively.

    A TorchFunctionMode, not a monkeypatch of ``torch.nn.functional``: it covers
    ``nn.Module`` versions (which call ``F.*``), graph modules that call
    ``torch.*`` directly, and leaves other threads alone.
    """

    def __init__(self, norms: bool = False):
        super().__init__()
        self.table = {
            F.hardsigmoid: _hardsigmoid_composite,
            torch._C._nn.hardsigmoid: _hardsigmoid_composite,
            torch._C._nn.hardsigmoid_: lambda input: _hardsigmoid_composite(input, inplace=True),
        }
        if norms:
            self.table.update({
                F.layer_norm: _layer_norm_composite,
                torch.layer_norm: lambda *a, **k: _layer_norm_composite(*a[:5], **_drop_cudnn(k)),
                F.group_norm: _group_norm_composite,
                torch.group_norm: lambda *a, **k: _group_norm_composite(*a[:5], **_drop_cudnn(k)),
            })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return self.table.get(func, func)(*args, **(kwargs or {}))


def _drop_cudnn(kwargs):
    return {k: v for k, v in kwargs.items() if not k.startswith("cudnn")}


def composite_norms() -> ExactCurvatureOps:
    """``ExactCurvatureOps(norms=True)``: hardsigmoid and LayerNorm/GroupNorm as composites."""
    return ExactCurvatureOps(norms=True)

