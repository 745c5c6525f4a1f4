"""The δ = −θ shortcuts of the forward-over-reverse pass, and the group marginals that ride on them.

Owned here: the custom autograd functions that replace PyTorch's own dual-number formulas where the
direction is minus the weight (linear, convolution, eval-mode batch norm), the dual GELU (any direction),
the marginal layer (a weight's row/column sums of δ⊙q without its weight gradient) and
:class:`NegThetaMode`, the TorchFunctionMode that routes ``F.*`` calls to them.  ``passes.curvature``
enters the mode around a batch's dual forward and backward (``shortcuts=True``, the default).
Every shortcut checks its condition (a tangent equal to −θ, checked, not assumed) and otherwise leaves the
call to PyTorch, so any direction gives the same products as the ordinary path.
"""
from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

__all__ = ["NegThetaMode", "MarginalStore", "is_neg_theta"]


# --------------------------------------------------------------------------- δ = −θ fast path
#
# With δ_W = −W a linear map's tangent needs one product instead of two:
#   d/dε [(W − εW)(x + εẋ)] = W ẋ − W x = W (ẋ − x)
# and the tangent of its input-gradient likewise: Wᵀ ġ − Wᵀ g = Wᵀ (ġ − g).  Only the
# weight-gradient's tangent keeps two products (ẋ ⊗ g + x ⊗ ġ).  That is 7 instead of 9
# matrix products per layer for the forward-over-reverse pass.  It applies exactly when
# a weight's tangent equals minus its value (checked, not assumed), so any other
# direction takes the ordinary path.


def is_neg_theta(w) -> bool:
    """Whether ``w`` is a dual tensor whose tangent equals minus its primal."""
    if not isinstance(w, torch.Tensor):
        return False
    p, t = fwAD.unpack_dual(w)
    return t is not None and t.shape == p.shape and torch.equal(t, -p)


