"""Compare oba_fx coupled groups with torch-pruning's DependencyGraph (test helper)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _kind(module: nn.Module, out: bool) -> str:
    if isinstance(module, NORM_TYPES):
        return "norm"
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels:
        return "out"  # depthwise: in == out
    return "out" if out else "in"


def depgraph_groups(model: nn.Module, example_inputs, classifier: nn.Module) -> set[frozenset]:
    """torch-pruning's groups rooted at Conv/Linear layers, as sets of (layer, kind, size)."""
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    names = {m: n for n, m in model.named_modules()}
    out = set()
    for group in DG.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear]):
        items = set()
        for dep, idxs in group:
            m = dep.target.module
            if isinstance(m, LAYER_TYPES) and m in names:
                out_ch = dep.handler.__name__ == "prune_out_channels"
                items.add((names[m], _kind(m, out_ch), len(idxs)))
        if items:
            out.add(frozenset(items))
    return out


def our_groups(graph) -> set[frozenset]:
    """oba_fx prunable groups as sets of (layer, kind, size) over the same layer types."""
    modules = dict(graph.gm.named_modules())
    out = set()
    for g in graph.prunable_groups:
        items = set()
        for m in g.members:
            mod = modules.get(m.module)
            if not isinstance(mod, LAYER_TYPES) or not m.name.endswith(".weight"):
                continue
            items.add((m.module, _kind(mod, m.dim == 0), int(m.index.numel())))
        if items:
            out.add(frozenset(items))
    return out


def diff(ours: set[frozenset], theirs: set[frozenset]) -> tuple[list, list]:
    only_ours = sorted((sorted(s) for s in ours - theirs), key=str)
    only_theirs = sorted((sorted(s) for s in theirs - ours), key=str)
    return only_ours, only_theirs
