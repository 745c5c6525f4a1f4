"""Save/load of slimmed modules and verified ONNX export.

File format (``oba_fx.save``): a ``torch.save`` archive of the dict

    {"format": "oba_fx.module/1", "torch": torch.__version__, "kind": "graphmodule" | "module",
     "module": <the module object>, "meta": {user metadata}}

A GraphModule pickles its generated code and its submodules, so it loads
without the original model class (only torch.nn classes and, for pruned
attention, ``oba_fx.passes.attention.SlimMultiheadAttention``).  A plain module needs
its class importable.  Loading unpickles: only load files you trust.

Files saved by oba_fx 0.1 name the passes as the top-level package ``passes``
(before it moved under ``oba_fx``); :func:`load` still reads them (deprecated:
load and save once to rewrite such a file).
Writes go to a temporary file in the same folder and are renamed into place.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .passes.trace import as_args
from .passes.modes import kept_modes

from .io import atomic_write
from .passes.errors import UsageError

__all__ = ["save", "load", "export_onnx", "output_names", "OnnxMismatch", "FORMAT", "ort_providers", "legacy_module_names"]

FORMAT = "oba_fx.module/1"


class OnnxMismatch(RuntimeError):
    """onnxruntime's output differs from PyTorch's beyond the tolerance."""


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save a (slimmed) module atomically; see the module docstring for the format."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"oba_fx.save expects a torch.nn.Module, got {type(model).__name__}")
    kind = "graphmodule" if isinstance(model, torch.fx.GraphModule) else "module"
    payload = {"format": FORMAT, "torch": torch.__version__, "kind": kind, "module": model, "meta": dict(meta or {})}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: str | os.PathLike, map_location: Any = "cpu", with_meta: bool = False):
    """Load a module saved by :func:`oba_fx.save` (unpickles: trusted files only).

    Returns the module, or ``(module, meta)`` with ``with_meta=True``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with legacy_module_names():
            payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - truncated/corrupt archives raise many types
        raise UsageError(f"{path} is not a readable oba_fx module file ({type(e).__name__}: {str(e)[:120]}); "
                         "it may be truncated or corrupt") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"{path} is not an oba_fx module file (expected format {FORMAT}); "
                         "save it with oba_fx.save(model, path)")
    module = payload["module"]
    if isinstance(module, torch.fx.GraphModule):  # unpickling re-traced its code: `a + b` and F.relu again
        from .passes.inplace import inplace_adds

        inplace_adds(module)
    return (module, dict(payload.get("meta") or {})) if with_meta else module


@contextlib.contextmanager
def legacy_module_names():
    """While loading, let the old top-level name ``passes`` resolve to ``oba_fx.passes``.

    oba_fx 0.1 installed its compiler passes as a top-level package ``passes``, so its files
    pickle classes as ``passes.attention.SlimMultiheadAttention`` and their fx code imports
    ``passes.inplace``. The alias lasts only for the ``with`` block, and is skipped where the
    process has a ``passes`` module of its own. Deprecated: remove in 0.3.
    """
    if "passes" in sys.modules:
        yield
        return
    from . import passes

    names = {"passes": passes}
    for info in pkgutil.iter_modules(passes.__path__):
        names[f"passes.{info.name}"] = importlib.import_module(f"{passes.__name__}.{info.name}")
    sys.modules.update(names)
    try:
        yield
    finally:
        for name, module in names.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


