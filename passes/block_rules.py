"""Block rules: what each op contributes to the non-zero blocks of the network-curvature Hessian.

Owns :data:`BLOCK_RULES` (an :class:`~passes.registry.OpRegistry`), the typed answer a rule returns
(:class:`Flow`, with :data:`INPUTS` and :data:`CONSTANT`), the op tables and the built-in rules. The walk that
calls them, and the result, live in :mod:`passes.hessian_blocks`.

A rule is called as ``rule(ctx, node)`` for one ``call_module`` / ``call_function`` / ``call_method`` fx node.
It records the interactions the op creates between layers through ``ctx`` and returns a :class:`Flow`: which
layers the node's value depends on (``INPUTS``: the union of its inputs', the usual answer; ``Flow(mask)``: a
given set; ``CONSTANT``: none, the value carries no derivative). Layer sets are bit masks (``int``). ``ctx``
offers:

    ctx.inputs(node)            layers the node's inputs depend on
    ctx.mask(x)                 layers a node argument (a node, a list of them, or a python value) depends on
    ctx.own(node)               layers the called module owns (0 for functions and methods)
    ctx.module(node)            the called module
    ctx.smooth(node, mask)      every pair of layers in ``mask`` interacts (a smooth nonlinearity)
    ctx.product(node, x, y)     operands x and y are multiplied ("series" or "parallel", see the walk)
    ctx.multilinear(node, ops)  pairwise products of several operands
    ctx.record(node, reason, a, b)   layers ``a`` interact with layers ``b`` for ``reason``
    ctx.unknown(node, mask, extra="")  conservative "smooth" over ``mask`` plus a warning

Keys (see :mod:`passes.registry`): module types (a rule covers subclasses), function objects, and names. A name
key matches the tensor method of that name *and* every torch / operator / math / builtins function of that
name (:func:`op_key`): ``"mul"`` covers ``Tensor.mul``, ``torch.mul`` and ``operator.mul``. An exact function
key wins over a name key. An op without a rule goes to :func:`default_rule`: conservative, and warned about.

To extend the analysis to an op, register a rule the way the GELU rule at the end of this module is::

    @BLOCK_RULES.register(MyAct, "my_act")
    def my_act_rule(ctx, node):
        ctx.smooth(node, ctx.inputs(node))
        return INPUTS
"""
from __future__ import annotations

import builtins
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .attention import SlimMultiheadAttention
from .fxutil import node_arg
from .registry import OpRegistry

__all__ = ["Flow", "INPUTS", "CONSTANT", "BlockRules", "BLOCK_RULES", "op_key", "rule_for", "default_rule"]


# ---------------------------------------------------------------------------
# the answer of a rule and the registry


@dataclass(frozen=True)
class Flow:
    """What a rule answers: the layers the node's value depends on.

    Attributes:
        layers: bit mask of layer indices; None means the union of the node's inputs' layers.
        constant: the value carries no derivative: it depends on no layer, and curvature recorded upstream of
            it does not reach the output through it.
    """

    layers: int | None = None
    constant: bool = False


#: The node's value depends on the layers its inputs depend on.
INPUTS = Flow()
#: The node's value carries no derivative (a shape, a comparison, ``detach``, ``zeros_like``...).
CONSTANT = Flow(constant=True)

_TORCH_MODULES = ("torch", "_operator", "operator", "builtins", "math")


def op_key(node: torch.fx.Node) -> str | None:
    """The name a name key matches: a method's name, or a torch/operator function's name without dunders.

    None for a module call and for a callable outside torch / operator / math / builtins.
    """
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
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


