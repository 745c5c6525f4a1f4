"""Issue 3: the curvature engine and criteria against dense float64 references."""
from __future__ import annotations

import copy

import math

import pytest
import torch
from torch.func import grad, jacfwd

import oba_fx
from dense_reference import Flat, dense, full_data
from oba_fx.passes.curvature import CalibrationError, curvature
from tiny_models import TINY, make
from torch.func import functional_call
import torch.nn.functional as F


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def third_order_reference(model, calibration, delta_flat, fl):
    """∇³L[δ,δ] = d/dε (H(θ + εδ) δ) by 4th-order central differences of dense Hessians."""
    m = copy.deepcopy(model)

    def hd(eps):
        with torch.no_grad():
            for (n, p), v in zip(m.named_parameters(), fl.unflat(fl.theta + eps * delta_flat).values()):
                p.copy_(v)
        _, _, H, _, _ = dense(m, calibration, third=False)
        return H @ delta_flat

    h = 1e-5  # small: ReLU kinks must not fall inside the stencil
    return (8 * (hd(h) - hd(-h)) - (hd(2 * h) - hd(-2 * h))) / (12 * h)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_products_match_dense_hessian(name):
    model, cal = make(name)
    fl, g, H, G, _ = dense(model, cal, third=False)
    d = -fl.theta
    t3 = third_order_reference(model, cal, d, fl)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = curvature(model, cal, want=("g", "H", "G", "F"), progress=False)
    assert r.n_samples == 12 and r.batches == 3
    assert rel(fl.flat(r.g) * d, g * d) <= 1e-8
    assert rel(d * fl.flat(r.H), d * (H @ d)) <= 1e-8
    assert rel(d * fl.flat(r.G), d * (G @ d)) <= 1e-8
    assert rel(d * fl.flat(r.F), d * ((H - G) @ d)) <= 1e-8
    r3 = curvature(model, cal, want=("g", "H", "T3"), progress=False)
    assert rel(d * fl.flat(r3.T3), d * t3) <= 1e-8
    # the per-parameter criteria are these terms
    s = oba_fx.parameter_scores(model, cal, "oba-k3", progress=False)
    ref = g * d + 0.5 * d * (H @ d) + d * t3 / 6
    assert rel(fl.flat(s), ref) <= 1e-8
    for crit, M in (("oba", H), ("oba-gn", G), ("oba-network", H - G)):
        s = oba_fx.parameter_scores(model, cal, crit, progress=False)
        assert rel(fl.flat(s), g * d + 0.5 * d * (M @ d)) <= 1e-8, crit
    # buffers (BN running stats) bit-identical, parameters untouched, mode kept
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


@pytest.mark.parametrize("name", ["gelu_mlp", "attention"])
def test_double_backward_fallback_matches(name):
    model, cal = make(name)
    a = curvature(model, cal, want=("g", "H", "G", "F"), progress=False)
    b = curvature(model, cal, want=("g", "H", "G", "F"), progress=False, backend="double-backward")
    assert a.backend == "forward-over-reverse" and b.backend == "double-backward"
    for q in "gHGF":
        for n in a.names:
            assert torch.allclose(getattr(a, q)[n], getattr(b, q)[n], rtol=1e-10, atol=1e-14), (q, n)


def test_streaming_equals_full_data():
    model, cal = make("residual_cnn")
    x, y = full_data(cal)
    a = curvature(model, cal, want=("g", "H", "F"), progress=False)
    b = curvature(model, [(x, y)], want=("g", "H", "F"), progress=False)
    assert a.n_samples == b.n_samples == len(y)
    for q in "gHF":
        for n in a.names:
            assert torch.allclose(getattr(a, q)[n], getattr(b, q)[n], rtol=1e-10, atol=1e-14)
    # a DataLoader works the same
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    c = curvature(model, loader, want=("g",), progress=False)
    assert all(torch.allclose(a.g[n], c.g[n], rtol=1e-10, atol=1e-14) for n in a.names)


def _channel_directions(graph, fl):
    """Flat δ_c for every channel of every prunable group, independent of the library's maps."""
    params = dict(graph.gm.named_parameters())
    out = []
    for g in graph.prunable_groups:
        for c in range(g.size):
            masks = {n: torch.zeros_like(p) for n, p in params.items()}
            for m in g.members:
                if m.name in masks:
                    idx = m.index[m.channel == c]
                    masks[m.name].index_fill_(m.dim, idx, 1.0)
            out.append((g.id, c, fl.flat(masks) * -fl.theta))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cnn_bn", "residual_cnn", "attention", "gelu_mlp"])
