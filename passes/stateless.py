"""Calling a module with replacement tensors, without touching the user's model afterwards.

``torch.func.functional_call(model, {name: tensor}, args)`` swaps tensors in by name and swaps the
originals back in the same order. A module reached under two names (CoaT's shared position encodings,
``self.blocks[i].pe = self.pe``) holds one slot that both names address: the second swap saves the
replacement as the "original", and the restore leaves it in the model (meta tensors after counting, plain
tensors with autograd history after scoring). ``tie_weights=True`` expands every name to all the names
sharing its tensor, which includes exactly those aliases.

Here every replacement is keyed by one name per (module object, attribute) slot instead, and
functional_call runs with ``tie_weights=False``: weights tied across different modules (two slots, one
tensor) get the same replacement in both slots, and a shared module's slot is swapped once.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

__all__ = ["slot_names", "call", "reparametrized"]


def slot_names(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{parameter/buffer name: replacement}`` -> one entry per slot that holds the same original tensor.

    Names are those of ``named_parameters()`` / ``named_buffers()`` (any alias of a tensor works). Every slot
    holding a replaced tensor, under any module path, gets the replacement once. Names that are no parameter
    or buffer (a plain tensor attribute, ``"sub.attr"``) are passed through.
    """
    lookup = dict(model.named_parameters(remove_duplicate=False))
    lookup.update(model.named_buffers(remove_duplicate=False))
    by_tensor: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, new in tensors.items():
        old = lookup.get(name)
        if old is None:
            out[name] = new
        else:
            by_tensor[id(old)] = new
    seen: set[tuple[int, str]] = set()
    for mname, mod in model.named_modules(remove_duplicate=False):
        for store in (mod._parameters, mod._buffers):
            for attr, t in store.items():
                if t is None or id(t) not in by_tensor or (id(mod), attr) in seen:
                    continue
                seen.add((id(mod), attr))
                out[f"{mname}.{attr}" if mname else attr] = by_tensor[id(t)]
    return out


def call(model: nn.Module, tensors: Mapping[str, torch.Tensor], args: Any, kwargs: dict | None = None) -> Any:
    """``model(*args, **kwargs)`` with ``tensors`` in place of the named parameters/buffers, restored after."""
    if not isinstance(args, tuple):
        args = (args,)
    return functional_call(model, slot_names(model, tensors), args, kwargs, tie_weights=False, strict=False)


@contextlib.contextmanager
def reparametrized(model: nn.Module, tensors: Mapping[str, torch.Tensor]):
    """Context in which ``model`` holds ``tensors`` (keyed as in ``slot_names``); the originals after."""
    with _reparametrize_module(model, slot_names(model, tensors), tie_weights=False, strict=False):
        yield