class _NegThetaLinear(torch.autograd.Function):
    """``x Wᵀ`` with ``δ_W = −W``. The subtractions ride in the GEMM (``addmm`` with β = −1): the output's
    tangent ``ẋWᵀ − y`` and the input-gradient's ``ġW − gW`` each cost one product and no extra pass."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        y = F.linear(x, w)
        ctx.y = y  # for jvp, which forward AD calls right after this (w always has a tangent here)
        return y

    @staticmethod
    def jvp(ctx, x_t, w_t):
        y = ctx.y
        del ctx.y
        if x_t is None:
            return -y
        w = fwAD.unpack_dual(ctx.saved_tensors[1]).primal
        k = y.shape[-1]
        return torch.addmm(y.reshape(-1, k), x_t.reshape(-1, x_t.shape[-1]), w.t(), beta=-1).reshape(y.shape)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        g2 = gp.reshape(-1, gp.shape[-1])
        gx = gw = None
        if ctx.needs_input_grad[0]:
            p = g2 @ wp
            t = torch.addmm(p, gt.reshape(-1, gt.shape[-1]), wp, beta=-1) if gt is not None else -p
            gx = fwAD.make_dual(p.reshape(xp.shape), t.reshape(xp.shape))
        if ctx.needs_input_grad[1]:
            x2 = xp.reshape(-1, xp.shape[-1])
            t = g2.t() @ xt.reshape(-1, xt.shape[-1]) if xt is not None else None
            if gt is not None:
                gt2 = gt.reshape(-1, gt.shape[-1]).t()
                t = gt2 @ x2 if t is None else t.addmm_(gt2, x2)
            gw = fwAD.make_dual(g2.t() @ x2, torch.zeros_like(wp) if t is None else t)
        return gx, gw


class _NegThetaConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, conv, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.conv_args = (conv, stride, padding, dilation, groups)
        return conv(x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, x_t, w_t, *_):
        conv, stride, padding, dilation, groups = ctx.conv_args
        x, w = (fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        if x_t is None:
            return -conv(x, w, None, stride, padding, dilation, groups)
        return conv(x_t - x, w, None, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        conv, stride, padding, dilation, groups = ctx.conv_args
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        nd = wp.ndim - 2
        expand = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
        st, pd, dl = expand(stride), expand(padding), expand(dilation)

        def bwd(grad, inp, mask):
            return torch.ops.aten.convolution_backward(grad, inp, wp, None, st, pd, dl, False, [0] * nd, groups,
                                                       mask)

        # 3 fused calls instead of 5: (g, x) and (ġ, x) each give their input- and weight-gradient in one
        # call (the input-gradient's tangent Wᵀ(ġ − g) is Wᵀġ − Wᵀg by linearity); only (g, ẋ) stands apart.
        nx, nw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        px, pw, _ = bwd(gp, xp, [nx, nw, False])
        tx = tw = None
        if gt is not None:
            tx, tw, _ = bwd(gt, xp, [nx, nw, False])
        gx = gw = None
        if nx:
            gx = fwAD.make_dual(px, tx - px if tx is not None else -px)
        if nw:
            t = bwd(gp, xt, [False, True, False])[1] if xt is not None else torch.zeros_like(wp)
            if tw is not None:
                t = t + tw
            gw = fwAD.make_dual(pw, t)
        return gx, gw, None, None, None, None, None


class _NegThetaBatchNorm(torch.autograd.Function):
    """Eval-mode batch norm, a per-channel affine map ``y = x·a + b`` with ``a = γ/√(v+ε)``, ``b = β − μa``.

    With δ = −θ on γ (and on β, or no β) both ``a`` and ``b`` scale by (1 − ε), so ``ẏ = a ẋ − y``; the
    backward's dual products are ``∂L/∂x = g a`` (tangent ``ġ a − g a``), ``∂L/∂γ = Σ g x̂`` (tangent
    ``Σ ġ x̂ + Σ g ẋ/σ``) and ``∂L/∂β = Σ g`` (tangent ``Σ ġ``). Each of those is one call of PyTorch's fused
    eval-mode batch-norm backward (``Σ g ẋ/σ`` with a zero mean), where PyTorch's own forward AD of
    ``native_batch_norm_backward`` composes about twenty elementwise passes and costs as much as the
    convolutions around it.
    """

    @staticmethod
    def forward(ctx, x, w, b, mean, var, eps):
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w, b)
        ctx.stats = (mean, var, eps, b is not None)
        return F.batch_norm(x, mean, var, w, b, False, 0.0, eps)

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        mean, var, eps, _ = ctx.stats
        x, w, b = (None if v is None else fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        y = F.batch_norm(x, mean, var, w, b, False, 0.0, eps)
        if x_t is None:
            return -y
        a = (w * torch.rsqrt(var + eps)).reshape((1, -1) + (1,) * (x.ndim - 2))
        return (x_t * a).sub_(y)

    @staticmethod
    def backward(ctx, g):
        mean, var, eps, has_bias = ctx.stats
        x, w = ctx.saved_tensors
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = has_bias and ctx.needs_input_grad[2]

        def nbb(grad, inp, m, mask):  # fused eval-mode backward: (grad·a, Σ grad·(inp − m)/σ, Σ grad)
            return torch.ops.aten.native_batch_norm_backward(grad, inp, wp, m, var, None, None, False, eps, mask)

        gx_p, gw_p, gb_p = nbb(gp, xp, mean, [need_x, need_w, need_b])
        if gt is not None:
            gx_2, gw_2, gb_2 = nbb(gt, xp, mean, [need_x, need_w, need_b])
        gx = gw = gb = None
        if need_x:
            gx = fwAD.make_dual(gx_p, gx_2.sub_(gx_p) if gt is not None else -gx_p)
        if need_w:
            t = nbb(gp, xt, torch.zeros_like(mean), [False, True, False])[1] if xt is not None else \
                torch.zeros_like(wp)
            gw = fwAD.make_dual(gw_p, t + gw_2 if gt is not None else t)
        if need_b:
            gb = fwAD.make_dual(gb_p, gb_2 if gt is not None else torch.zeros_like(wp))
        return gx, gw, gb, None, None, None


def _gelu_second(x, approximate: str):
    """f''(x) of GELU, elementwise: exact ``φ(x)(2 − x²)``; tanh form ``(1 − t²)(u' + ½x(u'' − 2t u'²))``."""
    if approximate == "tanh":
        c = math.sqrt(2.0 / math.pi)
        x2 = x * x
        t = torch.tanh(c * (x + 0.044715 * x2 * x))
        du = c * (1.0 + 3 * 0.044715 * x2)
        return (1.0 - t * t) * (du + 0.5 * x * (c * 6 * 0.044715 * x - 2.0 * t * du * du))
    c = 1.0 / math.sqrt(2.0 * math.pi)
    h = x * x
    return h.mul(-c).add_(2.0 * c).mul_(h.mul_(-0.5).exp_())  # two buffers, six passes


class _DualGelu(torch.autograd.Function):
    """GELU whose input carries a tangent: ``ẏ = f'(x)ẋ`` and, in the backward, ``∂L/∂x = g f'(x)`` with
    tangent ``ġ f'(x) + g ẋ f''(x)``. ``f'`` products are PyTorch's fused ``gelu_backward``; PyTorch's own
    forward AD of ``gelu_backward`` composes about fifteen elementwise passes (a fifth of a ViT's scoring)."""

    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.approximate = approximate
        return F.gelu(x, approximate=approximate)

    @staticmethod
    def jvp(ctx, x_t, _):
        x = fwAD.unpack_dual(ctx.saved_tensors[0]).primal
        return torch.ops.aten.gelu_backward(x_t, x, approximate=ctx.approximate)

    @staticmethod
    def backward(ctx, g):
        xp, xt = fwAD.unpack_dual(ctx.saved_tensors[0])
        gp, gt = fwAD.unpack_dual(g)
        a = ctx.approximate
        p = torch.ops.aten.gelu_backward(gp, xp, approximate=a)
        t = torch.ops.aten.gelu_backward(gt, xp, approximate=a) if gt is not None else None
        if xt is not None:
            s = _gelu_second(xp, a).mul_(gp)
            t = s.mul_(xt) if t is None else t.addcmul_(s, xt)
        return fwAD.make_dual(p, torch.zeros_like(p) if t is None else t), None


# --------------------------------------------------------------------------- group marginals
#
# A coupled group's score needs a weight's per-parameter score only summed along its member dims: its rows
# (output channels, dim 0) and columns (input channels, dim 1).  For a layer y = W·x with δ_W = −W those sums
# need no weight gradient at all.  For rows, Σ_c W_oc (gᵀx)_oc = Σ_n g_no (Wx)_no, and for columns,
# Σ_o W_oc (gᵀx)_oc = Σ_n x_nc (Wᵀg)_nc.  The same holds for the weight gradient's tangent ġᵀx + gᵀẋ, with
# Wẋ = ẏ + y and Wᵀġ = (Wᵀġ − Wᵀg) + Wᵀg, which the pass has anyway.  (For convolutions the sums run over
# batch and space, and for grouped ones the column sum folds the groups together.)  So with marginals a
# layer's backward costs its two input-gradient products and no weight-gradient product: 4 instead of 7
# matrix products per layer, plus a few elementwise passes.  The output y (bias included) and its tangent
# are kept by the mode for the batch.  An in-place op on them afterwards (a ReLU(inplace=True) straight after
# a bias-carrying conv) bumps their version, and the backward then recomputes them from x.


class MarginalStore:
    """Per-batch store of the δ⊙(gradient) and δ⊙(gradient tangent) marginals of routed weights."""

    def __init__(self, by_id: dict[int, tuple[str, tuple[int, ...]]]):
        self.by_id = by_id
        self.q = None  # the quantity of the backward now running (set by passes.curvature for each backward)
        self.records: dict[tuple[str, str], dict[str, dict[int, torch.Tensor]]] = {}
        self.kept: list = []

    def keep(self, *ts):
        self.kept.append([ts, [None if t is None else t._version for t in ts]])
        return len(self.kept) - 1

    def add(self, name: str, part: str, dim: int, vec: torch.Tensor):
        slot = self.records.setdefault((self.q, name), {}).setdefault(part, {})
        slot[dim] = vec.to(torch.float64) if dim not in slot else slot[dim].add_(vec.to(torch.float64))


def _bview(b, conv, ndim):
    return b if conv is None else b.reshape((1, -1) + (1,) * (ndim - 2))


#: elements per chunk of _dot's products (about 1 MB of float32: the product stays in cache)
_DOT_CHUNK = 1 << 18


def _dots(pairs: list, red: tuple[int, ...]) -> list:
    """``[(a * b).sum(red) for a, b in pairs]`` (red includes dim 0; every tensor of the same shape, a pair
    with None gives None) in one loop over chunks along dim 0: no product of the whole size is allocated (those
    of large activations page-fault in otherwise), and each chunk is read from memory once for all pairs."""
    live = [(a, b) for a, b in pairs if a is not None and b is not None]
    if not live:
        return [None] * len(pairs)
    first = live[0][0]
    k = max(1, _DOT_CHUNK // max(1, first[0].numel())) if first.ndim else 1
    sums = None
    for i in range(0, first.shape[0] if first.ndim else 1, k):
        part = [(a[i:i + k] * b[i:i + k]).sum(red) if first.ndim else a * b for a, b in live]
        sums = part if sums is None else [acc.add_(v) for acc, v in zip(sums, part)]
    it = iter(sums)
    return [None if a is None or b is None else next(it) for a, b in pairs]


def _fold_groups(v: torch.Tensor, groups: int) -> torch.Tensor:
    return v if groups == 1 else v.reshape(groups, -1).sum(0)


class _MarginalLayer(torch.autograd.Function):
    """``y = W·x + b`` (F.linear or F.conv{1,2,3}d) with δ = −θ on W (and b); the backward returns the input
    gradient and the bias gradient as dual numbers and writes W's row and column marginals to the store,
    returning no weight gradient."""

    @staticmethod
    def forward(ctx, x, w, b, store, name, dims, frozen_bias, conv, stride, padding, dilation, groups):
        xp, wp = fwAD.unpack_dual(x).primal, fwAD.unpack_dual(w).primal
        bp = None if b is None else fwAD.unpack_dual(b).primal
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)
        ctx.meta = (store, name, dims, conv, stride, padding, dilation, groups, bp)
        ctx.frozen_bias = frozen_bias  # ḃ = 0 instead of −b (decided by the mode: forward sees no tangents)
        if conv is None:  # into a fresh tensor: F.linear of an N-d input returns a view, which in-place ops
            # on a custom Function's output reject (Swin V2's ReLU(inplace=True) after its MLP's linear)
            o, c = wp.shape
            y = torch.empty((*xp.shape[:-1], o), dtype=torch.result_type(xp, wp), device=xp.device)
            x2 = xp.reshape(-1, c)
            if bp is None:
                torch.mm(x2, wp.t(), out=y.view(-1, o))
            else:
                torch.addmm(bp, x2, wp.t(), out=y.view(-1, o))
        else:
            y = conv(xp, wp, bp, stride, padding, dilation, groups)
        ctx.slot = store.keep(y, None)
        return y

    @staticmethod
    def jvp(ctx, x_t, w_t, b_t, *_):
        store, _, _, conv, stride, padding, dilation, groups, bp = ctx.meta
        kept = store.kept[ctx.slot]
        y = kept[0][0]
        if x_t is None:  # ẏ = −Wx − b = −y (or −Wx = b − y for a frozen bias); Wẋ = 0
            return _bview(bp, conv, y.ndim) - y if ctx.frozen_bias else -y
        x, w = (fwAD.unpack_dual(v).primal for v in ctx.saved_tensors)
        if conv is None:
            k = y.shape[-1]
            yt = torch.addmm(y.reshape(-1, k), x_t.reshape(-1, x_t.shape[-1]), w.t(), beta=-1).reshape(y.shape)
        else:
            yt = conv(x_t, w, None, stride, padding, dilation, groups).sub_(y)
        if ctx.frozen_bias:
            yt = yt.add_(_bview(bp, conv, y.ndim))
        kept[0] = (y, yt)
        kept[1] = [y._version, yt._version]
        return yt

    @staticmethod
    def backward(ctx, g):
        store, name, dims, conv, stride, padding, dilation, groups, bp = ctx.meta
        x, w = ctx.saved_tensors
        xshape = x.shape
        xp, xt = fwAD.unpack_dual(x)
        wp = fwAD.unpack_dual(w).primal
        gp, gt = fwAD.unpack_dual(g)
        (y, yt), versions = store.kept[ctx.slot]
        dirty = y._version != versions[0] or (yt is not None and yt._version != versions[1])
        # the kept output is the very tensor forward AD attached ẏ to: its primal only (else every product with it
        # below would carry a tangent product too)
        y = fwAD.unpack_dual(y).primal
        yt = None if yt is None else fwAD.unpack_dual(yt).primal
        if dirty:  # modified in place after the forward: recompute from x (exact, one or two more products)
            y = F.linear(xp, wp, bp) if conv is None else conv(xp, wp, bp, stride, padding, dilation, groups)
            yt = None
            if xt is not None:
                wx = F.linear(xt, wp) if conv is None else conv(xt, wp, None, stride, padding, dilation, groups)
                yt = wx.sub_(y)
                if ctx.frozen_bias:
                    yt = yt.add_(_bview(bp, conv, y.ndim))
        if conv is None:
            red = (0,)
            o, c = wp.shape[0], wp.shape[-1]
            xp, xt = xp.reshape(-1, c), None if xt is None else xt.reshape(-1, c)
            gp, gt = gp.reshape(-1, o), None if gt is None else gt.reshape(-1, o)
            y, yt = y.reshape(-1, o), None if yt is None else yt.reshape(-1, o)
        else:
            red = (0,) + tuple(range(2, gp.ndim))
            nd = wp.ndim - 2
            expand = lambda v: list(v) if isinstance(v, (tuple, list)) else [v] * nd  # noqa: E731
            st, pd, dl = expand(stride), expand(padding), expand(dilation)
        need_x = ctx.needs_input_grad[0]
        need_b = bp is not None and ctx.needs_input_grad[2]
        fold = groups if conv is not None else 1
        sums = need_b or (0 in dims and bp is not None)
        gsum = gp.sum(red) if sums else None
        gtsum = gt.sum(red) if sums and gt is not None else None
        if 0 in dims:
            # rows: −Σ g⊙(Wx) and −Σ (ġ⊙(Wx) + g⊙(Wẋ)), with Wx = y − b and Wẋ = ẏ + y (− b when b is frozen)
            gy, gty, gyt = _dots([(gp, y), (gt, y), (gp, yt)], red)
            store.add(name, "prim", 0, -(gy if bp is None else gy - bp * gsum))
            rt = None
            if gty is not None:
                rt = gty if bp is None else gty - bp * gtsum
            if gyt is not None:
                wxt = gyt + gy if not ctx.frozen_bias else gyt + gy - bp * gsum
                rt = wxt if rt is None else rt + wxt
            if rt is not None:
                store.add(name, "tan", 0, -rt)
        p = t = None  # Wᵀg and Wᵀġ − Wᵀg (the input gradient and its tangent)
        if need_x or 1 in dims:
            if conv is None:
                p = gp @ wp
                if gt is not None:
                    # Wᵀ(ġ − g): the difference on the narrower side of the product
                    t = (gt - gp) @ wp if wp.shape[0] < wp.shape[1] else torch.addmm(p, gt, wp, beta=-1)
            else:
                def back(grad):
                    return torch.ops.aten.convolution_backward(grad, xp, wp, None, st, pd, dl, False, [0] * nd,
                                                               groups, [True, False, False])[0]
                p = back(gp)
                if gt is not None:
                    t = back(gt).sub_(p)
        if 1 in dims:
            # columns: −Σ x⊙(Wᵀg) and −Σ (x⊙(Wᵀġ) + ẋ⊙(Wᵀg)), with Wᵀġ = t + Wᵀg
            xg, xtt, xtg = _dots([(xp, p), (xp, t), (xt, p)], red)
            store.add(name, "prim", 1, _fold_groups(-xg, fold))
            ct = None if xtt is None else xtt + xg
            if xtg is not None:
                ct = xtg if ct is None else ct + xtg
            if ct is not None:
                store.add(name, "tan", 1, _fold_groups(-ct, fold))
        gx = gb = None
        if need_x:
            gx = fwAD.make_dual(p.reshape(xshape), (t if t is not None else -p).reshape(xshape))
        if need_b:
            gb = fwAD.make_dual(gsum.reshape(bp.shape), (gtsum if gtsum is not None else torch.zeros_like(gsum))
                                .reshape(bp.shape))
        return gx, None, gb, None, None, None, None, None, None, None, None, None


class NegThetaMode(torch.overrides.TorchFunctionMode):
    """Routes F.linear / F.conv{1,2,3}d whose weight has tangent −weight, eval-mode F.batch_norm whose
    weight (and bias) do, and F.gelu whose input has a tangent, to the functions above."""

    CONVS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

    def __init__(self, marginals: MarginalStore | None = None):
        super().__init__()
        self.hits = 0  # δ = −θ shortcuts taken (their condition is on the direction)
        self.gelu_hits = 0  # dual GELUs (exact for any direction)
        self.marginal_hits = 0  # layers whose weight gave marginals instead of a weight gradient
        self.marginals = marginals

    def _marginal(self, w, b, x):
        """(name, dims) when this weight is a routed leaf with δ = −θ (and its bias too, or none)."""
        if self.marginals is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        hit = self.marginals.by_id.get(id(w))
        frozen = b is not None and fwAD.unpack_dual(b).tangent is None
        if hit is None or not is_neg_theta(w) or not (b is None or frozen or is_neg_theta(b)):
            return None
        return (*hit, frozen)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
            a = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5,
                 **dict(zip(names, args)), **kwargs}
            stats = (a["running_mean"], a["running_var"])
            if (not a["training"] and all(isinstance(v, torch.Tensor) and fwAD.unpack_dual(v).tangent is None
                                          for v in stats)
                    and is_neg_theta(a["weight"]) and (a["bias"] is None or is_neg_theta(a["bias"]))
                    and a["input"].ndim >= 2):
                self.hits += 1
                return _NegThetaBatchNorm.apply(a["input"], a["weight"], a["bias"], a["running_mean"],
                                                a["running_var"], a["eps"])
            return func(*args, **kwargs)
        if func is F.gelu:
            a = {"approximate": "none", **dict(zip(("input", "approximate"), args)), **kwargs}
            x = a["input"]
            if (isinstance(x, torch.Tensor) and x.is_floating_point() and fwAD.unpack_dual(x).tangent is not None
                    and a["approximate"] in ("none", "tanh")):
                self.gelu_hits += 1
                return _DualGelu.apply(x, a["approximate"])
            return func(*args, **kwargs)
        if func is F.linear:
            a = {"bias": None, **dict(zip(("input", "weight", "bias"), args)), **kwargs}
            hit = self._marginal(a.get("weight"), a["bias"], a.get("input"))
            if hit is not None:
                self.hits += 1
                self.marginal_hits += 1
                return _MarginalLayer.apply(a["input"], a["weight"], a["bias"], self.marginals, *hit, None, 1, 0,
                                            1, 1)
            if is_neg_theta(a.get("weight")):
                self.hits += 1
                y = _NegThetaLinear.apply(a["input"], a["weight"])
                return y if a["bias"] is None else y + a["bias"]
        elif func in self.CONVS:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
            a = {**defaults, **dict(zip(names, args)), **kwargs}
            hit = None if isinstance(a["padding"], str) else self._marginal(a["weight"], a["bias"], a["input"])
            if hit is not None:
                self.hits += 1
                self.marginal_hits += 1
                return _MarginalLayer.apply(a["input"], a["weight"], a["bias"], self.marginals, *hit, func,
                                            a["stride"], a["padding"], a["dilation"], a["groups"])
            if not isinstance(a["padding"], str) and is_neg_theta(a["weight"]):
                self.hits += 1
                y = _NegThetaConv.apply(a["input"], a["weight"], func, a["stride"], a["padding"], a["dilation"],
                                        a["groups"])
                b = a["bias"]
                return y if b is None else y + b.reshape((1, -1) + (1,) * self.CONVS[func])
        return func(*args, **kwargs)
