"""FLOPs and parameter counts: the one counter behind every figure oba_fx reports.

``count``, the bisection in ``compress``, the report's before/after and its step
reports all call :func:`forward_cost`, so a FLOPs target is met in the units it
is reported in.

What is counted: ``torch.utils.flop_counter.FlopCounterMode`` totals of one
forward pass in eval mode under ``torch.no_grad``.  A multiply-add is 2 FLOPs;
elementwise ops, norms, pooling and biases count 0.  For batch B:

- ``nn.Linear(i, o)`` on (B, i): 2·B·i·o; ``mm``/``bmm``/``matmul``/``einsum``
  contractions: 2 × (product of all output dims) × (contracted dim);
- ``nn.Conv2d(ci, co, k, groups=g)`` with output (B, co, H, W): 2·B·co·H·W·(ci/g)·k²;
- ``F.scaled_dot_product_attention`` with q (B, h, L, d), k/v (B, h, S, d): 4·B·h·L·S·d;
- ``nn.MultiheadAttention(E, h)`` self-attention on (B, L, E): the in-projection
  2·B·L·E·3E, the attention 4·B·L²·E and the out-projection 2·B·L·E²;
- ``nn.LSTM(i, H)`` over T steps: 2·B·T·4H·(i + H) per layer and direction
  (``nn.GRU``: 3H instead of 4H).

Why the meta device.  FlopCounterMode only counts the aten ops it has a formula
for.  On a real device in eval mode under ``no_grad`` several modules run fused
kernels it has none for, and they count as 0 (measured on CPU, torch 2.14):
``nn.MultiheadAttention``'s and ``nn.TransformerEncoderLayer``'s fast path
(``aten._native_multi_head_attention``), the fused CPU kernel of
``F.scaled_dot_product_attention``, and ``nn.LSTM``'s oneDNN kernel; cuDNN's RNN
kernels likewise.  On the meta device there are no fused kernels: these ops
decompose into mm/bmm, every one is counted, and nothing is computed.  The meta
run swaps meta stand-ins for the model's parameters, buffers and plain tensor
attributes with ``torch.func.functional_call`` (no weights are copied; one name
per module slot, see passes/stateless.py), with the MHA fast path disabled and
the math SDPA backend selected.

Fallback.  A model the meta device cannot run (tensors created on a fixed device
inside ``forward``, tensors hidden in containers, data-dependent ops such as
``.item()`` or ``nonzero``) is counted on its own device instead, with the MHA
fast path, the fused SDPA kernels, oneDNN and cuDNN switched off, so the same
matmuls are visible.  :class:`Cost` records which path was taken and why.

Neither path changes the model: every module's training flag, every
parameter's ``requires_grad`` and device, and ``nn.RNNBase``'s cached weight
list are as they were.

Example::

    >>> c = forward_cost(torch.nn.Linear(5, 7), torch.randn(3, 5))
    >>> c.flops, c.params, c.method
    (210, 42, 'meta')
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .passes.trace import as_args
from .passes.errors import UsageError
from .passes.modes import kept_modes

__all__ = ["count", "forward_cost", "Cost", "example_args", "COUNTERS"]

#: How each path produces its figures, for reports: {Cost.method: description}.
COUNTERS = {
    "meta": "torch.utils.flop_counter.FlopCounterMode over one forward pass in eval mode under no_grad, on the "
            "meta device (MHA fast path off, math SDPA); a multiply-add is 2 FLOPs",
    "device": "torch.utils.flop_counter.FlopCounterMode over one forward pass in eval mode under no_grad, on the "
              "model's device with the MHA fast path, fused SDPA, oneDNN and cuDNN off (the meta device could not "
              "run the model); a multiply-add is 2 FLOPs",
}


@dataclass(frozen=True)
class Cost:
    """One forward pass's cost.

    Attributes:
        flops: FlopCounterMode total (a multiply-add = 2 FLOPs).
        params: number of distinct parameters (shared ones count once).
        method: "meta" (the meta device) or "device" (the model's own device,
            fused kernels off); see the module docstring.
        note: why the meta run failed when ``method == "device"``, else "".
    """

    flops: int
    params: int
    method: str
    note: str = ""


def example_args(model: nn.Module, example_inputs: Any) -> tuple:
    """``example_inputs`` as the positional-argument tuple ``model(*args)`` takes.

    A tensor is one argument; a tuple or a list gives one argument per element.

    Raises:
        TypeError: not a tensor/tuple/list, or a number of elements that
            ``model.forward`` does not accept (the message shows its signature).
    """
    args = as_args(example_inputs)
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a Python signature: let the call decide
        return args
    try:
        sig.bind(*args)
    except TypeError as err:
        kind = type(example_inputs).__name__
        raise TypeError(
            f"example_inputs is a {kind} of {len(args)} element(s), so the model would be called with {len(args)} "
            f"positional argument(s), but {type(model).__name__}.forward{sig} does not accept that ({err}). "
            "A tuple or list is unpacked into positional arguments, one per element: pass one input as the tensor "
            "itself or as `(x,)`, several inputs as `(x, mask)`; a batch of samples goes in as one stacked tensor."
        ) from None
    return args


def forward_cost(model: nn.Module, example_inputs: Any, on: str = "auto") -> Cost:
    """FLOPs and parameters of ``model(*example_inputs)``; see the module docstring.

    Args:
        model: any module (a ``torch.fx.GraphModule`` from the rewrite works);
            it is not changed.
        example_inputs: a tensor, or a tuple/list of positional inputs.
        on: "auto" (meta, falling back to the device), "meta" or "device".

    Returns:
        :class:`Cost`.
    """
    if on not in ("auto", "meta", "device"):
        raise UsageError(f"on must be 'auto', 'meta' or 'device', got {on!r}")
    args = example_args(model, example_inputs)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if on in ("auto", "meta"):
        try:
            return Cost(_flops_on_meta(model, args), int(params), "meta")
        except Exception as err:  # noqa: BLE001 - any failure on meta means: count on the device
            if on == "meta":
                raise
            note = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]
    else:
        note = "the device was asked for"
    return Cost(_flops_on_device(model, args), int(params), "device", note)


def count(model: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """FLOPs of one forward pass on ``example_inputs`` and the number of parameters.

    The figures of :func:`forward_cost` (see the module docstring for what is
    counted and on which device); ``forward_cost(...).method`` says which path
    produced them.

    Returns:
        (flops, params)
    """
    c = forward_cost(model, example_inputs)
    return c.flops, c.params


# --------------------------------------------------------------------------- the two paths

@contextlib.contextmanager
def _counting_mode(model: nn.Module):
    """Eval mode, no_grad, no MHA fast path, math SDPA; every module's flag restored after."""
    rnn_caches = [(m, list(m._flat_weights), list(m._flat_weight_refs)) for m in model.modules()
                  if isinstance(m, nn.RNNBase) and hasattr(m, "_flat_weight_refs")]
    fast = torch.backends.mha.get_fastpath_enabled()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with kept_modes(model, training=False), torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        # functional_call makes an RNN re-point its cached weight list at the stand-ins
        for m, flat, refs in rnn_caches:
            m._flat_weights, m._flat_weight_refs = flat, refs


