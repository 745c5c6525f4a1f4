"""Training flags belong to each module: record them all, restore each one.

``model.train(was)`` sets every submodule to the root's flag. A frozen BatchNorm inside a training model
(``model.train(); model.bn.eval()``) would come back in training mode, its running statistics then drifting
in the next forward, and a dropout the user had switched off would come back on. Every place that runs a
model in eval mode for a while (scoring, evaluation, export, timing, calibration passes) wraps the run in
:func:`kept_modes` instead.

    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).train()
    >>> _ = net[1].eval()
    >>> with kept_modes(net, training=False):
    ...     net.training, net[1].training
    (False, False)
    >>> net.training, net[1].training
    (True, False)
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch.nn as nn

__all__ = ["kept_modes", "apply_modes"]


@contextlib.contextmanager
def kept_modes(model: nn.Module, training: bool | None = None):
    """Within the block ``model`` is in ``training`` mode (left as it is when None); on exit, normal or not,
    every submodule gets its own flag back."""
    flags = [(m, m.training) for m in model.modules()]
    if training is not None:
        model.train(training)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def apply_modes(model: nn.Module, modes: Mapping[str, bool], default: bool) -> None:
    """Give each submodule the training flag ``modes`` records under its qualified name (``default`` for a
    name it lacks): how a rewritten or re-traced copy takes the original's flags, module by module."""
    for name, m in model.named_modules():
        m.training = modes.get(name, default)
