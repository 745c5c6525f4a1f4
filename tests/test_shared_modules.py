"""A module reached under two names, and weights tied across modules, through every path that swaps tensors.

torch's functional_call restores swapped tensors name by name, in order; a module reached under two names
(CoaT's shared position encodings: ``block.pe = self.pe``) is one slot both names address, so the second
swap saves the stand-in as the "original" and the restore leaves it in the model. Counting left meta tensors
in the user's model (every later forward gave NaN: timm coat_lite_tiny failed the coverage sweep with "the
loss is nan"); scoring replaced its Parameters by plain tensors. The references here are plain autograd on
the model's own parameters, not functional_call.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
from oba_fx.passes.curvature import curvature


class SharedPE(nn.Module):
    def __init__(self):
        super().__init__()
        self.pe = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(8, 8, 1), nn.Tanh()) for _ in range(2)])
        for b in self.blocks:
            b.pe = self.pe
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = x + b.pe(x)
            x = b[1](b[0](x))
        return self.head(x.mean((2, 3)))


class TiedAcross(nn.Module):
    """Two different modules holding one Parameter (input/output embedding tying)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 6)
        self.out.weight = self.inp.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def _data(model):
    g = torch.Generator().manual_seed(0)
    if isinstance(model, SharedPE):
        return torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    return torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 6, (5,), generator=g)


def _snapshot(model):
    return [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]


def _untouched(model, snap, x, ref):
    now = _snapshot(model)
    assert [n for n, _ in now] == [n for n, _ in snap]
    assert all(p is q and type(p) is nn.Parameter and p.device.type == "cpu" for (_, p), (_, q) in zip(now, snap))
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("cls", [SharedPE, TiedAcross])
def test_count_leaves_the_model_as_it_was(cls):
    torch.manual_seed(0)
    m = cls().double().eval()
    x, _ = _data(m)
    snap, ref = _snapshot(m), m(x).detach()
    flops, params = oba_fx.count(m, x)
    assert flops > 0 and params == sum(p.numel() for p in m.parameters())
    _untouched(m, snap, x, ref)


@pytest.mark.parametrize("cls", [SharedPE, TiedAcross])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_curvature_is_exact_and_leaves_the_model_as_it_was(cls, checkpoint):
    torch.manual_seed(0)
    m = cls().double().eval()
    x, y = _data(m)
    snap, ref = _snapshot(m), m(x).detach()
    res = curvature(m, [(x, y)], want=("g", "H"), progress=False, checkpoint=checkpoint)
    _untouched(m, snap, x, ref)
    # reference: plain double backward through the model's own (shared / tied) parameters
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    loss = F.cross_entropy(m(x), y)
    g = torch.autograd.grad(loss, params, create_graph=True)
    delta = [-p.detach() for p in params]
    hd = torch.autograd.grad(sum((gi * di).sum() for gi, di in zip(g, delta)), params)
    for n, gi, hi in zip(names, g, hd):
        torch.testing.assert_close(res.g[n], gi.detach(), rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(res.H[n], hi, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("criterion", ["oba", "obd", "oba-network", "group-exact", "obd-fisher", "magnitude"])
def test_compress_and_scoring_leave_a_shared_module_model_as_it_was(criterion):
    torch.manual_seed(0)
    m = SharedPE().eval()
    x = torch.randn(4, 3, 6, 6)
    y = torch.randint(0, 10, (4,))
    snap, ref = _snapshot(m), m(x).detach()
    res = oba_fx.compress(m, x, [(x, y)], target_flops=0.7, criterion=criterion, progress=False)
    _untouched(m, snap, x, ref)
    assert res.report["flops"]["ratio"] <= 0.7
