"""Training from scratch with resumable, atomically written checkpoints.

Checkpoint format (``torch.save`` of a dict)::

    {"format": "oba_fx.checkpoint/1", "torch": torch.__version__,
     "model": {"name": <models_zoo name>, "kwargs": {...}},   # how to rebuild the module
     "state_dict": ..., "optimizer": ..., "scheduler": ...,
     "epoch": <epochs completed>, "epochs": <planned epochs>, "history": [...],
     "config": {lr, schedule, batch_size, seed, ...}, "meta": {...}}

``load_checkpoint(path)`` rebuilds the model from ``models_zoo`` and loads the
weights; nothing else is needed.  Resuming reloads model, optimizer, scheduler
and the epoch counter; data order and augmentation are seeded by
``(seed, epoch)`` (:class:`oba_fx.data.TensorLoader`), so an interrupted run
continues to the same final weights as an uninterrupted one.

Owns :func:`train`, :func:`evaluate`, the checkpoint format and :func:`read_checkpoint` /
:func:`load_checkpoint`; batches come from ``passes.calibration`` (``batches``, ``reduce``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .passes.calibration import Batch, Sums, batches, default_loss, reduce, size_of_targets
from .passes.modes import kept_modes

from .finetune import cosine_lambda, optimizer_step
from .io import atomic_write
from .passes.errors import UsageError

__all__ = ["train", "evaluate", "load_checkpoint", "read_checkpoint", "CHECKPOINT_FORMAT", "CheckpointError"]

CHECKPOINT_FORMAT = "oba_fx.checkpoint/1"


class CheckpointError(UsageError):
    """A file is not a usable oba_fx checkpoint."""


@torch.no_grad()
def evaluate(model: nn.Module, data, loss_fn: Callable | None = None, progress: bool = False,
             desc: str = "eval") -> dict:
    """Top-1 accuracy and mean loss of ``model`` over ``data`` (batches of (inputs, targets))."""
    loss_fn = loss_fn or default_loss

    def step(batch: Batch, sums: Sums) -> None:
        out = model(*batch.inputs)
        sums.add("loss", float(loss_fn(out, batch.targets)), batch.size)
        sums.add("accuracy", int((out.argmax(-1) == batch.targets).sum()))

    with kept_modes(model, training=False):
        sums = reduce(data, step, device=next(model.parameters()).device, distributed=False, size=size_of_targets,
                      progress=progress, desc=desc, empty=ValueError("evaluate: the data yielded no samples"))
    means = sums.mean()
    return {"accuracy": means["accuracy"], "loss": means["loss"], "samples": sums.samples}


def _schedule(opt, kind: str, total: int, lr: float):
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))
    if kind == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 2), pct_start=0.25,
                                                   anneal_strategy="cos", div_factor=10.0, final_div_factor=100.0)
    raise UsageError(f"schedule must be 'cosine' or 'onecycle', got {kind!r}")


def train(
    model: nn.Module,
    train_data,
    epochs: int,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "onecycle",
    label_smoothing: float = 0.0,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    model_spec: dict | None = None,
    eval_data=None,
    meta: dict | None = None,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Train ``model`` in place with SGD (Nesterov momentum) and a cosine or one-cycle schedule.

    Args:
        train_data: a loader of (inputs, targets) batches; ``set_epoch(e)`` is
            called before each epoch when it has one (seeded order/augmentation).
        epochs: total epochs of the run (also when resuming).
        checkpoint: write a resumable checkpoint here after every epoch (atomic).
        resume: continue from ``checkpoint`` if it exists (error if it does not).
        model_spec: ``{"name": ..., "kwargs": ...}`` stored so the checkpoint can
            rebuild the model without code (see :func:`load_checkpoint`).
        eval_data: evaluated after every epoch (accuracy/loss in the history).

    Returns:
        ``{"history": [per-epoch dicts], "epoch": epochs completed}``.
    """
    if epochs < 1:
        raise UsageError(f"epochs must be >= 1, got {epochs}")
    if resume and checkpoint is None:
        raise UsageError("resume=True needs checkpoint= (the file to resume from)")
    n_batches = len(train_data)
    if n_batches == 0:
        raise UsageError("train_data yields no batches; use more data or a smaller batch size")
    torch.manual_seed(seed)
    opt = _sgd(model, lr, momentum, weight_decay)
    sched = _schedule(opt, schedule, epochs * n_batches, lr)
    config = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "schedule": schedule, "epochs": epochs,
              "label_smoothing": label_smoothing, "seed": seed, "batches_per_epoch": n_batches}
    start, history = 0, []
    if resume:
        start, history = _resume(checkpoint, model, opt, sched, epochs, n_batches)
        log(f"resuming {checkpoint} after epoch {start}/{epochs}")
    crit = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    for epoch in range(start, epochs):
        if hasattr(train_data, "set_epoch"):
            train_data.set_epoch(epoch)
        torch.manual_seed(seed * 1000 + epoch)  # dropout etc.: same stream on resume
        rec = _train_epoch(model, train_data, crit, opt, sched, epoch, epochs, n_batches, progress)
        if eval_data is not None:
            ev = evaluate(model, eval_data)
            rec.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
        history.append(rec)
        msg = f"epoch {epoch + 1}/{epochs}: train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}"
        if "test_accuracy" in rec:
            msg += f", test acc {rec['test_accuracy']:.4f}"
        log(msg + f" ({rec['seconds']:.0f} s)")
        if checkpoint is not None:
            payload = {"format": CHECKPOINT_FORMAT, "torch": torch.__version__, "model": dict(model_spec or {}),
                       "state_dict": model.state_dict(), "optimizer": opt.state_dict(),
                       "scheduler": sched.state_dict(), "epoch": epoch + 1, "history": history, "config": config,
                       "meta": dict(meta or {})}
            atomic_write(checkpoint, lambda tmp: torch.save(payload, tmp))
    model.eval()
    return {"history": history, "epoch": epochs}


