"""Small helpers on torch.fx nodes and qualified names, shared by the passes."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from .trace import TensorSpec

__all__ = ["node_arg", "op_name", "describe_node", "owner_and_attr", "get_qualified", "tensor_paths"]


def node_arg(node: torch.fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument ``i`` of a call, given positionally or as keyword ``name``."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def op_name(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """What a node calls: a module type name, ``Tensor.<method>`` or a function's qualified name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    return f"{mod}.{getattr(t, '__qualname__', getattr(t, '__name__', repr(t)))}".lstrip(".")


def describe_node(node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> str:
    """A node for a message: the module path and type, or the method / function and the node's name."""
    if node.op == "call_module":
        return f"module {node.target} ({type(modules[node.target]).__name__})"
    if node.op == "call_method":
        return f"Tensor.{node.target} at node '{node.name}'"
    t = node.target
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))} at node '{node.name}'".lstrip(".")


def owner_and_attr(root: nn.Module, qualname: str) -> tuple[nn.Module, str]:
    """``("a.b.weight")`` -> (the submodule ``a.b``, ``"weight"``)."""
    owner, _, attr = qualname.rpartition(".")
    return root.get_submodule(owner), attr


def get_qualified(root: nn.Module, qualname: str) -> Any:
    """The attribute a dotted name reaches from ``root`` (a parameter, buffer, tensor or module)."""
    owner, attr = owner_and_attr(root, qualname)
    return getattr(owner, attr)


def tensor_paths(spec: Any, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """Index paths of every tensor in a (nested tuple of) recorded value(s)."""
    if isinstance(spec, TensorSpec):
        return [prefix]
    if isinstance(spec, tuple):
        out = []
        for i, s in enumerate(spec):
            out += tensor_paths(s, prefix + (i,))
        return out
    return []
