"""torch.distributed support: sharded calibration, float64 all-reduce of the sums, identical decisions.

The public entry points (``parameter_scores``, ``group_scores``, ``compress``,
``compress_unstructured``, ``curvature``, ``evaluate_loss``, ``finetune``) accept
``process_group=``: an initialized group (or ``True`` for the default world
group).  Inside, a context variable carries the group to the calibration loop
(``passes.calibration``: its ``Batches`` shard with :func:`mine`, its ``Sums``
all-reduce with :func:`all_reduce_` / :func:`all_reduce_values`).  With ``shard=True`` (the default) every rank is handed the
same calibration batches and processes those with ``index % world == rank``;
with ``shard=False`` each rank's iterable is already its own shard (e.g. a
DataLoader with a DistributedSampler).  Per-batch results are accumulated as
sample-weighted float64 sums, all-reduced, and divided by the global sample
count, so every rank ends with the same numbers as one process over all the
data (up to float64 summation order), and therefore makes the same pruning
decision.

Owns the process-group context and the collective primitives; the data loop itself is
``passes.calibration``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

__all__ = ["use", "current", "mine", "all_reduce_", "all_reduce_values", "is_rank0", "accepts_process_group",
           "steps_per_rank"]


@dataclass(frozen=True)
class Context:
    group: Any
    rank: int
    world: int
    shard: bool


_CTX: contextvars.ContextVar[Context | None] = contextvars.ContextVar("oba_fx_process_group", default=None)


@contextlib.contextmanager
def use(process_group: Any = None, shard: bool = True):
    """Run the body with ``process_group`` active (``None``: keep whatever is active)."""
    if process_group is None or process_group is False:
        yield _CTX.get()
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group= was given but torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group('gloo' or 'nccl') first (torchrun sets the "
                           "environment it needs)")
    group = dist.group.WORLD if process_group is True else process_group
    ctx = Context(group, dist.get_rank(group), dist.get_world_size(group), bool(shard))
    token = _CTX.set(ctx)
    try:
        yield ctx
    finally:
        _CTX.reset(token)


def current() -> Context | None:
    return _CTX.get()


def mine(index: int) -> bool:
    """Whether this rank processes batch ``index``."""
    ctx = _CTX.get()
    return ctx is None or not ctx.shard or ctx.world == 1 or index % ctx.world == ctx.rank


def steps_per_rank(n_batches: int) -> int:
    """Batches each rank runs when every rank must take the same number of steps (DDP)."""
    ctx = _CTX.get()
    if ctx is None or ctx.world == 1 or not ctx.shard:
        return n_batches
    return n_batches // ctx.world


def all_reduce_(tensors: Iterable[torch.Tensor]) -> None:
    """Sum the tensors over the active group, in place (float64 on the wire for floating tensors)."""
    ctx = _CTX.get()
    if ctx is None or ctx.world == 1:
        return
    import torch.distributed as dist

    tensors = list(tensors)
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
    off = 0
    for t in tensors:
        k = t.numel()
        t.copy_(flat[off:off + k].view_as(t).to(t.dtype))
        off += k


def all_reduce_values(*values: float, device=None) -> tuple[float, ...]:
    """Sum Python numbers over the active group."""
    ctx = _CTX.get()
    if ctx is None or ctx.world == 1:
        return tuple(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce_([t])
    return tuple(float(v) for v in t)


def is_rank0() -> bool:
    """Whether this process is rank 0: of the active group, else of torch.distributed's default group (True
    when neither is set up). The command line writes files and prints on rank 0 only."""
    ctx = _CTX.get()
    if ctx is not None:
        return ctx.rank == 0
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def accepts_process_group(fn: Callable) -> Callable:
    """Decorator: the function takes ``process_group=None, shard=True`` and runs with them active."""

    @functools.wraps(fn)
    def wrapper(*args, process_group: Any = None, shard: bool = True, **kwargs):
        with use(process_group, shard):
            return fn(*args, **kwargs)

    wrapper.__doc__ = (fn.__doc__ or "") + (
        "\n\n    Distributed: ``process_group=`` (an initialized torch.distributed group, or True for the world) "
        "shards the calibration batches over the ranks (``shard=True``; ``shard=False`` when each rank already "
        "holds its own shard) and all-reduces the float64 sums; see ``passes.distributed``.\n")
    return wrapper
