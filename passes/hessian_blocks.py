"""Pass: which blocks of the network-curvature Hessian are structurally zero.

The Hessian of the loss ``L(θ) = mean ℓ(f(x; θ), y)`` splits as ``H = G + F``:
``G = Jᵀ ∇²ℓ J`` (Gauss-Newton) and ``F = Σ_k (∂ℓ/∂f_k) ∇²f_k`` (network
curvature).  For two layers ``l`` and ``m`` the block ``F_lm`` is a sum over
graph nodes of the node's *local* second derivative, contracted with the
first-order sensitivities of its inputs to ``θ_l`` and ``θ_m`` and pushed
linearly to the output.  It is therefore structurally zero unless some node
that reaches the output has a non-zero local second derivative between an
input depending on ``l`` and an input depending on ``m``:

* **series**: an op linear in its own parameters ``W_m`` applied to an input
  depending on ``θ_l`` (Linear, Conv, BatchNorm in eval mode, the affine part
  of LayerNorm, PReLU, ``F.linear`` / ``x * param`` with a parameter operand);
* **parallel**: a product of two tensors depending on parameters (matmul,
  bmm, einsum, ``a * b``, attention);
* **smooth**: a nonlinearity with a non-zero second derivative (GELU, softmax,
  normalisation statistics, exp, division by a tensor, hardswish, ...): every
  pair of layers its input depends on interacts, the diagonal included.

Linear and piecewise-linear ops (add, cat, views, pooling, ReLU, dropout in
eval mode, ...) create no interaction.  Ops without a rule are treated as
smooth over all their inputs' layers and reported: never predict zero where
the block could be non-zero.

The pass propagates, in topological order over the fx graph, the set of layers
each value depends on (as a bit mask), records the interactions at each node,
and keeps those recorded at nodes with a differentiable path to the output.

Known limits (all conservative or irrelevant for standard models): in-place
ops are assumed to mutate their first argument only, not views aliasing it;
a tuple-valued node's elements all depend on every layer the tuple depends on.
"""
from __future__ import annotations

import builtins
import math
import numbers
import operator
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import networkx as nx
import numpy as np
import torch
import torch.fx
import torch.nn as nn

from .attention import SlimMultiheadAttention
import torch.nn.functional as F

from .trace import TensorSpec, TracedGraph

__all__ = ["HessianBlocks", "analyze", "hessian_blocks", "check_blocks", "CATEGORIES"]

#: Heat-map categories of a block, in legend order.
CATEGORIES = ("zero", "series", "parallel", "smooth", "several", "unknown")
_BASE_REASONS = ("series", "parallel", "smooth")
_COLOURS = {
    "zero": "#f2f2f2",
    "series": "#4c78a8",
    "parallel": "#f58518",
    "smooth": "#54a24b",
    "several": "#7d3c98",
    "unknown": "#e45756",
}


# ---------------------------------------------------------------------------
# the result


