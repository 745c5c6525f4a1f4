"""Issue 15, defect 4: exact curvature through piecewise-linear activations (hardsigmoid & co.).

Each activation is checked in the three derivative paths of the curvature
engine, forward-over-reverse, double backward and torch.func (group-exact), and
in the triple backward of oba-k3, against dense derivatives of a twin network
whose activations are the textbook piecewise formulas written with torch.where.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.func import functional_call

import oba_fx
from dense_reference import dense
from oba_fx.passes.curvature import curvature


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def _where(x, cond, a, b):
    return torch.where(cond, a if isinstance(a, torch.Tensor) else torch.full_like(x, a),
                       b if isinstance(b, torch.Tensor) else torch.full_like(x, b))


def ref_hardsigmoid(x):
    return _where(x, x <= -3, 0.0, _where(x, x >= 3, 1.0, x / 6 + 0.5))


def ref_clamp(lo, hi):
    return lambda x: _where(x, x <= lo, lo, _where(x, x >= hi, hi, x))


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


# name: (activation module factory, textbook reference, kinks)
ACTIVATIONS = {
    "nn.Hardsigmoid": (nn.Hardsigmoid, ref_hardsigmoid, (-3.0, 3.0)),
    "nn.Hardsigmoid(inplace)": (lambda: nn.Hardsigmoid(inplace=True), ref_hardsigmoid, (-3.0, 3.0)),
    "F.hardsigmoid(inplace)": (lambda: Fn(lambda x: F.hardsigmoid(x, inplace=True)), ref_hardsigmoid, (-3.0, 3.0)),
    "nn.Hardswish": (nn.Hardswish, lambda x: x * ref_hardsigmoid(x), (-3.0, 3.0)),
    "nn.Hardswish(inplace)": (lambda: nn.Hardswish(inplace=True), lambda x: x * ref_hardsigmoid(x), (-3.0, 3.0)),
    "nn.ReLU6": (nn.ReLU6, ref_clamp(0.0, 6.0), (0.0, 6.0)),
    "F.relu6(inplace)": (lambda: Fn(lambda x: F.relu6(x, inplace=True)), ref_clamp(0.0, 6.0), (0.0, 6.0)),
    "nn.Hardtanh(-0.5, 2)": (lambda: nn.Hardtanh(-0.5, 2.0), ref_clamp(-0.5, 2.0), (-0.5, 2.0)),
    "nn.LeakyReLU(0.1)": (lambda: nn.LeakyReLU(0.1), lambda x: _where(x, x > 0, x, 0.1 * x), (0.0,)),
    "nn.ELU": (nn.ELU, lambda x: _where(x, x > 0, x, torch.expm1(x)), (0.0,)),
}


class GatedMLP(nn.Module):
    """fc1 → act → (· act(gate)) → fc3: the activation both as a nonlinearity and as a squeeze-excitation gate."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 6), act()
        self.gate, self.act2 = nn.Linear(6, 6), act()
        self.fc3 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act1(self.fc1(x))
        return self.fc3(h * self.act2(self.gate(h)))