def _sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum; weight decay on the weights (ndim > 1) only."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return torch.optim.SGD([{"params": decay, "weight_decay": weight_decay},
                            {"params": no_decay, "weight_decay": 0}],
                           lr=lr, momentum=momentum, nesterov=momentum > 0)


def _resume(checkpoint, model, opt, sched, epochs: int, n_batches: int) -> tuple[int, list]:
    """Load model, optimizer and scheduler from ``checkpoint``; (epochs done, history)."""
    ck = read_checkpoint(checkpoint)
    if ck.get("config", {}).get("epochs") != epochs or ck.get("config", {}).get("batches_per_epoch") != n_batches:
        raise CheckpointError(
            f"{checkpoint} was written by a run with epochs={ck['config'].get('epochs')} and "
            f"{ck['config'].get('batches_per_epoch')} batches/epoch; resume with the same settings "
            f"(got epochs={epochs}, {n_batches} batches/epoch)")
    model.load_state_dict(ck["state_dict"])
    opt.load_state_dict(ck["optimizer"])
    sched.load_state_dict(ck["scheduler"])
    return int(ck["epoch"]), list(ck["history"])


def _train_epoch(model, train_data, crit, opt, sched, epoch: int, epochs: int, n_batches: int,
                 progress: bool) -> dict:
    """One epoch of SGD steps; the epoch's record (train loss and accuracy, seconds, last learning rate)."""
    model.train()
    device = next(model.parameters()).device
    loop = batches(train_data, device, shard=False, progress=progress, total=n_batches,
                   desc=f"train epoch {epoch + 1}/{epochs}")
    t0, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
    for batch in loop:
        out = model(*batch.inputs)
        loss = crit(out, batch.targets)
        optimizer_step(loss, opt, sched, f"training epoch {epoch + 1}, batch {batch.index}")
        b = int(batch.targets.shape[0])
        loss_sum += float(loss.detach()) * b
        correct += int((out.detach().argmax(-1) == batch.targets).sum())
        seen += b
        if loop.bar is not None and batch.index % 10 == 0:
            loop.bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    return {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            "seconds": time.perf_counter() - t0, "lr_end": sched.get_last_lr()[0]}


def read_checkpoint(path) -> dict[str, Any]:
    """The checkpoint dict of a training checkpoint file (CheckpointError if it is not one)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                              "it may be truncated or corrupt, re-create it with 'oba-fx train'") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an oba_fx training checkpoint (expected format {CHECKPOINT_FORMAT})")
    return ck



def load_checkpoint(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model of a training checkpoint; returns ``(model in eval mode, checkpoint dict)``."""
    from models_zoo.registry import create  # the registry, not the package (which imports this module back)

    ck = read_checkpoint(path)
    spec = ck.get("model") or {}
    if "name" not in spec:
        raise CheckpointError(f"{path} does not record which model it holds (no model name)")
    try:
        model = create(spec["name"], **spec.get("kwargs", {}))
        model.load_state_dict(ck["state_dict"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot rebuild model {spec['name']} from its weights "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    return model.eval(), ck
