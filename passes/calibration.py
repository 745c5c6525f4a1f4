"""The calibration data loop: one reducer for every pass over (inputs, targets) batches.

This module owns everything between a user's iterable of batches and the code that computes one batch:

* what a batch is (:func:`split_batch`: an ``(inputs, targets)`` pair), its device move
  (:func:`to_device`), its sample count and its micro-batches (:func:`micro_batches`);
* distributed sharding (``passes.distributed``: batch ``i`` runs on rank ``i % world``);
* the checks of the default loss against a batch's targets (:func:`check_targets`,
  :func:`check_default_loss_output`) and the error they raise (:class:`CalibrationError`);
* the batches each step of a multi-step run sees (:class:`BatchStream`);
* the reduction (:func:`reduce`): float64 sums weighted as the consumer asks (:class:`Sums`), their
  all-reduce over the ranks, the "calibration data is empty" error, and the means.

A consumer only says how to compute one batch (curvlinops-style)::

    def step(batch: Batch, sums: Sums):
        sums.add("loss", float(loss_fn(model(*batch.inputs), batch.targets)), batch.size)

    mean_loss = reduce(data, step, device=device).mean()["loss"]

Training loops, which step an optimizer instead of summing, use the same iteration (:func:`batches`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from . import distributed as _dist
from .errors import UsageError

__all__ = ["CalibrationError", "EMPTY", "Batch", "Batches", "BatchStream", "Sums", "batches", "reduce", "split_batch", "to_device",
           "micro_batches", "size_of_inputs", "size_of_targets", "default_loss", "check_targets",
           "check_default_loss_output", "describe_output"]

#: The message of the error raised when a reduction saw no sample.
EMPTY = "calibration data is empty: give at least one (inputs, targets) batch"


class CalibrationError(UsageError):
    """The calibration data or the loss cannot be used for scoring."""


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; targets are class indices or class probabilities."""
    return F.cross_entropy(outputs, targets)


# --------------------------------------------------------------------------- one batch


def split_batch(batch: Any, index: int) -> tuple[tuple, Any]:
    """(inputs tuple, targets) from one calibration item."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CalibrationError(
            f"calibration batch {index} is a {type(batch).__name__}; each item must be an (inputs, targets) pair, "
            "e.g. a DataLoader over a TensorDataset(x, y)"
        )
    inputs, targets = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return inputs, targets


def to_device(x, device):
    """``x`` (a tensor, or a tuple/list of them, nested) on ``device``; other values as they are."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def size_of_inputs(inputs: tuple, targets: Any) -> int:
    """Samples in a batch: the first input's leading dim (1 for a non-tensor or 0-d first input)."""
    return int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].ndim else 1


def size_of_targets(inputs: tuple, targets: Any) -> int:
    """Samples in a batch: the targets' leading dim (1 for non-tensor or 0-d targets)."""
    return int(targets.shape[0]) if isinstance(targets, torch.Tensor) and targets.ndim else 1


def micro_batches(inputs: tuple, targets: Any, micro_batch: int | None):
    """The batch itself, or its chunks of ``micro_batch`` samples along dim 0."""
    if not micro_batch:
        yield inputs, targets
        return
    if micro_batch < 1:
        raise UsageError(f"micro_batch must be a positive int, got {micro_batch}")
    n = int(inputs[0].shape[0])
    for i in range(0, n, micro_batch):
        sl = slice(i, i + micro_batch)
        yield (tuple(x[sl] if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x for x in inputs),
               targets[sl] if isinstance(targets, torch.Tensor) and targets.ndim else targets)


# --------------------------------------------------------------------------- loss checks


def describe_output(out) -> str:
    """A model output for messages: a shape, or its structure with the shapes of its leaves."""
    from torch.utils import _pytree as pytree

    shapes = pytree.tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else v, out)
    return f"shape {shapes}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__} {shapes}"


