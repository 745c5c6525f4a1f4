"""Name -> model factory for the zoo models and torchvision classifiers.

``create`` never loads pretrained weights: this environment has no network, and
the pruning benchmarks train from scratch.
"""
from __future__ import annotations

import difflib
import functools
from typing import Any, Callable

import torch.nn as nn

from .cifar_resnet import resnet20, resnet32, resnet56
from .vgg import vgg19_bn, vgg_small
from .vit import vit_small

__all__ = ["ZOO", "create", "names"]

#: Zoo factories, in the order :func:`names` lists them.
ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "vgg19_bn": vgg19_bn,
    "vgg_small": vgg_small,
    "vit_small": vit_small,
}


@functools.lru_cache(maxsize=None)
def _torchvision_names() -> tuple[str, ...]:
    try:
        import torchvision
    except ImportError:  # torchvision is optional
        return ()
    return tuple(torchvision.models.list_models(module=torchvision.models))


def names() -> list[str]:
    """All model names :func:`create` accepts.

    Returns:
        Zoo names first (in registration order), then torchvision's
        classification models (``torchvision.models.list_models(module=
        torchvision.models)``) that are not shadowed by a zoo name.
    """
    zoo = list(ZOO)
    return zoo + [n for n in _torchvision_names() if n not in ZOO]


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a randomly initialised model by name.

    Zoo models take their own constructor arguments (e.g. ``in_channels``,
    ``num_classes``; ``img_size``/``attention`` for ``vit_small``).  Other names
    go to ``torchvision.models.get_model(name, weights=None, **kwargs)``.

    Args:
        name: A name from :func:`names`.
        **kwargs: Constructor arguments for the model.

    Returns:
        The model, in training mode, with freshly initialised parameters.

    Raises:
        ValueError: If ``name`` is unknown (the message suggests close
            matches), or if ``weights`` / ``pretrained`` is passed with a
            value other than ``None`` / ``False``: pretrained weights cannot be
            downloaded here.
    """
    for key in ("weights", "pretrained", "weights_backbone", "pretrained_backbone"):
        if key in kwargs and kwargs[key] not in (None, False):
            raise ValueError(
                f"create({name!r}, {key}={kwargs[key]!r}): pretrained weights cannot be downloaded here; "
                f"models are always built with random initialisation (drop the {key}= argument)")
    if name in ZOO:
        kw = {k: v for k, v in kwargs.items() if k not in ("weights", "pretrained")}
        return ZOO[name](**kw)
    tv_names = _torchvision_names()
    if name in tv_names:
        import torchvision

        kw = dict(kwargs)
        kw["weights"] = None
        kw.pop("pretrained", None)
        return torchvision.models.get_model(name, **kw)
    all_names = names()
    close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model name {name!r}.{hint} See models_zoo.names() for all "
                     f"{len(all_names)} available models.")