def to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("meta")
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # a namedtuple takes its fields positionally
        return type(x)(*(to_meta(v) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(to_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: to_meta(v) for k, v in x.items()}
    return x


def _meta_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: meta tensor}, one name per (module, attribute) slot: every parameter, buffer and plain
    tensor attribute.

    Tied tensors (two slots, one tensor) get one shared stand-in, so weight tying survives the swap; a module
    reached under two names is one slot, named once (see passes/stateless.py for why that matters).
    """
    stand_in: dict[int, torch.Tensor] = {}

    def meta(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in stand_in:
            stand_in[id(t)] = t.detach().to("meta")
        return stand_in[id(t)]

    state: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, str]] = set()
    for mname, m in model.named_modules(remove_duplicate=False):
        # GraphModule constants (_tensor_constant0) and hand-set tensors live in __dict__
        attrs = [(k, v) for k, v in vars(m).items() if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter)]
        for attr, v in [*m._parameters.items(), *m._buffers.items(), *attrs]:
            if v is None or (id(m), attr) in seen:
                continue
            seen.add((id(m), attr))
            state[f"{mname}.{attr}" if mname else attr] = meta(v)
    return state


def _flops_on_meta(model: nn.Module, args: tuple) -> int:
    state = _meta_state(model)
    meta_args = to_meta(args)
    # a forward may store what it computed on the module (torchvision's AnchorGenerator caches its
    # anchors in self.cell_anchors): those would be meta tensors afterwards, so every module's
    # plain attributes are put back as they were
    attrs = [(m, dict(vars(m))) for m in model.modules()]
    try:
        with _counting_mode(model), FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, state, meta_args, tie_weights=False, strict=False)
    finally:
        for m, saved in attrs:
            d = vars(m)
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if d.get(k) is not v:
                    d[k] = v
    return int(counter.get_total_flops())


def _flops_on_device(model: nn.Module, args: tuple) -> int:
    with _counting_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's flags() warns about TF32 on machines without Intel GPUs
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(enabled=False), \
                FlopCounterMode(display=False) as counter:
            model(*args)
    return int(counter.get_total_flops())