def check_targets(out: torch.Tensor, targets: Any, index: int) -> None:
    """Targets for the default cross-entropy must fit the output."""
    if not isinstance(targets, torch.Tensor):
        raise CalibrationError(f"batch {index}: targets must be a tensor, got {type(targets).__name__}")
    if out.ndim < 2:
        raise CalibrationError(
            f"batch {index}: the model output has shape {tuple(out.shape)}; cross-entropy needs (batch, classes, ...). "
            "Pass loss_fn= for other outputs"
        )
    C = out.shape[1]
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        want = (out.shape[0],) + tuple(out.shape[2:])
        if tuple(targets.shape) != want:
            raise CalibrationError(
                f"batch {index}: class-index targets have shape {tuple(targets.shape)} but the output "
                f"{tuple(out.shape)} needs targets of shape {want}"
            )
        if targets.numel() and (targets.min() < 0 or targets.max() >= C):
            raise CalibrationError(
                f"batch {index}: target classes must lie in [0, {C - 1}] for an output with {C} classes; "
                f"got values in [{int(targets.min())}, {int(targets.max())}]"
            )
    elif targets.is_floating_point():
        if targets.shape != out.shape:
            raise CalibrationError(
                f"batch {index}: probability targets have shape {tuple(targets.shape)}, the output {tuple(out.shape)}; "
                "give class indices (int64) or probabilities of the output's shape"
            )
    else:
        raise CalibrationError(f"batch {index}: targets of dtype {targets.dtype} are not supported by cross-entropy")


def check_default_loss_output(out, targets, bi: int) -> None:
    """The default cross-entropy needs one logits tensor whose shape fits the targets."""
    if not isinstance(out, torch.Tensor):
        key = next(iter(out), None) if isinstance(out, dict) else None
        pick = f"out[{key!r}]" if key is not None else "out[0]"
        raise CalibrationError(
            f"batch {bi}: the model returned {describe_output(out)}; the default cross-entropy needs one logits "
            f"tensor. Pass loss_fn= taking the whole output, e.g. loss_fn=lambda out, y: F.cross_entropy({pick}, y)")
    check_targets(out, targets, bi)


# --------------------------------------------------------------------------- the loop


@dataclass
class Batch:
    """One step's data: the calibration item ``index`` (or one micro-batch of it), on the device.

    ``first`` is True for the first micro-batch of an item (every item has exactly one such step).
    """

    index: int
    inputs: tuple
    targets: Any
    size: int
    first: bool = True


class Batches:
    """Iterates :class:`Batch` es over ``data``: split, moved to ``device``, sharded, micro-batched.

    Args:
        data: iterable of ``(inputs, targets)`` pairs (with ``bare_inputs=True`` also bare inputs).
        device: where inputs (and targets, unless ``move_targets=False``) go; None leaves them.
        micro_batch: split every item into chunks of at most this many samples.
        shard: under an active process group, keep only this rank's items (``passes.distributed.mine``).
        max_batches: yield at most this many items; ``drain=True`` still runs through the rest of ``data``
            (a loader's side effects, a progress bar's total), yielding nothing.
        size: ``size(inputs, targets) -> samples`` (default :func:`size_of_inputs`).
        progress: a tqdm bar over ``data`` (``self.bar``), with ``desc`` and ``total``.

    ``self.items`` counts the items yielded (not their micro-batches).
    """

    def __init__(self, data: Iterable, device=None, *, micro_batch: int | None = None, shard: bool = True,
                 max_batches: int | None = None, drain: bool = False, bare_inputs: bool = False,
                 move_targets: bool = True, size: Callable[[tuple, Any], int] = size_of_inputs,
                 progress: bool = False, desc: str = "", total: int | None = None):
        self.data, self.device, self.micro_batch, self.shard = data, device, micro_batch, shard
        self.max_batches, self.drain, self.bare_inputs, self.move_targets = max_batches, drain, bare_inputs, \
            move_targets
        self.size = size
        self.items = 0
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            if tqdm is not None:
                if total is None and hasattr(data, "__len__"):
                    total = len(data)
                self.bar = tqdm(data, total=total, desc=desc, leave=False)

    def _split(self, batch, index):
        if self.bare_inputs and not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            return (batch if isinstance(batch, tuple) else (batch,)), None
        return split_batch(batch, index)

    def __iter__(self) -> Iterator[Batch]:
        for index, item in enumerate(self.bar if self.bar is not None else self.data):
            if self.max_batches is not None and self.items >= self.max_batches:
                if self.drain:
                    continue
                break
            if self.shard and not _dist.mine(index):
                continue
            inputs, targets = self._split(item, index)
            if self.device is not None:
                inputs = to_device(inputs, self.device)
                if self.move_targets:
                    targets = to_device(targets, self.device)
            self.items += 1
            first = True
            for chunk_inputs, chunk_targets in micro_batches(inputs, targets, self.micro_batch):
                yield Batch(index, chunk_inputs, chunk_targets, self.size(chunk_inputs, chunk_targets), first)
                first = False


