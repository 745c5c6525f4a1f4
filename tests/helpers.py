"""Shared test utilities."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN/LN/GN affine params and running stats, so dropped channels matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return model


def random_removal(graph, fraction: float = 0.3, seed: int = 0) -> dict[int, list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for g in graph.prunable_groups:
        k = int(fraction * g.size)
        if k:
            out[g.id] = torch.randperm(g.size, generator=gen)[:k].tolist()
    return out


def zero_consumers(graph, removal: dict[int, list[int]], also=lambda member: False) -> nn.Module:
    """The traced model with the removed channels' consumer weights zeroed.

    ``also(member)`` selects further member slices to zero (e.g. attention
    output-projection columns, which carry role "head").
    """
    ref = copy.deepcopy(graph.gm)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for gid, channels in removal.items():
            chans = torch.as_tensor(channels)
            for m in graph.group(gid).members:
                if (m.role != "consumer" and not also(m)) or m.name not in params:  # buffers stay
                    continue
                idx = m.index[torch.isin(m.channel, chans)]
                params[m.name].index_fill_(m.dim, idx, 0.0)
    return ref


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)