class HessianBlocks:
    """Structural zero pattern of the layer blocks of the loss Hessian.

    Build it with :func:`hessian_blocks` (or :func:`analyze`).

    Attributes:
        layers: layer names in graph order: qualified names of parameterised
            modules called in the graph (``"layer1.0.conv1"``) and of
            parameters read directly (``"cls_token"``).
        warnings: one message per op the pass had no rule for (treated
            conservatively as a smooth nonlinearity).
    """

    def __init__(
        self,
        layers: Sequence[str],
        params: Mapping[str, Sequence[str]],
        reasons: Mapping[str, np.ndarray],
        reaches_output: np.ndarray,
        records: Sequence[tuple[str, str, np.ndarray, np.ndarray]] = (),
        warnings: Sequence[str] = (),
    ):
        """Wraps the analysis result.

        Args:
            layers: layer names in graph order.
            params: layer name -> qualified parameter names it owns.
            reasons: reason string -> symmetric ``(n, n)`` boolean matrix of
                the layer pairs that interact for that reason.
            reaches_output: ``(n,)`` boolean, the layers the output depends on.
            records: ``(fx node, reason, A, B)``: the node where layers ``A``
                (index array) interact with layers ``B``.
            warnings: messages about ops without a rule.
        """
        self.layers = list(layers)
        self._index = {name: i for i, name in enumerate(self.layers)}
        self._params = {k: list(v) for k, v in params.items()}
        self._reasons = {k: np.asarray(v, dtype=bool) for k, v in reasons.items()}
        n = len(self.layers)
        self._any = np.zeros((n, n), dtype=bool)
        for mat in self._reasons.values():
            self._any |= mat
        self._reaches = np.asarray(reaches_output, dtype=bool)
        self._records = list(records)
        self.warnings = list(warnings)

    # -- queries -------------------------------------------------------------
    def _idx(self, layer: str) -> int:
        try:
            return self._index[layer]
        except KeyError:
            raise KeyError(f"'{layer}' is not a layer of this graph; layers are {self.layers}") from None

    def params(self, layer: str) -> list[str]:
        """Qualified names of the parameters of ``layer``."""
        self._idx(layer)
        return list(self._params.get(layer, ()))

    def zero(self, l: str, m: str) -> bool:
        """True when the network-curvature block ``F_lm`` is structurally zero."""
        return not bool(self._any[self._idx(l), self._idx(m)])

    def reasons(self, l: str, m: str) -> list[str]:
        """Sorted reasons why ``F_lm`` may be non-zero (empty when it is zero)."""
        i, j = self._idx(l), self._idx(m)
        return sorted(r for r, mat in self._reasons.items() if mat[i, j])

    def reason(self, l: str, m: str) -> str:
        """Comma-joined sorted reasons, e.g. ``"series, smooth"``; ``""`` when ``F_lm`` is zero."""
        return ", ".join(self.reasons(l, m))

    def category(self, l: str, m: str) -> str:
        """One of :data:`CATEGORIES` for the heat map."""
        return _category(self.reasons(l, m))

    def gauss_newton_nonzero(self, l: str, m: str) -> bool:
        """True when the Gauss-Newton block ``G_lm`` may be non-zero (both layers reach the loss)."""
        return bool(self._reaches[self._idx(l)] and self._reaches[self._idx(m)])

    def reaches_output(self, layer: str) -> bool:
        """True when the model output depends on ``layer``."""
        return bool(self._reaches[self._idx(layer)])

    def where(self, l: str, m: str) -> list[tuple[str, str]]:
        """The fx nodes where ``l`` and ``m`` interact, as ``(node name, reason)``."""
        i, j = self._idx(l), self._idx(m)
        out = []
        for node, reason, a, b in self._records:
            if (i in a and j in b) or (j in a and i in b):
                if (node, reason) not in out:
                    out.append((node, reason))
        return out

    def pairs(self) -> Iterator[tuple[str, str, str]]:
        """Yields ``(l, m, reason)`` for every non-zero ``F`` block with ``l <= m`` in layer order."""
        ii, jj = np.nonzero(np.triu(self._any))
        for i, j in zip(ii.tolist(), jj.tolist()):
            yield self.layers[i], self.layers[j], self.reason(self.layers[i], self.layers[j])

    def counts(self) -> dict[str, int]:
        """Numbers of unordered layer pairs (diagonal included) per category, plus totals.

        Keys: every name in :data:`CATEGORIES`, ``layers``, ``pairs`` (all
        unordered pairs), ``nonzero`` (non-zero ``F`` blocks),
        ``diagonal_nonzero`` and ``gauss_newton_nonzero``.
        """
        n = len(self.layers)
        out = {c: 0 for c in CATEGORIES}
        for _, _, reason in self.pairs():
            out[_category(reason.split(", "))] += 1
        total = n * (n + 1) // 2
        out["zero"] = total - sum(out[c] for c in CATEGORIES[1:])
        r = int(self._reaches.sum())
        out.update(
            layers=n,
            pairs=total,
            nonzero=total - out["zero"],
            diagonal_nonzero=int(np.diag(self._any).sum()),
            gauss_newton_nonzero=r * (r + 1) // 2,
        )
        return out

    # -- reporting -----------------------------------------------------------
    def to_text(self, max_rows: int | None = None) -> str:
        """A summary of the counts followed by a table of the non-zero ``F`` blocks.

        Args:
            max_rows: at most this many table rows (all when None).
        """
        c = self.counts()
        reach = int(self._reaches.sum())
        lines = [
            f"Hessian blocks: {c['layers']} layers, {c['pairs']} layer pairs (l <= m, diagonal included)",
            f"  F (network curvature): {c['zero']} zero, {c['nonzero']} non-zero "
            f"({c['diagonal_nonzero']} on the diagonal): "
            + ", ".join(f"{k} {c[k]}" for k in CATEGORIES[1:]),
            f"  G (Gauss-Newton): {c['gauss_newton_nonzero']} non-zero "
            f"({reach} of {c['layers']} layers reach the loss)",
        ]
        rows = list(self.pairs())
        if rows:
            wl = max(len("layer l"), *(len(r[0]) for r in rows))
            wm = max(len("layer m"), *(len(r[1]) for r in rows))
            lines.append(f"{'layer l':<{wl}}  {'layer m':<{wm}}  reason")
            for l, m, reason in rows[: max_rows if max_rows is not None else None]:
                lines.append(f"{l:<{wl}}  {m:<{wm}}  {reason}")
            if max_rows is not None and len(rows) > max_rows:
                lines.append(f"... {len(rows) - max_rows} more")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        c = self.counts()
        return f"HessianBlocks({c['layers']} layers: {c['nonzero']} non-zero F blocks of {c['pairs']})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description: layers, their parameters, counts, non-zero blocks, warnings."""
        return {
            "layers": [
                {"name": l, "params": self.params(l), "reaches_output": self.reaches_output(l)} for l in self.layers
            ],
            "counts": self.counts(),
            "blocks": [
                {"l": l, "m": m, "reason": reason, "category": _category(reason.split(", "))}
                for l, m, reason in self.pairs()
            ],
            "warnings": list(self.warnings),
        }

    def to_networkx(self) -> nx.Graph:
        """Undirected graph: nodes are layers, edges (self-loops included) the non-zero ``F`` blocks.

        Node attributes: ``index``, ``params`` (comma-joined), ``reaches_output``.
        Edge attributes: ``reason``, ``category``.
        """
        g = nx.Graph()
        for i, l in enumerate(self.layers):
            g.add_node(l, index=i, params=",".join(self.params(l)), reaches_output=self.reaches_output(l))
        for l, m, reason in self.pairs():
            g.add_edge(l, m, reason=reason, category=_category(reason.split(", ")))
        return g

    def write_graphml(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_networkx` as GraphML (atomically)."""
        from ..io import atomic_write

        g = self.to_networkx()
        atomic_write(path, lambda tmp: nx.write_graphml(g, tmp))

    def to_dot(self) -> str:
        """Graphviz DOT text of :meth:`to_networkx` (undirected, edges labelled by reason)."""
        lines = ["graph hessian_blocks {", "  node [shape=box];"]
        for l in self.layers:
            style = "" if self.reaches_output(l) else ", style=dashed"
            lines.append(f"  {_dot_id(l)} [label={_dot_id(l)}{style}];")
        for l, m, reason in self.pairs():
            colour = _COLOURS[_category(reason.split(", "))]
            lines.append(f"  {_dot_id(l)} -- {_dot_id(m)} [label={_dot_id(reason)}, color=\"{colour}\"];")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def write_dot(self, path: str | os.PathLike) -> None:
        """Writes :meth:`to_dot` to ``path`` (atomically)."""
        from ..io import write_text

        write_text(path, self.to_dot())

    def plot(self, path: str | os.PathLike, title: str | None = None) -> None:
        """Writes a PNG heat map of the block structure of ``F`` (atomically).

        Layers run along both axes in graph order; each cell is coloured by
        category (zero, series, parallel, smooth, several reasons, unknown op).

        Args:
            path: the PNG file to write.
            title: figure title (a summary of the counts by default).
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch

        from ..io import atomic_write

        n = len(self.layers)
        codes = np.zeros((n, n), dtype=int)
        for i in range(n):
            for j in range(i, n):
                if self._any[i, j]:
                    codes[i, j] = codes[j, i] = CATEGORIES.index(self.category(self.layers[i], self.layers[j]))
        side = min(max(5.0, 0.22 * n + 3.0), 40.0)
        fig = Figure(figsize=(side + 2.5, side))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        cmap = ListedColormap([_COLOURS[c] for c in CATEGORIES])
        ax.imshow(codes, cmap=cmap, vmin=-0.5, vmax=len(CATEGORIES) - 0.5, interpolation="nearest")
        if n <= 120:
            size = max(3.0, min(9.0, 400.0 / max(n, 1)))
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels(self.layers, rotation=90, fontsize=size)
            ax.set_yticklabels(self.layers, fontsize=size)
        ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
        ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
        if n <= 60:
            ax.grid(which="minor", color="white", linewidth=0.5)
        ax.tick_params(which="minor", length=0)
        c = self.counts()
        present = [k for k in CATEGORIES if k != "unknown" or c["unknown"]]
        ax.legend(
            handles=[Patch(facecolor=_COLOURS[k], edgecolor="grey", label=f"{k} ({c[k]})") for k in present],
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize=8,
        )
        ax.set_title(title or f"F block structure: {c['nonzero']} of {c['pairs']} blocks non-zero", fontsize=10)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _category(reasons: Sequence[str]) -> str:
    reasons = [r for r in reasons if r]
    if not reasons:
        return "zero"
    if len(reasons) == 1:
        return reasons[0] if reasons[0] in _BASE_REASONS else "unknown"
    return "several"


def _dot_id(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------
# op tables

_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math")

# linear or piecewise-linear in every tensor input: no interaction
_LINEAR = {
    "add", "add_", "iadd", "sub", "sub_", "isub", "subtract", "rsub", "neg", "neg_", "negative", "positive", "pos",
    "cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack",
    "reshape", "view", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_", "ravel",
    "permute", "transpose", "transpose_", "t", "t_", "movedim", "moveaxis", "swapaxes", "swapdims", "adjoint",
    "getitem", "split", "split_with_sizes", "chunk", "tensor_split", "unbind", "narrow", "select", "index_select",
    "gather", "take", "take_along_dim", "masked_select", "roll", "flip", "fliplr", "flipud", "rot90", "diagonal",
    "diag", "diag_embed", "diagflat", "tril", "triu", "trace", "unfold", "fold",
    "mean", "sum", "nansum", "nanmean", "cumsum",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "fractional_max_pool2d", "fractional_max_pool3d", "max_unpool1d", "max_unpool2d", "max_unpool3d",
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_", "threshold", "threshold_",
    "hardshrink", "softshrink", "rrelu", "hardsigmoid", "prelu_scalar",
    "dropout", "dropout_", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "identity", "pad", "expand", "repeat", "repeat_interleave", "tile", "broadcast_to", "contiguous", "clone",
    "float", "double", "half", "bfloat16", "to", "type", "cpu", "cuda", "requires_grad_",
    "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "grid_sample_fixed",
    "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "native_channel_shuffle",
    "clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_max", "maximum", "minimum", "fmax", "fmin",
    "max", "min", "amax", "amin", "abs", "abs_", "absolute", "where", "masked_fill", "masked_fill_",
    "masked_scatter", "index_add", "index_copy", "index_fill", "scatter", "scatter_add", "index_put", "put",
    "sort", "topk", "kthvalue", "median", "nanmedian", "cummax", "cummin", "msort", "real", "imag", "view_as_real",
    "view_as_complex", "conj", "resolve_conj", "resolve_neg", "frac", "fmod", "remainder", "mod", "as_strided",
    "align_as", "refine_names", "rename", "squeeze_copy", "permute_copy", "unsqueeze_copy", "view_copy",
    "expand_copy", "transpose_copy", "narrow_copy", "select_copy", "unbind_copy", "split_copy",
}
# linear in the first argument; the others only lend a shape/dtype
_FIRST_ARG = {"view_as", "reshape_as", "expand_as", "type_as"}
# the value carries no derivative
_CONSTANT = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach", "detach_", "size", "dim", "numel",
    "sign", "sgn", "floor", "ceil", "round", "trunc", "floordiv", "floor_divide", "argmax", "argmin", "argsort",
    "heaviside", "bernoulli", "multinomial", "item", "tolist", "stride", "data_ptr", "ne", "eq", "lt", "le", "gt",
    "ge", "isnan", "isinf", "isfinite", "logical_and", "logical_or", "logical_not", "logical_xor", "long", "int",
    "bool", "short", "byte", "char", "nonzero", "bucketize", "searchsorted", "one_hot", "arange", "zeros", "ones",
    "full", "empty", "rand", "randn", "randint", "randperm", "tensor", "as_tensor", "_assert", "_assert_async",
}
# smooth nonlinearities of every tensor input
_SMOOTH = {
    "exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log10", "log1p", "sqrt", "sqrt_", "rsqrt", "rsqrt_",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "arctan2", "sinh", "cosh", "tanh", "tanh_", "asinh",
    "acosh", "atanh", "sigmoid", "sigmoid_", "logsigmoid", "erf", "erfc", "erfinv", "reciprocal", "reciprocal_",
    "square", "square_", "gelu", "silu", "silu_", "mish", "hardswish", "hardswish_", "elu", "elu_", "selu", "celu",
    "softplus", "softsign", "tanhshrink", "softmax", "log_softmax", "softmin", "glu", "logsumexp", "logcumsumexp",
    "normalize", "var", "std", "var_mean", "std_mean", "norm", "frobenius_norm", "nuclear_norm", "vector_norm",
    "matrix_norm", "cdist", "pdist", "cosine_similarity", "pairwise_distance", "lp_pool1d", "lp_pool2d",
    "lp_pool3d", "local_response_norm", "prod", "cumprod", "sinc", "lgamma", "digamma", "polygamma", "logit",
    "hypot", "xlogy", "special_erf", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "gumbel_softmax",
    "logaddexp", "logaddexp2", "sgn_smooth", "dist", "renorm", "rms_norm_stats",
}
# multilinear in the listed operands (pairwise products)
_MULTILINEAR = {
    "matmul", "imatmul", "mm", "bmm", "mv", "dot", "vdot", "inner", "outer", "ger", "kron", "tensordot", "cross",
    "linalg_cross", "chain_matmul", "multi_dot", "bilinear", "mul", "mul_", "imul", "multiply",
}
_ADD_PRODUCT = {"addmm", "addmm_", "addbmm", "addbmm_", "baddbmm", "baddbmm_", "addmv", "addmv_", "addr", "addr_",
                "addcmul", "addcmul_"}
_DIV = {"truediv", "itruediv", "div", "div_", "divide", "true_divide", "rtruediv"}
_POW = {"pow", "pow_", "ipow", "float_power", "__pow__", "rpow"}
# weight-times-input functions: op name -> (weight position, weight keyword)
_WEIGHTED = {
    "linear": (1, "weight"), "conv1d": (1, "weight"), "conv2d": (1, "weight"), "conv3d": (1, "weight"),
    "conv_transpose1d": (1, "weight"), "conv_transpose2d": (1, "weight"), "conv_transpose3d": (1, "weight"),
    "conv_tbc": (1, "weight"), "embedding": (1, "weight"), "embedding_bag": (1, "weight"), "prelu": (1, "weight"),
}

_LINEAR_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.RReLU,
    nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, nn.Flatten, nn.Unflatten, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Fold, nn.Unfold,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.MaxUnpool1d, nn.MaxUnpool2d, nn.MaxUnpool3d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)
_LINEAR_MODULE_NAMES = {"StochasticDepth", "DropPath", "Identity"}
_SMOOTH_MODULES: tuple[type, ...] = (
    nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU, nn.LogSigmoid,
    nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.LPPool1d, nn.LPPool2d, nn.CosineSimilarity, nn.PairwiseDistance,
)
# parameterised modules linear in their parameters: y = op(W, x), bilinear in (W, x)
_SERIES_MODULES: tuple[type, ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.PReLU,
)
_NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _name_of(node: torch.fx.Node) -> str | None:
    """The op name used for table lookup; None for a callable outside torch/operator."""
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    mod = getattr(t, "__module__", None)
    objclass = getattr(t, "__objclass__", None)
    tensor_method = mod is None and isinstance(objclass, type) and issubclass(objclass, torch._C.TensorBase)
    if not tensor_method and (mod is None or mod.split(".")[0] not in _TORCH_MODULES):
        return None
    name = getattr(t, "__name__", None)
    if name and name.startswith("__") and name.endswith("__"):
        name = name[2:-2]
    return name


def _describe(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}".lstrip(".")


def _arg(node: torch.fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _spec_differentiable(spec: Any) -> bool:
    """Whether a recorded value can carry a derivative (unknown values: yes)."""
    if spec is None:
        return True
    if isinstance(spec, TensorSpec):
        return spec.dtype.is_floating_point or spec.dtype.is_complex
    if isinstance(spec, tuple):
        return any(isinstance(s, (TensorSpec, tuple)) and _spec_differentiable(s) for s in spec)
    return False


def _lookup(gm: torch.fx.GraphModule, qualname: str):
    mod, _, attr = qualname.rpartition(".")
    return getattr(gm.get_submodule(mod) if mod else gm, attr)


# ---------------------------------------------------------------------------
# the pass


@dataclass
class _Record:
    node: str
    reason: str
    a: int
    b: int


class _Analyzer:
    """Forward propagation of layer masks and interaction records over one traced graph."""

    def __init__(self, traced: TracedGraph):
        self.gm = traced.gm
        self.nodes = list(self.gm.graph.nodes)
        self.modules = dict(self.gm.named_modules())
        self.anc: dict[str, int] = {}  # node -> bit mask of layers its value depends on
        self.data: dict[str, bool] = {}  # node -> depends on a model input
        self.const: set[str] = set()  # nodes whose value carries no derivative
        self.pending: dict[str, list[_Record]] = {}
        self.extra_preds: dict[str, list[str]] = {}  # in-place mutations seen by later users
        self.warnings: list[str] = []
        self._find_layers()

    # -- layers --------------------------------------------------------------
    def _find_layers(self) -> None:
        """Layers in graph order, their parameter names, and which layers each call/get_attr uses."""
        canonical = {id(p): name for name, p in self.gm.named_parameters()}
        first: dict[str, int] = {}
        params: dict[str, list[str]] = {}
        owners: dict[int, set[str]] = {}  # param id -> layers owning it
        for pos, n in enumerate(self.nodes):
            if n.op != "call_module":
                continue
            ps = list(self.modules[n.target].parameters())
            if not ps:
                continue
            first.setdefault(n.target, pos)
            params[n.target] = [canonical[id(p)] for p in ps]
            for p in ps:
                owners.setdefault(id(p), set()).add(n.target)
        for pos, n in enumerate(self.nodes):
            if n.op != "get_attr":
                continue
            t = _lookup(self.gm, n.target)
            if not isinstance(t, nn.Parameter) or id(t) in owners:
                continue
            first.setdefault(n.target, pos)
            params[n.target] = [canonical[id(t)]]
            owners[id(t)] = {n.target}
        self.layers = sorted(first, key=lambda k: first[k])
        self.index = {l: i for i, l in enumerate(self.layers)}
        self.params = params
        self.owners = {pid: sum(1 << self.index[l] for l in ls) for pid, ls in owners.items()}
        self._bits_cache: dict[int, np.ndarray] = {}

    def bits(self, mask: int) -> np.ndarray:
        """Index array of the layers in a bit mask."""
        out = self._bits_cache.get(mask)
        if out is None:
            s = bin(mask)[:1:-1]
            out = np.array([i for i, c in enumerate(s) if c == "1"], dtype=np.int64)
            self._bits_cache[mask] = out
        return out

    def module_mask(self, module: nn.Module) -> int:
        mask = 0
        for p in module.parameters():
            mask |= self.owners.get(id(p), 0)
        return mask

    # -- helpers used by the rules --------------------------------------------
    def A(self, a) -> int:
        """Layer mask of an argument (0 for constants and python values)."""
        if isinstance(a, torch.fx.Node):
            return self.anc.get(a.name, 0)
        if isinstance(a, (list, tuple)):
            m = 0
            for x in a:
                m |= self.A(x)
            return m
        return 0

    def D(self, a) -> bool:
        if isinstance(a, torch.fx.Node):
            return self.data.get(a.name, False)
        if isinstance(a, (list, tuple)):
            return any(self.D(x) for x in a)
        return False

    def record(self, node: torch.fx.Node, reason: str, a: int, b: int) -> None:
        if a and b:
            self.pending.setdefault(node.name, []).append(_Record(node.name, reason, a, b))

    def smooth(self, node, mask: int, reason: str = "smooth") -> None:
        self.record(node, reason, mask, mask)

    def product(self, node, x, y) -> None:
        """Bilinear interaction of operands ``x`` and ``y`` (nodes, lists of nodes, or None).

        The reason is "series" when exactly one side depends on the model
        input (a parameter-only tensor times an activation), else "parallel".
        """
        self.record(node, "series" if self.D(x) != self.D(y) else "parallel", self.A(x), self.A(y))

    def multilinear(self, node, operands: Sequence) -> None:
        ops = [o for o in operands if isinstance(o, torch.fx.Node)]
        for i in range(len(ops)):
            for j in range(i + 1, len(ops)):
                self.product(node, ops[i], ops[j])

    def unknown(self, node, mask: int, extra: str = "") -> None:
        desc = _describe(node, self.modules)
        self.smooth(node, mask, f"unknown op {desc}{extra} (conservative)")
        if mask:
            self.warnings.append(
                f"hessian_blocks: no curvature rule for {desc}{extra} at node '{node.name}'; "
                "assumed every pair of layers its inputs depend on interacts there"
            )

    # -- main loop ------------------------------------------------------------
    def run(self) -> HessianBlocks:
        for node in self.nodes:
            self.data[node.name] = node.op == "placeholder" or any(self.D(a) for a in node.all_input_nodes)
            if node.op == "placeholder":
                self.anc[node.name] = 0
                continue
            if node.op == "get_attr":
                t = _lookup(self.gm, node.target)
                self.anc[node.name] = self.owners.get(id(t), 0) if isinstance(t, torch.Tensor) else 0
                continue
            if node.op == "output":
                self.anc[node.name] = self.A(list(node.all_input_nodes))
                continue
            if not _spec_differentiable(node.meta.get("spec")):
                self.anc[node.name] = 0
                self.const.add(node.name)
                continue
            union = self.A(list(node.all_input_nodes))
            out = self.dispatch(node, union)
            if out is None:
                out = union
            if out == "constant":
                self.anc[node.name] = 0
                self.const.add(node.name)
                continue
            self.anc[node.name] = out
            self._inplace(node)
        return self.finish()

    def _inplace(self, node) -> None:
        """An in-place op also changes its first argument for the nodes that follow."""
        inplace = False
        if node.op == "call_method":
            inplace = str(node.target).endswith("_") and not str(node.target).endswith("__")
        elif node.op == "call_function":
            inplace = node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                      operator.ipow, operator.imatmul)
        elif node.op == "call_module":
            inplace = getattr(self.modules[node.target], "inplace", False) is True
        if not inplace or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        target = node.args[0]
        self.anc[target.name] = self.anc.get(target.name, 0) | self.anc[node.name]
        seen = False
        for n in self.nodes:
            if n is node:
                seen = True
                continue
            if seen and target in n.all_input_nodes:
                self.extra_preds.setdefault(n.name, []).append(node.name)

    def dispatch(self, node, union: int):
        if node.op == "call_module":
            return self.module_rule(node, self.modules[node.target], union)
        name = _name_of(node)
        if node.op == "call_function" and node.target is builtins.getattr:
            return None  # .T, .mT, .real: views
        if name is None:
            self.unknown(node, union)
            return None
        return self.function_rule(node, name, union)

    # -- function / method rules ---------------------------------------------
    def function_rule(self, node, name: str, union: int):
        if name in _CONSTANT:
            return "constant"
        if name in _FIRST_ARG:
            return self.A(node.args[0])
        if name in _LINEAR:
            return None
        if name in _SMOOTH:
            self.smooth(node, union)
            return None
        if name in _DIV:
            a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            self.product(node, a, b)
            self.smooth(node, self.A(b))
            return None
        if name in _POW:
            base, exp = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
            if isinstance(exp, numbers.Number) and not isinstance(base, numbers.Number):
                if exp == 0:
                    return "constant"
                if exp == 1:
                    return None
            self.smooth(node, union)
            return None
        if name in _MULTILINEAR:
            ops = node.args
            if name in ("chain_matmul", "multi_dot") and len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = ops[0]
            if name in ("mul", "mul_", "imul", "multiply") and "other" in node.kwargs:
                ops = tuple(ops) + (node.kwargs["other"],)
            if name == "bilinear":
                ops = ops[:3]
            self.multilinear(node, ops)
            return None
        if name == "einsum":
            ops = node.args[1:]
            if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
                ops = ops[0]
            self.multilinear(node, ops)
            return None
        if name in _ADD_PRODUCT:  # input + alpha * (a ⊗ b)
            ops = list(node.args[1:3]) + [
                v for k, v in node.kwargs.items() if k not in ("input", "beta", "alpha", "value", "out")
            ]
            self.multilinear(node, ops)
            return None
        if name in ("addcdiv", "addcdiv_"):
            t1, t2 = _arg(node, 1, "tensor1"), _arg(node, 2, "tensor2")
            self.product(node, t1, t2)
            self.smooth(node, self.A(t2))
            return None
        if name == "lerp":
            w = _arg(node, 2, "weight")
            if isinstance(w, torch.fx.Node):
                self.product(node, w, [node.args[0], _arg(node, 1, "end")])
            return None
        if name in _WEIGHTED:
            wi, wname = _WEIGHTED[name]
            x = _arg(node, 0, "input")
            w = _arg(node, wi, wname)
            if name in ("embedding", "embedding_bag"):
                psw = node.kwargs.get("per_sample_weights")
                self.product(node, [x, psw] if psw is not None else x, w)
            else:
                self.product(node, x, w)
            return None
        if name in ("layer_norm", "group_norm", "rms_norm"):
            x = node.args[0]
            w = _arg(node, 2, "weight")
            self.smooth(node, self.A(x))
            self.product(node, x, w)
            return None
        if name in ("batch_norm", "instance_norm"):
            return self.batch_norm_fn(node, name, union)
        if name == "scaled_dot_product_attention":
            q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
            mask = _arg(node, 3, "attn_mask")
            self.product(node, q, k)
            qk = self.A(q) | self.A(k) | self.A(mask)
            self.smooth(node, qk)
            self.record(node, "parallel", qk, self.A(v))
            return None
        self.unknown(node, union)
        return None

    def batch_norm_fn(self, node, name: str, union: int):
        """F.batch_norm / F.instance_norm and their torch.* twins (other argument order)."""
        if node.target is F.batch_norm or node.target is F.instance_norm:
            order = ("input", "running_mean", "running_var", "weight", "bias")
        else:  # torch.batch_norm / torch.instance_norm
            order = ("input", "weight", "bias", "running_mean", "running_var")
        a = {k: _arg(node, i, k) for i, k in enumerate(order)}
        flag = _arg(node, 5, "training" if name == "batch_norm" else "use_input_stats", name == "instance_norm")
        batch_stats = flag is not False or a["running_mean"] is None
        self.product(node, a["input"], a["weight"])
        if batch_stats:
            self.smooth(node, self.A(a["input"]))
        if self.A([a["running_mean"], a["running_var"]]):  # statistics computed from parameters
            self.unknown(node, union, " with parameter-dependent statistics")
        return None

    # -- module rules ----------------------------------------------------------
    def module_rule(self, node, m: nn.Module, union: int):
        own = self.module_mask(m)
        inputs = list(node.all_input_nodes)
        upstream = self.A(inputs)
        if own:
            from torch.nn.utils import parametrize

            if parametrize.is_parametrized(m) or m._forward_pre_hooks or m._forward_hooks:
                self.unknown(node, upstream | own, " with hooks or parametrizations")
                return upstream | own
            if isinstance(m, (nn.MultiheadAttention, SlimMultiheadAttention)):
                return self.mha(node, m, own)
            if isinstance(m, nn.Bilinear):
                x1, x2 = _arg(node, 0, "input1"), _arg(node, 1, "input2")
                self.record(node, "series", own, upstream)
                self.product(node, x1, x2)
                return upstream | own
            if isinstance(m, _SERIES_MODULES):
                self.record(node, "series", own, upstream)
                return upstream | own
            if isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm / InstanceNorm
                if m.training or not m.track_running_stats or m.running_mean is None:
                    self.smooth(node, upstream)
                self.record(node, "series", own, upstream)
                return upstream | own
            if isinstance(m, _NORM_MODULES):
                self.smooth(node, upstream)
                self.record(node, "series", own, upstream)
                return upstream | own
            self.unknown(node, upstream | own)
            return upstream | own
        if isinstance(m, nn.modules.batchnorm._NormBase):  # affine-free norms
            if m.training or not m.track_running_stats or m.running_mean is None:
                self.smooth(node, upstream)
            return None
        if isinstance(m, _NORM_MODULES):
            self.smooth(node, upstream)
            return None
        if isinstance(m, _LINEAR_MODULES) or type(m).__name__ in _LINEAR_MODULE_NAMES:
            return None
        if isinstance(m, _SMOOTH_MODULES):
            self.smooth(node, upstream)
            return None
        self.unknown(node, upstream)
        return None

    def mha(self, node, m: nn.MultiheadAttention, own: int) -> int:
        """nn.MultiheadAttention: q/k/v projections, q·kᵀ, softmax, ·v, output projection."""
        q_in, k_in, v_in = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
        masks = self.A([_arg(node, 3, "key_padding_mask"), _arg(node, 5, "attn_mask")])
        Q, K, V = self.A(q_in) | own, self.A(k_in) | own, self.A(v_in) | own
        self.record(node, "parallel", Q, K)
        self.smooth(node, Q | K | masks)
        self.record(node, "parallel", Q | K | masks, V)
        self.record(node, "series", own, Q | K | V | masks)
        return Q | K | V | masks

    # -- liveness and result -----------------------------------------------------
    def finish(self) -> HessianBlocks:
        out_node = self.nodes[-1] if self.nodes and self.nodes[-1].op == "output" else None
        live: set[str] = set()
        if out_node is not None:
            stack = [out_node]
            live.add(out_node.name)
            by_name = {n.name: n for n in self.nodes}
            while stack:
                n = stack.pop()
                if n.name in self.const and n is not out_node:
                    continue
                preds = [a.name for a in n.all_input_nodes] + self.extra_preds.get(n.name, [])
                for p in preds:
                    if p not in live:
                        live.add(p)
                        stack.append(by_name[p])
        n = len(self.layers)
        reasons: dict[str, np.ndarray] = {}
        records = []
        for node_name, recs in self.pending.items():
            if node_name not in live:
                continue
            for r in recs:
                a, b = self.bits(r.a), self.bits(r.b)
                mat = reasons.setdefault(r.reason, np.zeros((n, n), dtype=bool))
                mat[np.ix_(a, b)] = True
                mat[np.ix_(b, a)] = True
                records.append((node_name, r.reason, a, b))
        reach = np.zeros(n, dtype=bool)
        if out_node is not None:
            reach[self.bits(self.anc.get(out_node.name, 0))] = True
        warnings = list(dict.fromkeys(self.warnings))
        return HessianBlocks(self.layers, self.params, reasons, reach, records, warnings)


def analyze(traced: TracedGraph) -> HessianBlocks:
    """Runs the Hessian block-structure pass over a traced graph.

    Args:
        traced: the IR from :func:`passes.trace.trace_module` (eval mode).

    Returns:
        The :class:`HessianBlocks` of the graph's layers.
    """
    return _Analyzer(traced).run()


def hessian_blocks(graph) -> HessianBlocks:
    """Which layer blocks of the loss Hessian are structurally zero.

    Args:
        graph: an ``oba_fx.Graph`` (from ``oba_fx.trace``) or a
            :class:`passes.trace.TracedGraph`.

    Returns:
        A :class:`HessianBlocks`: ``zero(l, m)`` / ``reason(l, m)`` for the
        network-curvature part ``F``, ``gauss_newton_nonzero(l, m)`` for ``G``,
        plus text, JSON, networkx, GraphML, DOT and PNG views.
    """
    traced = getattr(graph, "_traced", graph)
    if not isinstance(traced, TracedGraph):
        raise TypeError(
            f"hessian_blocks expects an oba_fx.Graph (from oba_fx.trace) or a TracedGraph, got {type(graph).__name__}"
        )
    return analyze(traced)


# ---------------------------------------------------------------------------
# numerical check


def _layer_param_names(blocks: HessianBlocks, layer: str, named: Mapping[str, torch.Tensor]) -> list[str]:
    names = [p for p in blocks.params(layer) if p in named]
    if names:
        return names
    return [p for p in named if p == layer or p.startswith(layer + ".")]


def check_blocks(
    blocks: HessianBlocks,
    model: nn.Module,
    calibration: Any,
    fvp: Callable[[nn.Module, Any, dict[str, torch.Tensor]], Mapping[str, torch.Tensor]],
    probes: int = 2,
    seed: int = 0,
) -> dict[tuple[str, str], float]:
    """Estimates ``‖F_lm v‖`` for every ordered layer pair with random probes.

    For each layer ``m`` and probe, draws a Gaussian ``v`` on ``m``'s
    parameters (zero on all others), computes ``F·v`` with ``fvp`` and takes
    the norm of its restriction to each layer ``l``; the result is the maximum
    over probes.  One ``fvp`` call per (layer, probe) gives every ``l``.

    Args:
        blocks: the analysis result whose layers are checked.
        model: the model (parameter names as in ``model.named_parameters()``).
        calibration: passed through to ``fvp``.
        fvp: ``fvp(model, calibration, v) -> {param name: F·v}``, ``v`` a dict
            of tensors shaped like the model's parameters.
        probes: random probes per layer.
        seed: seed of the probe generator.

    Returns:
        ``{(l, m): max over probes of ‖(F v_m)_l‖}`` for every ordered pair;
        ``nan`` where a layer has no parameter in the model or in ``fvp``'s answer.
    """
    named = dict(model.named_parameters())
    groups = {l: _layer_param_names(blocks, l, named) for l in blocks.layers}
    gen = torch.Generator().manual_seed(seed)
    out: dict[tuple[str, str], float] = {(l, m): float("nan") for m in blocks.layers for l in blocks.layers}
    for m in blocks.layers:
        if not groups[m]:
            continue
        for _ in range(probes):
            v = {name: torch.zeros_like(p.detach()) for name, p in named.items()}
            for name in groups[m]:
                p = named[name]
                v[name] = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
            fv = fvp(model, calibration, v)
            for l in blocks.layers:
                present = [fv[n] for n in groups[l] if n in fv]
                if not present:
                    continue
                norm = math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in present))
                prev = out[(l, m)]
                out[(l, m)] = norm if math.isnan(prev) else max(prev, norm)
    return out