def batches(data: Iterable, device=None, **kwargs) -> Batches:
    """:class:`Batches` over ``data`` (see there for the keywords)."""
    return Batches(data, device, **kwargs)


@dataclass
class Sums:
    """Float64 sums over the calibration data, and the samples and items they cover.

    ``tensors[key]`` and ``values[key]`` (Python floats) grow by ``add(key, value, weight)``:
    ``value × weight`` (``acc.add_(value, alpha=weight)`` for tensors).  :meth:`mean` divides them by
    ``samples``.
    """

    tensors: dict[Any, torch.Tensor] = field(default_factory=dict)
    values: dict[Any, float] = field(default_factory=dict)
    samples: int = 0
    batches: int = 0

    def zeros(self, key, shape, device=None) -> torch.Tensor:
        """Start ``tensors[key]`` at zero (so every rank all-reduces it, whatever its batches give)."""
        t = self.tensors[key] = torch.zeros(shape, dtype=torch.float64, device=device)
        return t

    def add(self, key, value, weight: int | float = 1) -> None:
        """Add ``value × weight`` to the sum under ``key`` (a tensor is summed in float64)."""
        if isinstance(value, torch.Tensor):
            acc = self.tensors.get(key)
            if acc is None:
                self.tensors[key] = value.to(torch.float64) * weight
            else:
                acc.add_(value.to(torch.float64), alpha=weight)
        else:
            self.values[key] = self.values.get(key, 0.0) + weight * value

    def all_reduce(self, device=None) -> None:
        """Sum over the ranks of the active process group (nothing without one)."""
        if _dist.current() is None:
            return
        _dist.all_reduce_(self.tensors.values())
        keys = list(self.values)
        got = _dist.all_reduce_values(self.samples, self.batches, *(self.values[k] for k in keys), device=device)
        self.samples, self.batches = int(round(got[0])), int(round(got[1]))
        self.values = dict(zip(keys, got[2:]))

    def mean(self) -> dict:
        """``{key: sum / samples}`` over tensors (divided in place) and values."""
        out: dict = {}
        for k, v in self.tensors.items():
            out[k] = v.div_(self.samples)
        for k, v in self.values.items():
            out[k] = v / self.samples
        return out


def reduce(data: Iterable, step: Callable[[Batch, Sums], None], *, device=None, sums: Sums | None = None,
           micro_batch: int | None = None, shard: bool = True, distributed: bool = True,
           size: Callable[[tuple, Any], int] = size_of_inputs, progress: bool = False, desc: str = "",
           total: int | None = None, empty: Exception | None = None) -> Sums:
    """Run ``step(batch, sums)`` on every batch of ``data`` and return the sums over all ranks.

    ``step`` adds what one batch contributes to ``sums`` (:meth:`Sums.add`, weighted as it needs, usually
    by ``batch.size``); the reducer does the rest: splitting, device moves, micro-batches, sharding
    (``shard=``), counting samples and items, the float64 all-reduce (``distributed=``: with a process
    group active) and, when no sample was seen, raises ``empty`` (default ``CalibrationError(EMPTY)``).
    Call :meth:`Sums.mean` on the result for the per-sample means.
    """
    sums = Sums() if sums is None else sums
    loop = Batches(data, device, micro_batch=micro_batch, shard=shard and distributed, size=size,
                   progress=progress, desc=desc, total=total)
    for batch in loop:
        step(batch, sums)
        sums.samples += batch.size
    sums.batches += loop.items
    if distributed:
        sums.all_reduce(device)
    if sums.samples == 0:
        raise empty if empty is not None else CalibrationError(EMPTY)
    return sums


class BatchStream:
    """Calibration batches per step of a multi-step run: all of them, or the next ``per_step`` of a cycling
    iterator (``per_step=None``: every step sees all batches)."""

    def __init__(self, calibration, per_step: int | None):
        self.calibration = calibration
        self.per_step = per_step
        self._it = None

    def next(self) -> list:
        if self.per_step is None:
            batches = list(self.calibration)
        else:
            batches = []
            for _ in range(self.per_step):
                try:
                    if self._it is None:
                        raise StopIteration
                    batches.append(next(self._it))
                except StopIteration:
                    self._it = iter(self.calibration)
                    try:
                        batches.append(next(self._it))
                    except StopIteration:
                        break
        if not batches:
            raise CalibrationError(EMPTY)
        return batches