def test_group_exact_matches_dense(name):
    model, cal = make(name)
    x0 = cal[0][0]
    graph = oba_fx.trace(model, x0)
    assert graph.prunable_groups
    fl, g, H, _, _ = dense(graph.gm, cal, third=False)
    dirs = _channel_directions(graph, fl)
    D = torch.stack([d for _, _, d in dirs])
    M = D @ H @ D.T
    exact = {}
    for i, (gid, c, d) in enumerate(dirs):
        exact.setdefault(gid, []).append((g @ d + 0.5 * M[i, i]).item())
    scores = oba_fx.group_scores(graph, cal, "group-exact", method="vmap", progress=False)
    for gid, vals in exact.items():
        assert torch.allclose(scores[gid], torch.tensor(vals, dtype=torch.float64), rtol=1e-8, atol=1e-12), gid
    # channels=: only the named channels are computed (same values), the rest NaN
    pick = {gid: [len(vals) - 1, 0] for gid, vals in list(exact.items())[::2]}
    part, _ = oba_fx.group_exact_scores(graph, cal, method="vmap", progress=False, channels=pick)
    for gid, vals in exact.items():
        for c, v in enumerate(vals):
            if c in pick.get(gid, ()):
                assert part[gid][c].item() == pytest.approx(v, rel=1e-8, abs=1e-12), (gid, c)
            else:
                assert math.isnan(part[gid][c].item()), (gid, c)
    # probes: unbiased, within 5 standard deviations of the stated variance
    P = 200
    est, stderr = oba_fx.group_exact_scores(graph, cal, method="probes", probes=P, progress=False)
    sigma = ((M**2).sum(1) - M.diag() ** 2).sqrt() / P**0.5 * 0.5
    i = 0
    for gid, vals in exact.items():
        for c, v in enumerate(vals):
            assert abs(est[gid][c].item() - v) <= 5 * sigma[i].item() + 1e-12, (gid, c)
            i += 1
        assert (stderr[gid] >= 0).all()


def test_group_exact_channels_errors():
    model, cal = make("cnn_bn")
    graph = oba_fx.trace(model, cal[0][0])
    g = graph.prunable_groups[0]
    with pytest.raises(ValueError, match="method='vmap'"):
        oba_fx.group_exact_scores(graph, cal, method="probes", channels={g.id: [0]}, progress=False)
    with pytest.raises(ValueError, match="not a prunable group id"):
        oba_fx.group_exact_scores(graph, cal, method="vmap", channels={-7: [0]}, progress=False)
    with pytest.raises(ValueError, match=f"has {g.size} channels"):
        oba_fx.group_exact_scores(graph, cal, method="vmap", channels={g.id: [g.size]}, progress=False)


