"""Compensation and BatchNorm re-estimation against brute force on tiny float64 models.

The compensation reference builds each consumer's input matrix X explicitly (by hand: unfolded convs,
the attention output before its projection computed from the weights) and solves the damped least
squares problem with ``torch.linalg.lstsq`` on the stacked system [X_K; √λ I] Vᵀ = [X Wᵀ; √λ W_Kᵀ], a
different route from the Gram-matrix solve in passes/compensate.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
from oba_fx.passes.compensate import compensate
from oba_fx.passes.curvature import CalibrationError
from oba_fx.passes.norm_stats import reestimate_batchnorm



@pytest.fixture(autouse=True)
def _float64():
    """float64 for this module only (a module-level default would leak into other tests of the worker)."""
    was = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(was)


def _lstsq(X, W, keep_cols, damping, bias=None):
    """Damped least squares refit of the kept columns (and the bias as a constant column)."""
    if bias is not None:
        X = torch.cat([X, torch.ones(X.shape[0], 1)], 1)
        W = torch.cat([W, bias[:, None]], 1)
        keep_cols = list(keep_cols) + [X.shape[1] - 1]
    XK = X[:, keep_cols]
    lam = damping * float((XK * XK).sum(0).mean())
    A = torch.cat([XK, lam ** 0.5 * torch.eye(len(keep_cols))])
    B = torch.cat([X @ W.T, lam ** 0.5 * W[:, keep_cols].T])
    V = torch.linalg.lstsq(A, B).solution.T
    return (V[:, :-1], V[:, -1]) if bias is not None else (V, None)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 12), nn.Linear(12, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _batches(shape, n=3, batch=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _group_of(graph, weight_name, dim=0):
    return next(g for g in graph.prunable_groups
                if any(m.name == weight_name and m.dim == dim and m.role == "producer" for m in g.members))


@pytest.mark.parametrize("damping", [0.0, 1e-2, 0.3])
def test_linear_refit_is_the_least_squares_solution(damping):
    torch.manual_seed(0)
    m = _MLP().eval()
    cal = _batches((6,))
    graph = oba_fx.trace(m, cal[0][0])
    removal = {_group_of(graph, "fc1.weight").id: [1, 4, 5, 9], _group_of(graph, "fc2.weight").id: [0, 7]}
    slim = graph.prune(removal)
    rep = graph.compensate(slim, removal, cal, damping=damping)
    assert sorted(rep["layers"]) == ["fc2", "fc3"]
    X = torch.cat([torch.tanh(m.fc1(x)) for x, _ in cal]).detach()
    keep_rows2 = [i for i in range(8) if i not in (0, 7)]
    keep1 = [i for i in range(12) if i not in (1, 4, 5, 9)]
    V, b = _lstsq(X, m.fc2.weight[keep_rows2].detach(), keep1, damping, m.fc2.bias[keep_rows2].detach())
    torch.testing.assert_close(slim.fc2.weight, V, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(slim.fc2.bias, b, rtol=1e-7, atol=1e-9)
    X3 = torch.cat([torch.tanh(m.fc2(torch.tanh(m.fc1(x)))) for x, _ in cal]).detach()
    V3, b3 = _lstsq(X3, m.fc3.weight.detach(), keep_rows2, damping, m.fc3.bias.detach())
    torch.testing.assert_close(slim.fc3.weight, V3, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(slim.fc3.bias, b3, rtol=1e-7, atol=1e-9)
    # the report's output error is that of the refit, computed independently here
    before, after = rep["output_error"]["fc3"]
    ref = X3 @ m.fc3.weight.T.detach() + m.fc3.bias.detach()
    cut = X3[:, keep_rows2] @ m.fc3.weight[:, keep_rows2].T.detach() + m.fc3.bias.detach()
    new = (X3[:, keep_rows2] @ slim.fc3.weight.T + slim.fc3.bias).detach()
    assert before == pytest.approx(float((cut - ref).norm() / ref.norm()), rel=1e-6)
    assert after == pytest.approx(float((new - ref).norm() / ref.norm()), rel=1e-6)
    assert after < before


class _Convs(nn.Module):
    def __init__(self, groups=1, padding_mode="zeros", conv1d=False):
        super().__init__()
        C = nn.Conv1d if conv1d else nn.Conv2d
        self.c1 = C(3, 8, 3, padding=1)
        self.c2 = C(8, 8, 3, padding=1, groups=groups, padding_mode=padding_mode, stride=2 if not conv1d else 1)
        self.c3 = C(8, 6, 1)
        self.head = nn.Linear(6, 4)
        self.conv1d = conv1d

    def forward(self, x):
        x = self.c3(torch.relu(self.c2(torch.relu(self.c1(x)))))
        return self.head(x.mean(-1) if self.conv1d else x.mean((2, 3)))


def _unfold(conv, x):
    """im2col by hand (loops over kernel offsets), channel-major like weight.reshape(out, -1)."""
    if isinstance(conv, nn.Conv1d):
        x = x.unsqueeze(2)
        kh, kw, sh, sw, ph, pw = 1, conv.kernel_size[0], 1, conv.stride[0], 0, conv.padding[0]
    else:
        (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, (pw, pw, ph, ph), mode=mode)
    N, C, H, W = xp.shape
    oh, ow = (H - kh) // sh + 1, (W - kw) // sw + 1
    cols = torch.empty(N, oh, ow, C, kh, kw)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, :, i, j] = xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw].permute(0, 2, 3, 1)
    return cols.reshape(N * oh * ow, C * kh * kw)


def _conv_reference(m, cal, removed_in, removed_rows, groups, damping=1e-2):
    per = m.c2.weight.shape[1]
    k = m.c2.weight[0, 0].numel()
    keep_cols = [c * k + t for c in range(per) if c not in removed_in for t in range(k)]
    X = torch.cat([_unfold(m.c2, torch.relu(m.c1(x))) for x, _ in cal]).detach()
    out_g = m.c2.out_channels // groups
    Ws, bs = [], []
    for j in range(groups):
        rows = [r for r in range(j * out_g, (j + 1) * out_g) if r not in removed_rows]
        Xj = X[:, j * per * k:(j + 1) * per * k]
        V, b = _lstsq(Xj, m.c2.weight[rows].detach().reshape(len(rows), -1), keep_cols, damping,
                      m.c2.bias[rows].detach())
        Ws.append(V)
        bs.append(b)
    return torch.cat(Ws), torch.cat(bs)


@pytest.mark.parametrize("padding_mode,conv1d", [("zeros", False), ("reflect", False), ("zeros", True)])
def test_conv_refit_is_the_least_squares_solution(padding_mode, conv1d):
    torch.manual_seed(0)
    m = _Convs(1, padding_mode, conv1d).eval()
    cal = _batches((3, 10) if conv1d else (3, 7, 7), batch=4, classes=4)
    graph = oba_fx.trace(m, cal[0][0])
    removal = {_group_of(graph, "c1.weight").id: [0, 3, 6], _group_of(graph, "c2.weight").id: [2]}
    slim = graph.prune(removal)
    rep = graph.compensate(slim, removal, cal, damping=1e-2)
    assert sorted(rep["layers"]) == ["c2", "c3"], rep
    W, b = _conv_reference(m, cal, {0, 3, 6}, {2}, groups=1)
    torch.testing.assert_close(slim.c2.weight.reshape(slim.c2.weight.shape[0], -1), W, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(slim.c2.bias, b, rtol=1e-7, atol=1e-9)


def test_grouped_conv_refit_per_group():
    """The coupling prunes an nn.Conv2d with groups > 1 by whole conv groups (nothing to refit there); a
    grouped consumer that lost the same columns in every group is refit group by group."""
    torch.manual_seed(0)
    m = _Convs(2).eval()
    cal = _batches((3, 7, 7), batch=4, classes=4)
    graph = oba_fx.trace(m, cal[0][0])
    whole = _group_of(graph, "c1.weight")
    slim = graph.prune({whole.id: [1]})
    rep = graph.compensate(slim, {whole.id: [1]}, cal)
    assert rep["layers"] == ["c3"]  # c2 lost a whole conv group with its inputs: nothing to refit
    # per-group columns, by hand: column 1 of each group of c2 is cut (input channels 1 and 5)
    import copy

    import numpy as np

    slim = copy.deepcopy(m)
    keep = [0, 2, 3]
    slim.c2 = nn.Conv2d(6, 8, 3, padding=1, groups=2, stride=2)
    with torch.no_grad():
        slim.c2.weight.copy_(m.c2.weight[:, keep])
        slim.c2.bias.copy_(m.c2.bias)
    rep = compensate(m, slim, {"c2.weight": {1: np.array([1])}}, cal)
    assert rep["layers"] == ["c2"]
    W, b = _conv_reference(m, cal, {1}, set(), groups=2)
    torch.testing.assert_close(slim.c2.weight.reshape(8, -1), W, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(slim.c2.bias, b, rtol=1e-7, atol=1e-9)


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


def test_mha_out_proj_refit_uses_the_attention_output_before_the_projection():
    torch.manual_seed(0)
    m = _Attn().eval()
    cal = _batches((5, 8), batch=4)
    graph = oba_fx.trace(m, cal[0][0])
    heads = next(g for g in graph.prunable_groups if any(mm.role == "head" for mm in g.members))
    removal = {heads.id: [0]}
    cuts = graph.cuts(removal)
    slim = graph.prune(removal)
    rep = graph.compensate(slim, removal, cal, damping=1e-2)
    assert "attn.out_proj" in rep["layers"], rep
    a = m.attn
    E, H = 8, 2
    xs = []
    for x, _ in cal:  # attention output before out_proj, from the weights
        q, k, v = (x @ a.in_proj_weight.detach().T + a.in_proj_bias.detach()).chunk(3, -1)
        sh = lambda t: t.reshape(t.shape[0], t.shape[1], H, E // H).transpose(1, 2)  # noqa: E731
        att = torch.softmax(sh(q) @ sh(k).transpose(-1, -2) / (E // H) ** 0.5, -1) @ sh(v)
        xs.append(att.transpose(1, 2).reshape(-1, E))
    X = torch.cat(xs)
    removed = set(cuts["attn.out_proj.weight"][1].tolist())
    keep = [i for i in range(E) if i not in removed]
    V, b = _lstsq(X, a.out_proj.weight.detach(), keep, 1e-2, a.out_proj.bias.detach())
    torch.testing.assert_close(slim.attn.out_proj.weight, V, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(slim.attn.out_proj.bias, b, rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------- BatchNorm re-estimation

class _BN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(self.drop(torch.relu(x).mean((2, 3))))


def test_batchnorm_reestimation_averages_the_batch_statistics():
    torch.manual_seed(0)
    m = _BN().eval()
    m.fc.weight.requires_grad_(False)
    cal = _batches((3, 6, 6), n=3, batch=5)
    info = reestimate_batchnorm(m, cal)
    assert info == {"layers": 2, "batches": 3, "samples": 15}
    assert not m.training and not m.b1.training and not m.drop.training and m.b1.momentum == 0.1
    assert not m.fc.weight.requires_grad
    # by hand: each batch normalised by its own statistics (training-mode BatchNorm), then averaged
    means1, vars1, means2, vars2 = [], [], [], []
    for x, _ in cal:
        h = m.c1(x)
        means1.append(h.mean((0, 2, 3)))
        vars1.append(h.var((0, 2, 3), unbiased=True))
        hn = (h - h.mean((0, 2, 3), keepdim=True)) / (h.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
        hn = hn * m.b1.weight[:, None, None] + m.b1.bias[:, None, None]
        h2 = m.c2(torch.relu(hn))
        means2.append(h2.mean((0, 2, 3)))
        vars2.append(h2.var((0, 2, 3), unbiased=True))
    torch.testing.assert_close(m.b1.running_mean, torch.stack(means1).mean(0).detach())
    torch.testing.assert_close(m.b1.running_var, torch.stack(vars1).mean(0).detach())
    torch.testing.assert_close(m.b2.running_mean, torch.stack(means2).mean(0).detach())
    torch.testing.assert_close(m.b2.running_var, torch.stack(vars2).mean(0).detach())
    assert int(m.b1.num_batches_tracked) == 3


def test_batchnorm_reestimation_failure_leaves_the_statistics():
    torch.manual_seed(0)
    m = _BN().eval()
    before = m.b1.running_mean.clone()
    with pytest.raises(CalibrationError, match="no batches"):
        reestimate_batchnorm(m, [])
    torch.testing.assert_close(m.b1.running_mean, before)
    assert m.b1.momentum == 0.1


# --------------------------------------------------------------------------- through compress

def test_compress_reestimates_batchnorm_and_compensates_by_default():
    import copy

    torch.manual_seed(0)
    m = _BN().eval()
    with torch.no_grad():  # stored statistics that are not those of the data
        m.b1.running_mean.fill_(0.3)
        m.b1.running_var.fill_(2.0)
    snap = copy.deepcopy(m.state_dict())
    cal = _batches((3, 6, 6), n=2, batch=8)
    x = cal[0][0]
    kw = dict(target_flops=0.7, criterion="magnitude", progress=False)
    plain = oba_fx.compress(m, x, cal, compensate=False, reestimate_bn=False, **kw)
    default = oba_fx.compress(m, x, cal, compensate=False, **kw)
    comp = oba_fx.compress(m, x, cal, **kw)  # the defaults: compensation, then BatchNorm re-estimation
    assert comp.report["post_rewrite"] == {"compensate": True, "damping": 0.01, "reestimate_bn": "calibration batches"}
    assert "batchnorm" not in plain.report["step_reports"][0]["post_rewrite"]
    for k, v in m.state_dict().items():  # the user's model is never touched
        assert torch.equal(v, snap[k]), k
    # re-estimation gives the plain slim model with its statistics re-estimated on the calibration batches
    ref = copy.deepcopy(plain.model)
    reestimate_batchnorm(ref, cal)
    torch.testing.assert_close(default.model.b1.running_mean, ref.b1.running_mean)
    torch.testing.assert_close(default.model.b2.running_var, ref.b2.running_var)
    assert not torch.allclose(plain.model.b1.running_mean, ref.b1.running_mean)
    st = default.report["step_reports"][0]
    assert st["post_rewrite"]["batchnorm"]["layers"] == 2
    with torch.no_grad():  # the reported loss, recomputed by hand (equal batch sizes: the plain mean)
        by_hand = sum(float(F.cross_entropy(default.model.eval()(xb), yb)) for xb, yb in cal) / len(cal)
    assert st["loss_after"] == pytest.approx(by_hand, rel=1e-10)
    assert default.report["post_rewrite"] == {"compensate": False, "damping": None,
                                              "reestimate_bn": "calibration batches"}
    # compensation: the consumers of removed channels were refit, then BatchNorm re-estimated
    cst = comp.report["step_reports"][0]["post_rewrite"]
    assert cst["compensation"]["layers"] and "loss_after_compensation" in cst
    assert all(a <= b + 1e-12 for b, a in cst["compensation"]["output_error"].values())
    # batches given for re-estimation are used instead of the calibration batches
    other = _batches((3, 6, 6), n=2, batch=8, seed=5)
    given = oba_fx.compress(m, x, cal, compensate=False, reestimate_bn=iter(other), **kw)
    ref2 = copy.deepcopy(plain.model)
    reestimate_batchnorm(ref2, other)
    torch.testing.assert_close(given.model.b1.running_mean, ref2.b1.running_mean)
    with pytest.raises(ValueError, match="reestimate_bn must be"):
        oba_fx.compress(m, x, cal, reestimate_bn="yes", **kw)
