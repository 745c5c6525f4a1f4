"""Give back the in-place residual adds (and ReLUs) that symbolic tracing and pickling drop.

``torch.fx`` proxies have no ``__iadd__``, so ``out += identity`` in a traced model (torchvision's ResNet
blocks, most residual code) becomes ``out = out + identity``: every block then allocates a fresh
activation-size tensor, and in PyTorch eager on a CPU that allocation (and its first-touch page faults)
costs more than the add itself (resnet50 at batch 32: the slim model's forward runs 2.23 s with the
out-of-place adds, 2.03 s with them in place).

:func:`inplace_adds` turns ``a + b`` back into ``a.add_(b)`` where that cannot change any result:

- ``a`` is the output of a module of an exact built-in type (convolution, linear, batch/layer/group norm)
  whose backward does not read its own output, so autograd (fine-tuning) is unaffected;
- the add is ``a``'s only user, so nothing else sees the change;
- at run time, ``a`` already has the broadcast shape and the result dtype (else the ordinary ``a + b``
  runs).

and a ReLU (an exact ``nn.ReLU`` module, or ``F.relu`` / ``torch.relu`` without ``inplace``) into
``x.relu_()`` where ``x`` is the sole-user output of such a module or of an add, whose backward does not read
it either (ReLU's own backward reads its output, which in place is the same tensor: torchvision's pattern).
A pickled GraphModule is re-traced from its code when it is loaded, which records ``a + b`` and ``F.relu``
again; ``oba_fx.load`` runs :func:`inplace_adds` on what it loads.
"""
from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

#: modules whose output may be overwritten: fresh tensors that their backward does not read
SAFE_PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
                  nn.LayerNorm, nn.GroupNorm)


def _writable(t) -> bool:
    """A tensor (not an fx proxy) that may be overwritten: never a leaf that requires grad."""
    return isinstance(t, torch.Tensor) and (t.grad_fn is not None or not t.requires_grad)


def add_into(a, b):
    """``a.add_(b)`` when that equals ``a + b`` (same shape and dtype as the result), else ``a + b``.

    Not an fx leaf: tracing it again (a second compress step, a user re-tracing the slim model) sees a proxy,
    not a tensor, and records the plain ``operator.add``. Under ``torch.compile`` it is the plain add too: the
    compiler plans its own buffers, and reading ``grad_fn`` would break its graph at every block."""
    if torch.compiler.is_compiling():
        return a + b
    if _writable(a):
        shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape
        if shape == a.shape and torch.result_type(a, b) == a.dtype:
            return a.add_(b)
    return a + b


def relu_into(x):
    """``x.relu_()``; on an fx proxy (tracing the slim model again) or under ``torch.compile`` the plain
    ``F.relu``."""
    if torch.compiler.is_compiling():
        return F.relu(x)
    if _writable(x):
        return x.relu_()
    return F.relu(x)


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU and not modules[node.target].inplace
    if node.op == "call_function" and node.target in (F.relu, torch.relu):
        return len(node.args) == 1 and not node.kwargs.get("inplace", False) and set(node.kwargs) <= {"inplace"}
    return False


def inplace_adds(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``gm``'s eligible adds to :func:`add_into` and ReLUs to :func:`relu_into`; returns how many."""
    modules = dict(gm.named_modules())

    def safe_producer(a) -> bool:
        return (isinstance(a, torch.fx.Node) and a.op == "call_module" and len(a.users) == 1
                and type(modules.get(a.target)) in SAFE_PRODUCERS)

    n_done = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.add and len(node.args) == 2 and not node.kwargs:
            if safe_producer(node.args[0]):
                node.target = add_into
                n_done += 1
        elif _is_relu(node, modules) and node.args:
            x = node.args[0]
            if safe_producer(x) or (isinstance(x, torch.fx.Node) and len(x.users) == 1 and x.op == "call_function"
                                    and x.target in (operator.add, add_into)):
                node.op, node.target, node.args, node.kwargs = "call_function", relu_into, (x,), {}
                n_done += 1
    if n_done:
        gm.graph.lint()
        gm.recompile()
    return n_done