def ort_providers() -> list[str]:
    """onnxruntime's execution providers for this machine: CUDA first where torch sees a GPU, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if torch.cuda.is_available() and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int = 18,
    dynamic_batch: bool = True,
    rtol: float = 1e-4,
    dynamo: bool | None = None,
) -> Path:
    """Export to ONNX, check it, run it in onnxruntime and compare with PyTorch.

    The file is written only if onnx.checker passes and onnxruntime's outputs
    match PyTorch's within ``rtol`` (max |diff| / max |reference|), each one.
    Outputs that are a dict, tuple or list (nested too) become named ONNX
    outputs, see :func:`output_names`.  onnxruntime
    uses the CUDA provider when torch sees a GPU, else the CPU provider.

    Args:
        dynamo: exporter choice: True (torch.export based), False (TorchScript
            based), None: try the torch.export exporter, fall back to TorchScript.

    Returns:
        The path written.

    Raises:
        OnnxMismatch: outputs differ; nothing is written.
    """
    import onnx
    import onnxruntime as ort

    args = as_args(example_inputs)
    names = [f"input_{i}" for i in range(len(args))] if len(args) > 1 else ["input"]
    with kept_modes(model, training=False):
        with torch.no_grad():
            ref = model(*args)
        out_names, refs = output_names(ref)
        errors = []

        def write(tmp: str) -> None:
            for use_dynamo in ([dynamo] if dynamo is not None else [True, False]):
                try:
                    _export(model, args, tmp, names, out_names, opset, dynamic_batch, use_dynamo)
                    break
                except Exception as err:  # noqa: BLE001
                    errors.append(f"{'torch.export' if use_dynamo else 'TorchScript'} exporter: "
                                  f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            else:
                raise RuntimeError("ONNX export failed:\n  " + "\n  ".join(errors))
            onnx.checker.check_model(tmp)
            sess = ort.InferenceSession(tmp, providers=ort_providers())
            feeds = {i.name: a.detach().cpu().numpy() for i, a in zip(sess.get_inputs(), args)}
            onnx_names = [o.name for o in sess.get_outputs()]
            if onnx_names != out_names:
                raise OnnxMismatch(f"the ONNX graph has outputs {onnx_names}, PyTorch's flattened output has "
                                   f"{out_names}; the file was not written")
            got = sess.run(None, feeds)
            for name, g, r in zip(out_names, got, refs):
                r = r.detach().cpu().numpy()
                if g.shape != r.shape:
                    raise OnnxMismatch(f"output {name!r}: onnxruntime shape {g.shape} vs PyTorch {r.shape}")
                if r.size == 0:
                    continue
                if r.dtype == np.bool_ or np.issubdtype(r.dtype, np.integer):
                    if not np.array_equal(g, r):
                        raise OnnxMismatch(f"output {name!r}: onnxruntime's integer values differ from PyTorch's; "
                                           "the file was not written")
                    continue
                rel = float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30))
                if not rel <= rtol:
                    raise OnnxMismatch(f"output {name!r}: onnxruntime differs from PyTorch by {rel:.2e} relative "
                                       f"(tolerance {rtol:.0e}); the file was not written")

        return atomic_write(path, write)


def output_names(output) -> tuple[list[str], list[torch.Tensor]]:
    """ONNX output names and tensors for a model output of any structure, in ``torch.utils._pytree`` order.

    One tensor is ``"output"``; dict keys name their values (``{"out": …, "aux": …}``
    gives ``"out"``, ``"aux"``); sequence items are ``output_0``, ``output_1`` …;
    nested structures join the parts with ``.`` (``{"x": (a, b)}`` gives ``x.0``, ``x.1``).
    Both exporters flatten outputs in this order.

    Raises:
        TypeError: a leaf is not a tensor (ONNX outputs are tensors only).
    """
    from torch.utils import _pytree as pytree

    if isinstance(output, torch.Tensor):
        return ["output"], [output]
    flat, _ = pytree.tree_flatten_with_path(output)
    names, tensors = [], []
    for path, leaf in flat:
        parts = [str(k.key) if isinstance(k, pytree.MappingKey) else str(k.idx) if isinstance(k, pytree.SequenceKey)
                 else str(getattr(k, "name", k)) for k in path]
        name = ".".join(parts)
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"the model's output {name!r} is a {type(leaf).__name__}; ONNX outputs must be tensors. "
                            "Wrap the model to return only tensors")
        names.append(name if path and isinstance(path[0], pytree.MappingKey) else f"output_{name}")
        tensors.append(leaf)
    if len(set(names)) != len(names):
        raise TypeError(f"the model's output names {names} are not unique; wrap the model to return distinct keys")
    return names, tensors


class _GivenInputs(nn.Module):
    """``forward(*args)``: the TorchScript exporter fills every forward argument the example inputs leave out
    with its default, as a graph input; a specialised default (``is_causal=False`` in a traced graph) then
    meets fx's check as a tensor and the export fails. This wrapper exposes only the given inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def _more_params_than(model: nn.Module, n: int) -> bool:
    import inspect

    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in list(params)[n:])


def _export(model, args, path, names, out_names, opset, dynamic_batch, use_dynamo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if use_dynamo:
            shapes = tuple({0: torch.export.Dim("batch", min=1)} if dynamic_batch and a.ndim else None
                           for a in args) if dynamic_batch else None
            torch.onnx.export(model, args, path, dynamo=True, input_names=names, output_names=out_names,
                              dynamic_shapes=shapes, opset_version=opset, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in names + out_names} if dynamic_batch else None
            if _more_params_than(model, len(args)):
                model = _GivenInputs(model)
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset)
