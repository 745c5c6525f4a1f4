"""A plain, well-made recovery fine-tuning loop (SGD, cosine schedule, optional distillation).

Owns :func:`finetune` and the two pieces :mod:`oba_fx.train` shares with it: :func:`optimizer_step` and
:func:`cosine_lambda`.  The batches come from ``passes.calibration.batches`` (split, device, shard).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .passes import distributed as _dist
from .passes.calibration import batches, default_loss
from .passes.errors import UsageError

__all__ = ["finetune", "optimizer_step", "cosine_lambda"]


def cosine_lambda(total: int):
    """LambdaLR factor: cosine from 1 to 0 over ``total`` steps."""
    return lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))


def optimizer_step(loss: torch.Tensor, opt, sched, where: str) -> None:
    """Refuse a non-finite loss (naming ``where``), then backward, step and schedule."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{where}: the loss became {loss.item()}; lower the learning rate")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


@_dist.accepts_process_group
def finetune(
    model: nn.Module,
    train_data: Iterable,
    epochs: int = 1,
    lr: float = 0.01,
    *,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    loss_fn: Callable | None = None,
    progress: bool = True,
) -> dict:
    """Train ``model`` in place: SGD with momentum, cosine schedule, optional distillation.

    Args:
        model: the (slimmed) model; trained in place and left in eval mode.
        train_data: iterable of (inputs, targets) batches, re-iterated each epoch.
        epochs: passes over ``train_data``.
        lr: peak learning rate (cosine-annealed to 0 over all steps).
        teacher: optional original model; adds ``kd_alpha`` × KL(student‖teacher)
            at ``kd_temperature`` (Hinton et al.) to ``(1 − kd_alpha)`` × the task loss.
        loss_fn: batch-mean task loss; default cross-entropy.

    Returns:
        History: {"loss": [mean loss per epoch], "steps": n}.
    """
    if epochs < 0:
        raise UsageError(f"epochs must be >= 0, got {epochs}")
    loss_fn = loss_fn or default_loss
    try:
        n_batches = len(train_data)
    except TypeError:
        train_data = list(train_data)
        n_batches = len(train_data)
    if n_batches == 0 and epochs:
        raise UsageError("train_data is empty: give at least one (inputs, targets) batch")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    ctx = _dist.current()
    per_rank = _dist.steps_per_rank(n_batches)  # equal step counts on every rank (DDP needs them)
    net = _data_parallel(model, ctx, per_rank, n_batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(max(1, epochs * per_rank)))
    if teacher is not None:
        teacher = teacher.eval()
    loss_of = _distilled(loss_fn, teacher, kd_alpha, kd_temperature) if teacher is not None else \
        (lambda out, inputs, targets: loss_fn(out, targets))
    history = {"loss": [], "steps": 0}
    device = next(model.parameters()).device
    for epoch in range(epochs):
        if hasattr(train_data, "set_epoch"):  # seeded loaders (oba_fx.data): a fresh order each epoch
            train_data.set_epoch(epoch)
        net.train()
        loop = batches(train_data, device, max_batches=per_rank, drain=True, progress=progress, total=n_batches,
                       desc=f"finetune epoch {epoch + 1}/{epochs}")
        running, seen = 0.0, 0
        for batch in loop:
            loss = loss_of(net(*batch.inputs), batch.inputs, batch.targets)
            optimizer_step(loss, opt, sched, f"finetune epoch {epoch + 1}, batch {batch.index}")
            b = int(batch.inputs[0].shape[0])
            running += float(loss.detach()) * b
            seen += b
            history["steps"] += 1
            if loop.bar is not None:
                loop.bar.set_postfix(loss=f"{running / max(seen, 1):.4f}")
        history["loss"].append(running / max(seen, 1))
    if net is not model:  # DDP syncs buffers at each forward; the last update is per rank: take rank 0's
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=dist.get_global_rank(ctx.group, 0) if ctx.group is not None else 0,
                           group=ctx.group)
    model.eval()
    from .unstructured import refresh_masked_weights

    refresh_masked_weights(model)  # pruning masks: leave graph-free weights so the model can be copied
    return history


def _data_parallel(model: nn.Module, ctx, per_rank: int, n_batches: int) -> nn.Module:
    """``model`` itself, or wrapped in DistributedDataParallel under a process group of several ranks."""
    if ctx is None or ctx.world <= 1:
        return model
    if per_rank == 0:
        raise UsageError(f"train_data has {n_batches} batches for {ctx.world} ranks: give at least one per rank")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, process_group=ctx.group)


def _distilled(loss_fn: Callable, teacher: nn.Module, kd_alpha: float, kd_temperature: float) -> Callable:
    """``(out, inputs, targets) -> (1 − α) task loss + α T² KL(student‖teacher)`` at temperature T."""

    def loss_of(out, inputs, targets):
        loss = loss_fn(out, targets)
        with torch.no_grad():
            t_out = teacher(*inputs)
        T = kd_temperature
        kd = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(t_out / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        return (1 - kd_alpha) * loss + kd_alpha * kd

    return loss_of