def _pair(name, seed=0):
    """(model, textbook twin with the same parameters, calibration, pre-activations of both activations)."""
    factory, ref, kinks = ACTIVATIONS[name]
    torch.manual_seed(seed)
    model = GatedMLP(factory).double().eval()
    with torch.no_grad():  # wide pre-activations: every linear piece and saturation is visited
        model.fc1.weight.mul_(6.0)
        model.gate.weight.mul_(4.0)
    twin = copy.deepcopy(model)
    twin.act1, twin.act2 = Fn(ref), Fn(ref)
    gen = torch.Generator().manual_seed(seed + 1)
    cal = [(torch.randn(b, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (5, 4)]
    pre = []
    hooks = [m.register_forward_pre_hook(lambda m, a: pre.append(a[0].detach().clone())) for m in (twin.act1, twin.act2)]
    for x, _ in cal:
        twin(x)
    for h in hooks:
        h.remove()
    pre = torch.cat([p.reshape(-1) for p in pre])
    # the dense reference is valid only off the kinks; the pieces must all be visited for the test to mean much
    assert min((pre - k).abs().min().item() for k in kinks) > 1e-4
    assert (pre < kinks[0]).any() and (pre > kinks[-1]).any()
    return model, twin, cal, pre


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_products_match_dense_in_every_path(name):
    model, twin, cal, _ = _pair(name)
    fl, g, H, G, T = dense(twin, cal, third=True)
    d = -fl.theta
    Hd, Gd, T3 = H @ d, G @ d, torch.einsum("ijk,j,k->i", T, d, d)
    before = copy.deepcopy(model.state_dict())
    for backend in ("fwad", "double-backward"):
        r = curvature(model, cal, want=("g", "H", "G", "F"), backend=backend, progress=False)
        assert r.backend == ("forward-over-reverse" if backend == "fwad" else "double-backward")
        assert rel(fl.flat(r.g), g) <= 1e-10, backend
        assert rel(fl.flat(r.H), Hd) <= 1e-8, backend
        assert rel(fl.flat(r.G), Gd) <= 1e-8, backend
        assert rel(fl.flat(r.F), Hd - Gd) <= 1e-8, backend
    r3 = curvature(model, cal, want=("g", "H", "T3"), progress=False)
    assert rel(fl.flat(r3.H), Hd) <= 1e-8
    assert rel(fl.flat(r3.T3), T3) <= 1e-8
    s = oba_fx.parameter_scores(model, cal, "oba-k3", progress=False)
    assert rel(fl.flat(s), g * d + 0.5 * d * Hd + d * T3 / 6) <= 1e-8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hardswish_has_its_curvature():
    """Not every piecewise-linear-looking activation has zero curvature: hardswish'' = 1/3 on (−3, 3)."""
    x = torch.tensor([-4.0, -2.0, 0.5, 2.9, 3.5], dtype=torch.float64)
    second = torch.func.vmap(torch.func.grad(torch.func.grad(F.hardswish)))(x)
    assert torch.equal(second, torch.tensor([0, 1 / 3, 1 / 3, 1 / 3, 0], dtype=torch.float64))
    model, twin, cal, pre = _pair("nn.Hardswish")
    assert ((pre > -3) & (pre < 3)).any()  # the curved piece is visited, so H ≠ G + (a linear network's F)
    fl, _, H, _, _ = dense(twin, cal, third=False)
    r = curvature(model, cal, want=("H",), progress=False)
    assert rel(fl.flat(r.H), H @ -fl.theta) <= 1e-8


@pytest.mark.parametrize("name", ["nn.Hardsigmoid", "F.hardsigmoid(inplace)", "nn.Hardswish", "nn.Hardtanh(-0.5, 2)"])
def test_group_exact_matches_dense(name):
    model, twin, cal, _ = _pair(name)
    graph = oba_fx.trace(model, cal[0][0])
    assert graph.prunable_groups
    fl, g, H, _, _ = dense(twin, cal, third=False)
    params = dict(graph.gm.named_parameters())
    scores = oba_fx.group_scores(graph, cal, "group-exact", method="vmap", progress=False)
    for grp in graph.prunable_groups:
        want = []
        for c in range(grp.size):
            masks = {n: torch.zeros_like(p) for n, p in params.items()}
            for m in grp.members:
                if m.name in masks:
                    masks[m.name].index_fill_(m.dim, m.index[m.channel == c], 1.0)
            dc = fl.flat(masks) * -fl.theta
            want.append((g @ dc + 0.5 * dc @ H @ dc).item())
        assert torch.allclose(scores[grp.id], torch.tensor(want, dtype=torch.float64), rtol=1e-8, atol=1e-12)


def test_mode_covers_only_scoring():
    """The composite is active inside scoring only: F.hardsigmoid is untouched outside."""
    from oba_fx.passes.curvature import ExactCurvatureOps

    x = torch.linspace(-5.5, 5.5, 12, dtype=torch.float64, requires_grad=True)  # no point on a kink
    inside = ((x > -3) & (x < 3)).double().detach()
    with ExactCurvatureOps():
        (g,) = torch.autograd.grad(F.hardsigmoid(x).square().sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)  # d²/dx² hs(x)² = 2 hs'(x)²: fails with the native kernel
        y = x.detach().clone()
        z = F.hardsigmoid(y, inplace=True)
    assert torch.equal(z, F.hardsigmoid(x.detach())) and z.data_ptr() == y.data_ptr()
    assert torch.allclose(g, 2 * F.hardsigmoid(x.detach()) * inside / 6, rtol=1e-15, atol=0)
    assert torch.allclose(h, 2 * inside / 36, rtol=1e-15, atol=0)
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):
        (g,) = torch.autograd.grad(F.hardsigmoid(x).square().sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


def _textbook_copy(model):
    """The model with every nn.Hardsigmoid replaced by the torch.where formula (twice differentiable natively)."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.Hardsigmoid):
                setattr(m, child_name, Fn(ref_hardsigmoid))
    return twin


def test_mobilenet_v3_every_second_order_criterion():
    """torchvision mobilenet_v3_small (hardsigmoid SE gates, hardswish) against plain autograd on its twin.

    At width 0.25 (same blocks, a quarter of the channels) so the float64 references take seconds.
    """
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10, width_mult=0.25).double().eval()
    assert any(isinstance(m, nn.Hardsigmoid) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([1, 7])
    cal = [(x, y)]
    twin = _textbook_copy(model)
    names = [n for n, p in model.named_parameters()]
    theta = {n: p.detach() for n, p in twin.named_parameters()}
    delta = {n: -t for n, t in theta.items()}
    p = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    out = functional_call(twin, p, (x,))
    loss = F.cross_entropy(out, y)
    g = torch.autograd.grad(loss, list(p.values()), create_graph=True)
    gd = sum((a * delta[n]).sum() for a, n in zip(g, names))
    Hd = torch.autograd.grad(gd, list(p.values()), create_graph=True)
    dHd = sum((a * delta[n]).sum() for a, n in zip(Hd, names))
    (T3,) = [sum((a * delta[n]).sum() for a, n in zip(torch.autograd.grad(dHd, list(p.values())), names))]
    # δᵀGδ = (Jδ)ᵀ ∇²ℓ (Jδ): Jδ by forward AD through the twin, ∇²ℓ at the logits by autograd
    _, Jd = torch.func.jvp(lambda q: functional_call(twin, q, (x,)), (theta,), (delta,))
    o = out.detach().requires_grad_(True)
    (c,) = torch.autograd.grad(F.cross_entropy(o, y), o, create_graph=True)
    (u,) = torch.autograd.grad(c, o, Jd)
    dGd = (Jd * u).sum()
    first, dHd, T3 = gd.item(), dHd.item(), T3.item()
    total = lambda s: sum(v.sum() for v in s.values()).item()  # noqa: E731
    want = {"oba": first + dHd / 2, "oba-gn": first + dGd.item() / 2, "oba-network": first + (dHd - dGd.item()) / 2,
            "oba-k3": first + dHd / 2 + T3 / 6}
    for crit, ref in want.items():
        s = oba_fx.parameter_scores(model, cal, crit, progress=False)
        assert total(s) == pytest.approx(ref, rel=1e-7, abs=1e-12), crit
    s = oba_fx.parameter_scores(model, cal, "obd", probes=1, progress=False)
    assert all(torch.isfinite(v).all() and (v.shape == theta[n].shape) for n, v in s.items())
    # group-exact on two channels of the first two groups, against δ_cᵀHδ_c by double backward on the twin
    graph = oba_fx.trace(model, x)
    groups = graph.prunable_groups[:2]
    got, _ = oba_fx.group_exact_scores(graph, cal, method="vmap", progress=False,
                                       channels={grp.id: [0, grp.size - 1] for grp in groups})
    gp = dict(graph.gm.named_parameters())
    for grp in groups:
        for ch in (0, grp.size - 1):
            dc = {n: torch.zeros_like(t) for n, t in theta.items()}
            for m in grp.members:
                if m.name in dc:
                    idx = m.index[m.channel == ch]
                    dc[m.name].index_copy_(m.dim, idx, -gp[m.name].detach().index_select(m.dim, idx))
            q = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            gq = torch.autograd.grad(F.cross_entropy(functional_call(twin, q, (x,)), y), list(q.values()),
                                     create_graph=True)
            gdc = sum((a * dc[n]).sum() for a, n in zip(gq, names))
            hq = torch.autograd.grad(gdc, list(q.values()))
            ref = gdc.item() + 0.5 * sum((a * dc[n]).sum() for a, n in zip(hq, names)).item()
            assert got[grp.id][ch].item() == pytest.approx(ref, rel=1e-7, abs=1e-12), (grp.id, ch)
