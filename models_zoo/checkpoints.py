"""Zoo checkpoints trained by this project on Fashion-MNIST (nothing is downloaded).

``trained("resnet20")`` trains the model on the CPU the first time (minutes;
tqdm progress) with ``oba_fx.train`` and caches the checkpoint in
``$OBA_FX_CACHE`` (default ``~/.cache/oba_fx/zoo``); later calls load it.  The
file name records model, epochs and seed, so a different recipe trains anew.
An interrupted training resumes from its last epoch.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

__all__ = ["trained", "RECIPES", "cache_dir"]

#: Default epochs per model (one-cycle SGD, batch 128, lr 0.1; ViT: AdamW-free SGD lr 0.05).
RECIPES = {"resnet20": dict(epochs=6, lr=0.1), "resnet32": dict(epochs=6, lr=0.1),
           "vgg_small": dict(epochs=6, lr=0.1), "vit_small": dict(epochs=6, lr=0.05)}


def cache_dir() -> Path:
    return Path(os.environ.get("OBA_FX_CACHE") or Path.home() / ".cache" / "oba_fx" / "zoo")


def trained(name: str, epochs: int | None = None, *, seed: int = 0, data: str | None = None,
            limit_train: int | None = None, progress: bool = True, log=print) -> nn.Module:
    """A zoo model trained on Fashion-MNIST, from the cache or trained now (eval mode)."""
    from oba_fx.data import get_dataset
    from oba_fx.train import load_checkpoint, train

    from .registry import ZOO, create

    if name not in ZOO:
        raise ValueError(f"trained() covers the zoo models {', '.join(ZOO)}; got '{name}'")
    recipe = dict(RECIPES.get(name, dict(epochs=6, lr=0.1)))
    epochs = int(epochs or recipe["epochs"])
    spec = get_dataset("fashion-mnist", data, limit_train=limit_train)
    tag = f"-n{limit_train}" if limit_train else ""
    path = cache_dir() / f"{name}-fmnist-e{epochs}-s{seed}{tag}.pt"
    if path.exists() and _epochs_done(path) == epochs:
        model, _ = load_checkpoint(path)
        return model
    kw = {"in_channels": 1, "num_classes": 10}
    if name.startswith("vit"):
        kw["img_size"] = 28
    torch.manual_seed(seed)
    model = create(name, **kw)
    train(model, spec.train(128, seed=seed), epochs, lr=recipe["lr"], checkpoint=path,
                 resume=path.exists(), model_spec={"name": name, "kwargs": kw}, eval_data=spec.test(512),
                 meta={"dataset": spec.name, "input_shape": list(spec.input_shape), "num_classes": 10},
                 seed=seed, progress=progress, log=log)
    return model.eval()


def _epochs_done(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False).get("epoch", 0))
    except Exception:  # noqa: BLE001 - a damaged cache file is retrained
        return 0
