"""Coupling rules for elementwise ops: activations, arithmetic, comparisons, dtype/device casts, dropout.

Every output dim couples with the input dims it broadcasts from (right-aligned;
size-1 dims broadcast and stay).  Covers the functions, the tensor methods and
the activation / dropout / identity modules.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import COUPLING_RULES, RuleContext, is_tensor

ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg, operator.pow,
    operator.iadd, operator.imul, operator.isub, operator.itruediv, operator.mod,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide, torch.true_divide,
    torch.maximum, torch.minimum, torch.where, torch.pow, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.sigmoid, torch.tanh, torch.relu, torch.clamp, torch.clip, torch.sin, torch.cos, torch.erf,
    torch.square, torch.reciprocal, torch.masked_fill, torch.lerp, torch.addcmul,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.hardtanh, F.leaky_relu, F.elu, F.selu,
    F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.softmax, F.log_softmax,
    F.normalize, torch.softmax, torch.log_softmax, F.softsign,
    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
)
ELEMENTWISE_METHODS = (
    "add", "sub", "mul", "div", "pow", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "sigmoid", "tanh", "relu",
    "clamp", "clip", "maximum", "minimum", "masked_fill", "type_as", "contiguous", "clone", "detach", "float",
    "half", "double", "bfloat16", "to", "type", "softmax", "log_softmax", "add_", "mul_", "sub_", "div_",
    "relu_", "clamp_", "sigmoid_", "tanh_", "square", "reciprocal", "erf", "where", "lerp", "addcmul",
    "requires_grad_", "cpu", "cuda", "exp_", "neg_", "sin", "cos", "erf_", "log1p", "expm1", "sign", "floor",
    "round", "logical_not", "bool", "int", "long", "ge", "gt", "le", "lt", "eq", "ne",
)


def _stochastic_depth_types() -> tuple[type, ...]:
    try:
        from torchvision.ops import StochasticDepth

        return (StochasticDepth,)
    except ImportError:
        return ()


ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Tanhshrink,
) + _stochastic_depth_types()


@COUPLING_RULES.register(*ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS)
def elementwise_rule(r: RuleContext, node):
    out = r.value(node)
    r.broadcast(out, [a for a in node.all_input_nodes if is_tensor(a)])


@COUPLING_RULES.register(*ELEMENTWISE_MODULES)
def elementwise_module_rule(r: RuleContext, node):
    r.eq_all(r.value(node.args[0]), r.value(node))
