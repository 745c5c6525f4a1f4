"""Rule registries keyed by op: the public way to extend the analyses to new ops.

A rule is registered for module types, functions, or tensor-method names::

    from oba_fx.passes.coupling import COUPLING_RULES

    @COUPLING_RULES.register(MyConv2d)            # call_module nodes of this type (and its subclasses)
    @COUPLING_RULES.register(torch.roll)          # call_function nodes calling this function
    @COUPLING_RULES.register("roll")              # call_method nodes: Tensor.roll
    def roll_rule(r, node): ...

A module rule applies to subclasses too: lookup walks the module's type MRO and takes the most specific
registered class, so a rule for ``nn.Conv2d`` covers a user's ``class MyConv(nn.Conv2d)`` unless a rule is
registered for ``MyConv`` itself. Registering a key twice replaces the earlier rule (``replace=False`` raises
instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from .errors import UsageError

__all__ = ["OpRegistry", "NoRule"]


@dataclass(frozen=True)
class NoRule:
    """The typed "no rule" answer: no rule is registered for the op, or the rule cannot handle these arguments.

    ``reason`` says which, for the warning the analysis prints.
    """

    reason: str = "no rule is registered for this op"


class OpRegistry:
    """Rules keyed by module type, function or tensor-method name."""

    def __init__(self, name: str):
        self.name = name
        self._modules: dict[type, Callable] = {}
        self._functions: dict[Any, Callable] = {}
        self._methods: dict[str, Callable] = {}

    def register(self, *ops: Any, replace: bool = True) -> Callable[[Callable], Callable]:
        """Decorator: register the rule for each of ``ops`` (module types, functions, method names)."""
        if not ops:
            raise TypeError(f"{self.name}.register needs at least one op: a module type, a function or a "
                            "tensor-method name")

        def deco(fn: Callable) -> Callable:
            for op in ops:
                table, key = self._table(op)
                if not replace and key in table:
                    raise UsageError(f"{self.name} already has a rule for {op!r}; pass replace=True to override")
                table[key] = fn
            return fn

        return deco

    def unregister(self, op: Any) -> Callable | None:
        """Remove and return the rule for ``op`` (None where there was none)."""
        table, key = self._table(op)
        return table.pop(key, None)

    def _table(self, op: Any) -> tuple[dict, Any]:
        if isinstance(op, type):
            if not issubclass(op, nn.Module):
                raise TypeError(f"{self.name}: a class key must be an nn.Module subclass, got {op.__name__}")
            return self._modules, op
        if isinstance(op, str):
            return self._methods, op
        if callable(op):
            return self._functions, op
        raise TypeError(f"{self.name}: cannot key a rule by {op!r}; use a module type, a function or a "
                        "tensor-method name")

    def lookup(self, node: torch.fx.Node, modules: Mapping[str, nn.Module]) -> Callable | None:
        """The rule for a ``call_module`` / ``call_function`` / ``call_method`` node, or None."""
        if node.op == "call_module":
            return self.module_rule(type(modules[node.target]))
        if node.op == "call_function":
            try:
                return self._functions.get(node.target)
            except TypeError:  # an unhashable target
                return None
        if node.op == "call_method":
            return self._methods.get(node.target)
        return None

    def method_rule(self, name: str) -> Callable | None:
        """The rule registered under a tensor-method / op name, or None."""
        return self._methods.get(name)

    def module_rule(self, cls: type) -> Callable | None:
        for base in cls.__mro__:
            fn = self._modules.get(base)
            if fn is not None:
                return fn
        return None

    def __contains__(self, op: Any) -> bool:
        table, key = self._table(op)
        return key in table

    def keys(self) -> Iterator[Any]:
        yield from self._modules
        yield from self._functions
        yield from self._methods

    def __repr__(self) -> str:
        return (f"OpRegistry({self.name!r}: {len(self._modules)} module types, {len(self._functions)} functions, "
                f"{len(self._methods)} methods)")