def test_group_scores_sum_member_slices():
    model, cal = make("cnn_bn")
    graph = oba_fx.trace(model, cal[0][0])
    per = oba_fx.parameter_scores(graph.gm, cal, "oba", progress=False)
    gs = oba_fx.group_scores(graph, cal, "oba", progress=False)
    assert set(gs) == {g.id for g in graph.prunable_groups}
    for g in graph.prunable_groups:
        want = torch.zeros(g.size, dtype=torch.float64)
        for c in range(g.size):
            for m in g.members:
                if m.name in per:
                    want[c] += per[m.name].index_select(m.dim, m.index[m.channel == c]).sum()
        assert torch.allclose(gs[g.id], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("criterion", oba_fx.CRITERIA)
def test_every_criterion_runs(criterion):
    model, cal = make("residual_cnn")
    graph = oba_fx.trace(model, cal[0][0])
    s = oba_fx.group_scores(graph, cal, criterion, progress=False, probes=8)
    assert set(s) == {g.id for g in graph.prunable_groups}
    for g in graph.prunable_groups:
        assert s[g.id].shape == (g.size,) and torch.isfinite(s[g.id]).all()
    r = oba_fx.rank_scores(s, normalize="max")
    assert all((v.abs() <= 1 + 1e-12).all() for v in r.values())


def test_obd_baselines_against_dense():
    model, cal = make("gelu_mlp")
    fl, g, H, _, _ = dense(model, cal, third=False)
    d = -fl.theta
    x, y = full_data(cal)
    # empirical Fisher by a plain per-sample loop
    fisher = torch.zeros_like(fl.theta)
    for i in range(len(y)):
        gi = grad(lambda v: F.cross_entropy(functional_call(model, fl.unflat(v), (x[i : i + 1],)), y[i : i + 1]))(fl.theta)
        fisher += gi**2
    fisher /= len(y)
    s = oba_fx.parameter_scores(model, cal, "obd-fisher", progress=False)
    assert rel(fl.flat(s), 0.5 * fisher * d**2) <= 1e-8
    # Hutchinson diagonal: unbiased, converges with probes
    s = oba_fx.parameter_scores(model, cal, "obd", probes=400, progress=False)
    assert rel(fl.flat(s), 0.5 * H.diag() * d**2) <= 0.25
    t = oba_fx.parameter_scores(model, cal, "taylor", progress=False)
    assert rel(fl.flat(t), (g * d).abs()) <= 1e-8


def test_bad_input_is_clear_and_model_unchanged():
    model, cal = make("cnn_bn")
    snap = copy.deepcopy(model.state_dict())
    with pytest.raises(CalibrationError, match="empty"):
        oba_fx.parameter_scores(model, [], "oba", progress=False)
    nan = [(cal[0][0].clone().fill_(float("nan")), cal[0][1])]
    with pytest.raises(CalibrationError, match="not finite|nan"):
        oba_fx.parameter_scores(model, nan, "oba", progress=False)
    inf_model = copy.deepcopy(model)
    with torch.no_grad():
        inf_model.fc.weight[0, 0] = float("inf")
    with pytest.raises(CalibrationError, match="batch 0"):
        oba_fx.parameter_scores(inf_model, cal, "oba", progress=False)
    with pytest.raises(CalibrationError, match=r"lie in \[0, 2\]"):
        oba_fx.parameter_scores(model, [(cal[0][0], cal[0][1] + 5)], "oba", progress=False)
    with pytest.raises(CalibrationError, match="shape"):
        oba_fx.parameter_scores(model, [(cal[0][0], cal[0][1][:2])], "oba", progress=False)
    with pytest.raises(CalibrationError, match=r"\(inputs, targets\)"):
        oba_fx.parameter_scores(model, [cal[0][0]], "oba", progress=False)
    with pytest.raises(ValueError, match="unknown criterion 'obaa'.*did you mean 'oba'"):
        oba_fx.parameter_scores(model, cal, "obaa")
    model.train()
    with pytest.raises(CalibrationError):
        oba_fx.parameter_scores(model, nan, "oba-network", progress=False)
    assert model.training, "mode restored after an error"
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", TINY)
def test_neg_theta_fast_path_is_exact(name, monkeypatch):
    """The δ = −θ shortcut for linear/conv layers gives the ordinary forward-AD results, and is really used."""
    import oba_fx.passes.neg_theta as C

    model, cal = make(name)
    hits = []
    orig = C.NegThetaMode.__exit__

    def spy(self, *a):
        hits.append(self.hits)
        return orig(self, *a)

    monkeypatch.setattr(C.NegThetaMode, "__exit__", spy)
    fast = curvature(model, cal, want=("g", "H", "G", "F"), progress=False)
    assert hits and min(hits) > 0
    plain = curvature(model, cal, want=("g", "H", "G", "F"), progress=False, shortcuts=False)
    for q in "gHGF":
        for n in plain.names:
            assert rel(getattr(fast, q)[n], getattr(plain, q)[n]) <= 1e-12, (q, n)
    # any other direction takes the ordinary path (the shortcut's condition is checked, not assumed)
    hits.clear()
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    curvature(model, cal, want=("H",), direction=v, progress=False)
    assert hits and max(hits) == 0


class _BNZoo(torch.nn.Module):
    """Eval-mode batch norms in every form the δ = −θ batch-norm shortcut meets or must leave alone."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(3)
        self.fc1 = torch.nn.Linear(12, 4)
        self.bn1 = torch.nn.BatchNorm1d(4)
        self.w_only = torch.nn.Parameter(torch.rand(4) + 0.5)  # F.batch_norm with a weight and no bias
        self.frozen_w = torch.nn.Parameter(torch.rand(4) + 0.5, requires_grad=False)  # not scored: plain path
        self.b_scored = torch.nn.Parameter(torch.randn(4))
        self.register_buffer("m", torch.randn(4))
        self.register_buffer("v", torch.rand(4) + 0.3)
        self.fc2 = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.bn2(self.conv(x)))
        h = torch.nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)
        h = torch.tanh(self.bn1(self.fc1(h)))
        h = torch.tanh(torch.nn.functional.batch_norm(h, self.m, self.v, self.w_only, None, False, 0.1, 1e-3))
        h = torch.nn.functional.batch_norm(h, self.m, self.v, self.frozen_w, self.b_scored, False, 0.1, 1e-5)
        return self.fc2(torch.tanh(h))


def test_batch_norm_shortcut_matches_the_dense_hessian(monkeypatch):
    """Eval-mode BN under δ = −θ (``_NegThetaBatchNorm``): ẏ = aẋ − y and its per-channel backward products give
    the dense Hessian's Hδ with random running statistics, BatchNorm1d/2d and a weight-only F.batch_norm; a BN
    whose weight is frozen (not scored) keeps the ordinary path, and the result is the same either way."""
    import oba_fx.passes.neg_theta as C
    from helpers import randomize_norms

    torch.manual_seed(3)
    model = randomize_norms(_BNZoo(), 3).double().eval()
    gen = torch.Generator().manual_seed(4)
    cal = [(torch.randn(b, 2, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (3, 5)]
    calls = []
    real = C._NegThetaBatchNorm.forward
    monkeypatch.setattr(C._NegThetaBatchNorm, "forward",
                        staticmethod(lambda ctx, *a: calls.append(a[1].shape[0]) or real(ctx, *a)))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    r = curvature(model, cal, want=("g", "H"), progress=False)
    # bn2, bn1 and the weight-only call, once per batch; the frozen-weight call keeps the ordinary path
    assert sorted(calls) == sorted([3, 4, 4] * len(cal)), calls
    fl, g, H, _, _ = dense(model, cal, third=False)
    scored = torch.cat([(p.requires_grad * torch.ones_like(p)).reshape(-1) for p in model.parameters()]).bool()
    d = -fl.theta * scored
    want_h = fl.unflat(H @ d)
    want_g = fl.unflat(g)
    for n in names:
        assert rel(r.H[n], want_h[n]) <= 1e-8, n
        assert rel(r.g[n], want_g[n]) <= 1e-8, n
    plain = curvature(model, cal, want=("g", "H"), progress=False, shortcuts=False)
    for n in names:
        assert rel(r.H[n], plain.H[n]) <= 1e-12 and rel(r.g[n], plain.g[n]) <= 1e-12, n


class _GeluZoo(torch.nn.Module):
    """GELU in every form the dual-GELU shortcut meets: nn.GELU, the tanh form, F.gelu, and one whose input has
    no tangent (its producer is frozen), which keeps the ordinary path."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Linear(4, 5)
        self.frozen.requires_grad_(False)
        self.fc1 = torch.nn.Linear(4, 6)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(6, 5)
        self.act_tanh = torch.nn.GELU(approximate="tanh")
        self.fc3 = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = self.act_tanh(self.fc2(self.act(self.fc1(x))))
        h = h + torch.nn.functional.gelu(self.frozen(x))  # no tangent reaches this GELU's input
        return self.fc3(torch.nn.functional.gelu(h * 1.5))


@pytest.mark.parametrize("direction", ["neg_theta", "random"])
def test_gelu_shortcut_matches_the_dense_hessian(monkeypatch, direction):
    """``_DualGelu`` (ẏ = f'ẋ; backward tangent ġf' + gẋf'') gives the dense Hessian's Hδ and the network part
    (H − G)δ for both GELU forms and any direction; a GELU whose input carries no tangent keeps the ordinary
    path, and the result equals the ordinary forward-over-reverse one."""
    import oba_fx.passes.neg_theta as C

    torch.manual_seed(5)
    model = _GeluZoo().double().eval()
    gen = torch.Generator().manual_seed(6)
    cal = [(3 * torch.randn(b, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (4, 6)]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fl, g, H, G, _ = dense(model, cal, third=False)
    scored = torch.cat([(p.requires_grad * torch.ones_like(p)).reshape(-1) for p in model.parameters()]).bool()
    if direction == "neg_theta":
        d, v = -fl.theta * scored, None
    else:
        d = torch.randn(fl.theta.numel(), generator=gen, dtype=torch.float64) * scored
        v = {n: t for n, t in fl.unflat(d).items() if n in names}
    calls = []
    real = C._DualGelu.forward
    monkeypatch.setattr(C._DualGelu, "forward",
                        staticmethod(lambda ctx, x, a: calls.append(a) or real(ctx, x, a)))
    r = curvature(model, cal, want=("g", "H", "F"), direction=v, progress=False)
    assert sorted(calls) == sorted(["none", "tanh", "none"] * len(cal)), calls  # not the frozen branch's
    want_h, want_f = fl.unflat(H @ d), fl.unflat((H - G) @ d)
    f_scale = ((H - G) @ d).abs().max()  # the last layer's F block is 0 (its roundoff, ~1e-17, is not a scale)
    for n in names:
        assert rel(r.H[n], want_h[n]) <= 1e-8, n
        assert (r.F[n] - want_f[n]).abs().max() <= 1e-8 * f_scale, n
        assert rel(r.g[n], fl.unflat(g)[n]) <= 1e-8, n
    plain = curvature(model, cal, want=("g", "H", "F"), direction=v, progress=False, shortcuts=False)
    for n in names:
        assert rel(r.H[n], plain.H[n]) <= 1e-12 and rel(r.F[n], plain.F[n]) <= 1e-12, n