class BlockRules(OpRegistry):
    """An :class:`OpRegistry` whose name keys also match torch / operator functions of that name (:func:`op_key`)."""

    def lookup(self, node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Callable | None:
        rule = super().lookup(node, modules)
        if rule is None and node.op == "call_function":
            name = op_key(node)
            if name is not None:
                rule = self.method_rule(name)
        return rule


#: The Hessian-block rules, keyed by module type, function or op name.
BLOCK_RULES = BlockRules("BLOCK_RULES")


def rule_for(ctx: Any, node: torch.fx.Node) -> Callable[[Any, torch.fx.Node], Flow]:
    """The rule the walk calls for a call node: hooked modules first, then :data:`BLOCK_RULES`, then the default."""
    if node.op == "call_module" and ctx.own(node):
        from torch.nn.utils import parametrize

        m = ctx.module(node)
        if parametrize.is_parametrized(m) or m._forward_pre_hooks or m._forward_hooks:
            return _hooked_module
    return BLOCK_RULES.lookup(node, ctx.modules) or default_rule


def _hooked_module(ctx, node) -> Flow:
    """A module with its own parameters and hooks or parametrizations: no rule can see what it computes."""
    mask = ctx.inputs(node) | ctx.own(node)
    ctx.unknown(node, mask, " with hooks or parametrizations")
    return Flow(mask)


def default_rule(ctx, node) -> Flow:
    """The answer where no rule applies: smooth over everything the op depends on, with a warning.

    A module owning parameters also adds its own layers to its value. A parameter-free module named like a
    known identity (timm's ``DropPath``, torchvision's ``StochasticDepth``) is linear instead.
    """
    upstream = ctx.inputs(node)
    if node.op == "call_module":
        own = ctx.own(node)
        if own:
            ctx.unknown(node, upstream | own)
            return Flow(upstream | own)
        if type(ctx.module(node)).__name__ in LINEAR_MODULE_NAMES:
            return INPUTS
    ctx.unknown(node, upstream)
    return INPUTS


# ---------------------------------------------------------------------------
# op tables

# linear or piecewise-linear in every tensor input: no interaction
LINEAR = {
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
FIRST_ARG = {"view_as", "reshape_as", "expand_as", "type_as"}
# the value carries no derivative
CONSTANT_OPS = {
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach", "detach_", "size", "dim", "numel",
    "sign", "sgn", "floor", "ceil", "round", "trunc", "floordiv", "floor_divide", "argmax", "argmin", "argsort",
    "heaviside", "bernoulli", "multinomial", "item", "tolist", "stride", "data_ptr", "ne", "eq", "lt", "le", "gt",
    "ge", "isnan", "isinf", "isfinite", "logical_and", "logical_or", "logical_not", "logical_xor", "long", "int",
    "bool", "short", "byte", "char", "nonzero", "bucketize", "searchsorted", "one_hot", "arange", "zeros", "ones",
    "full", "empty", "rand", "randn", "randint", "randperm", "tensor", "as_tensor", "_assert", "_assert_async",
}
# smooth nonlinearities of every tensor input (GELU is registered below, the way a user registers a rule)
SMOOTH = {
    "exp", "exp_", "exp2", "expm1", "log", "log_", "log2", "log10", "log1p", "sqrt", "sqrt_", "rsqrt", "rsqrt_",
    "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "arctan2", "sinh", "cosh", "tanh", "tanh_", "asinh",
    "acosh", "atanh", "sigmoid", "sigmoid_", "logsigmoid", "erf", "erfc", "erfinv", "reciprocal", "reciprocal_",
    "square", "square_", "silu", "silu_", "mish", "hardswish", "hardswish_", "elu", "elu_", "selu", "celu",
    "softplus", "softsign", "tanhshrink", "softmax", "log_softmax", "softmin", "glu", "logsumexp", "logcumsumexp",
    "normalize", "var", "std", "var_mean", "std_mean", "norm", "frobenius_norm", "nuclear_norm", "vector_norm",
    "matrix_norm", "cdist", "pdist", "cosine_similarity", "pairwise_distance", "lp_pool1d", "lp_pool2d",
    "lp_pool3d", "local_response_norm", "prod", "cumprod", "sinc", "lgamma", "digamma", "polygamma", "logit",
    "hypot", "xlogy", "special_erf", "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
    "huber_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div", "gumbel_softmax",
    "logaddexp", "logaddexp2", "sgn_smooth", "dist", "renorm", "rms_norm_stats",
}
# multilinear in the listed operands (pairwise products)
MULTILINEAR = {
    "matmul", "imatmul", "mm", "bmm", "mv", "dot", "vdot", "inner", "outer", "ger", "kron", "tensordot", "cross",
    "linalg_cross", "chain_matmul", "multi_dot", "bilinear", "mul", "mul_", "imul", "multiply",
}
ADD_PRODUCT = {"addmm", "addmm_", "addbmm", "addbmm_", "baddbmm", "baddbmm_", "addmv", "addmv_", "addr", "addr_",
               "addcmul", "addcmul_"}
DIV = {"truediv", "itruediv", "div", "div_", "divide", "true_divide", "rtruediv"}
POW = {"pow", "pow_", "ipow", "float_power", "__pow__", "rpow"}
# weight-times-input functions: op name -> (weight position, weight keyword)
WEIGHTED = {
    "linear": (1, "weight"), "conv1d": (1, "weight"), "conv2d": (1, "weight"), "conv3d": (1, "weight"),
    "conv_transpose1d": (1, "weight"), "conv_transpose2d": (1, "weight"), "conv_transpose3d": (1, "weight"),
    "conv_tbc": (1, "weight"), "embedding": (1, "weight"), "embedding_bag": (1, "weight"), "prelu": (1, "weight"),
}

LINEAR_MODULES: tuple[type, ...] = (
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
# parameter-free modules known by name only (their classes live in optional packages)
LINEAR_MODULE_NAMES = {"StochasticDepth", "DropPath", "Identity"}
SMOOTH_MODULES: tuple[type, ...] = (
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d, nn.GLU, nn.LogSigmoid,
    nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.LPPool1d, nn.LPPool2d, nn.CosineSimilarity, nn.PairwiseDistance,
)
# parameterised modules linear in their parameters: y = op(W, x), bilinear in (W, x)
SERIES_MODULES: tuple[type, ...] = (
    nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.PReLU,
)
NORM_MODULES: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _builtin(*ops):
    """Register a built-in rule; a key registered twice is a bug in the tables."""
    return BLOCK_RULES.register(*ops, replace=False)


# ---------------------------------------------------------------------------
# rules for ops without interactions or with one uniform interaction


@_builtin(*LINEAR, *LINEAR_MODULES, builtins.getattr)  # getattr: .T, .mT, .real are views
def linear_rule(ctx, node) -> Flow:
    """Linear or piecewise linear in every input: no interaction."""
    if ctx.own(node):  # a subclass with parameters of its own: no rule models them
        return default_rule(ctx, node)
    return INPUTS


@_builtin(*SMOOTH, *SMOOTH_MODULES)
def smooth_rule(ctx, node) -> Flow:
    """A smooth nonlinearity: every pair of layers its inputs depend on interacts, the diagonal included."""
    if ctx.own(node):
        return default_rule(ctx, node)
    ctx.smooth(node, ctx.inputs(node))
    return INPUTS


@_builtin(*CONSTANT_OPS)
def constant_rule(ctx, node) -> Flow:
    return CONSTANT


@_builtin(*FIRST_ARG)
def first_arg_rule(ctx, node) -> Flow:
    """Linear in the first argument; the others lend only a shape or dtype."""
    return Flow(ctx.mask(node.args[0]))


# ---------------------------------------------------------------------------
# function / method rules with products


@_builtin(*DIV)
def div_rule(ctx, node) -> Flow:
    """``a / b``: a product of ``a`` and ``1/b``, smooth in ``b``."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ctx.product(node, a, b)
    ctx.smooth(node, ctx.mask(b))
    return INPUTS


@_builtin(*POW)
def pow_rule(ctx, node) -> Flow:
    """``x ** p``: constant for ``p == 0``, linear for ``p == 1``, smooth otherwise."""
    base, exp = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("exponent")
    if isinstance(exp, numbers.Number) and not isinstance(base, numbers.Number):
        if exp == 0:
            return CONSTANT
        if exp == 1:
            return INPUTS
    ctx.smooth(node, ctx.inputs(node))
    return INPUTS


@_builtin(*MULTILINEAR)
def multilinear_rule(ctx, node) -> Flow:
    """matmul, mul, outer, ...: pairwise products of the tensor operands."""
    name = op_key(node)
    ops = node.args
    if name in ("chain_matmul", "multi_dot") and len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    if name in ("mul", "mul_", "imul", "multiply") and "other" in node.kwargs:
        ops = tuple(ops) + (node.kwargs["other"],)
    if name == "bilinear":
        ops = ops[:3]
    ctx.multilinear(node, ops)
    return INPUTS


@_builtin("einsum")
def einsum_rule(ctx, node) -> Flow:
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    ctx.multilinear(node, ops)
    return INPUTS


@_builtin(*ADD_PRODUCT)
def add_product_rule(ctx, node) -> Flow:
    """``input + alpha * (a ⊗ b)``: addmm, baddbmm, addcmul, ..."""
    ops = list(node.args[1:3]) + [
        v for k, v in node.kwargs.items() if k not in ("input", "beta", "alpha", "value", "out")
    ]
    ctx.multilinear(node, ops)
    return INPUTS


@_builtin("addcdiv", "addcdiv_")
def addcdiv_rule(ctx, node) -> Flow:
    t1, t2 = node_arg(node, 1, "tensor1"), node_arg(node, 2, "tensor2")
    ctx.product(node, t1, t2)
    ctx.smooth(node, ctx.mask(t2))
    return INPUTS


@_builtin("lerp")
def lerp_rule(ctx, node) -> Flow:
    """``start + w * (end - start)``: a product only where the weight is a tensor."""
    w = node_arg(node, 2, "weight")
    if isinstance(w, torch.fx.Node):
        ctx.product(node, w, [node.args[0], node_arg(node, 1, "end")])
    return INPUTS


@_builtin(*WEIGHTED)
def weighted_rule(ctx, node) -> Flow:
    """F.linear, F.conv*, F.embedding, F.prelu: the input times the weight operand."""
    name = op_key(node)
    wi, wname = WEIGHTED[name]
    x = node_arg(node, 0, "input")
    w = node_arg(node, wi, wname)
    if name in ("embedding", "embedding_bag"):
        psw = node.kwargs.get("per_sample_weights")
        ctx.product(node, [x, psw] if psw is not None else x, w)
    else:
        ctx.product(node, x, w)
    return INPUTS


@_builtin("layer_norm", "group_norm", "rms_norm")
def norm_fn_rule(ctx, node) -> Flow:
    """Normalisation statistics are smooth in the input; the affine weight multiplies the normalised input."""
    x = node.args[0]
    w = node_arg(node, 2, "weight")
    ctx.smooth(node, ctx.mask(x))
    ctx.product(node, x, w)
    return INPUTS


@_builtin("batch_norm", "instance_norm")
def batch_norm_fn_rule(ctx, node) -> Flow:
    """F.batch_norm / F.instance_norm and their torch.* twins (other argument order)."""
    name = op_key(node)
    if node.target is F.batch_norm or node.target is F.instance_norm:
        order = ("input", "running_mean", "running_var", "weight", "bias")
    else:  # torch.batch_norm / torch.instance_norm
        order = ("input", "weight", "bias", "running_mean", "running_var")
    a = {k: node_arg(node, i, k) for i, k in enumerate(order)}
    flag = node_arg(node, 5, "training" if name == "batch_norm" else "use_input_stats", name == "instance_norm")
    batch_stats = flag is not False or a["running_mean"] is None
    ctx.product(node, a["input"], a["weight"])
    if batch_stats:
        ctx.smooth(node, ctx.mask(a["input"]))
    if ctx.mask([a["running_mean"], a["running_var"]]):  # statistics computed from parameters
        ctx.unknown(node, ctx.inputs(node), " with parameter-dependent statistics")
    return INPUTS


@_builtin("scaled_dot_product_attention")
def sdpa_rule(ctx, node) -> Flow:
    """softmax(q kᵀ + mask) v: q·k product, smooth in q, k and the mask, times v."""
    q, k, v = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = node_arg(node, 3, "attn_mask")
    ctx.product(node, q, k)
    qk = ctx.mask(q) | ctx.mask(k) | ctx.mask(mask)
    ctx.smooth(node, qk)
    ctx.record(node, "parallel", qk, ctx.mask(v))
    return INPUTS


# ---------------------------------------------------------------------------
# module rules


@_builtin(*SERIES_MODULES)
def series_module_rule(ctx, node) -> Flow:
    """Linear, Conv, Embedding, PReLU: ``y = op(W, x)`` is bilinear in (W, x): series with all upstream layers."""
    own, upstream = ctx.own(node), ctx.inputs(node)
    if not own:
        return default_rule(ctx, node)
    ctx.record(node, "series", own, upstream)
    return Flow(upstream | own)


@_builtin(nn.Bilinear)
def bilinear_module_rule(ctx, node) -> Flow:
    """nn.Bilinear: series in its weight, and a product of its two inputs."""
    own, upstream = ctx.own(node), ctx.inputs(node)
    if not own:
        return default_rule(ctx, node)
    x1, x2 = node_arg(node, 0, "input1"), node_arg(node, 1, "input2")
    ctx.record(node, "series", own, upstream)
    ctx.product(node, x1, x2)
    return Flow(upstream | own)


@_builtin(nn.modules.batchnorm._NormBase)
def batch_norm_module_rule(ctx, node) -> Flow:
    """BatchNorm / InstanceNorm: smooth where statistics come from the batch; series in the affine part."""
    m, own, upstream = ctx.module(node), ctx.own(node), ctx.inputs(node)
    if m.training or not m.track_running_stats or m.running_mean is None:
        ctx.smooth(node, upstream)
    if not own:  # affine-free
        return INPUTS
    ctx.record(node, "series", own, upstream)
    return Flow(upstream | own)


@_builtin(*NORM_MODULES)
def norm_module_rule(ctx, node) -> Flow:
    """LayerNorm / GroupNorm / RMSNorm: smooth statistics, series in the affine part."""
    own, upstream = ctx.own(node), ctx.inputs(node)
    ctx.smooth(node, upstream)
    if not own:  # affine-free
        return INPUTS
    ctx.record(node, "series", own, upstream)
    return Flow(upstream | own)


@_builtin(nn.MultiheadAttention, SlimMultiheadAttention)
def attention_module_rule(ctx, node) -> Flow:
    """nn.MultiheadAttention: q/k/v projections, q·kᵀ, softmax, ·v, output projection."""
    own = ctx.own(node)
    if not own:
        return default_rule(ctx, node)
    q_in, k_in, v_in = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    masks = ctx.mask([node_arg(node, 3, "key_padding_mask"), node_arg(node, 5, "attn_mask")])
    Q, K, V = ctx.mask(q_in) | own, ctx.mask(k_in) | own, ctx.mask(v_in) | own
    ctx.record(node, "parallel", Q, K)
    ctx.smooth(node, Q | K | masks)
    ctx.record(node, "parallel", Q | K | masks, V)
    ctx.record(node, "series", own, Q | K | V | masks)
    return Flow(Q | K | V | masks)


# ---------------------------------------------------------------------------
# registered the way a user registers a rule: the public decorator and the public ctx helpers only


@BLOCK_RULES.register(nn.GELU, "gelu")
def gelu_rule(ctx, node) -> Flow:
    """GELU (nn.GELU, F.gelu, Tensor.gelu) is smooth: every pair of layers its input depends on interacts."""
    if ctx.own(node):  # a subclass with parameters of its own: no rule models them
        return default_rule(ctx, node)
    ctx.smooth(node, ctx.inputs(node))
    return INPUTS
