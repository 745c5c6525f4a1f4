"""Group scores from row/column marginals (``curvature(marginals=...)``) equal the per-parameter route and
the dense Hessian, and the marginal route is really taken."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import oba_fx
import oba_fx.scoring as S
import oba_fx.passes.curvature as C
import oba_fx.passes.neg_theta as NT
from dense_reference import Flat, dense
from tiny_models import TINY, make


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


class Grouped(nn.Module):
    """Biased convs, a grouped and a depthwise conv, an in-place leaky ReLU on a conv's own output (its kept
    output is then recomputed; an in-place ReLU would not show a missing recompute: g and ġ vanish where it
    changes y), a frozen bias, a conv1d and a linear on a 3-D input, and one weight used twice."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.c3 = nn.Conv2d(8, 6, 1)
        self.c3.bias.requires_grad_(False)
        self.c4 = nn.Conv1d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.leaky_relu(self.c1(x), 0.2, inplace=True)
        x = F.relu(self.bn2(self.c2(x)))
        x = torch.tanh(self.dw(x))
        x = self.c3(x)
        b, c, h, w = x.shape
        x = torch.tanh(self.c4(x.reshape(b, c, h * w)))  # (B, 6, L)
        x = self.fc(x.transpose(1, 2).contiguous())  # (B, L, 6): 3-D input
        # the same weight again, and an in-place op on a linear's N-d output (F.linear returns a view there)
        x = self.fc(F.leaky_relu(x, 0.1, inplace=True))
        return self.head(x.mean(1))


def _models():
    out = {name: make(name) for name in TINY}
    torch.manual_seed(3)
    m = Grouped().double().eval()
    for bn in [m.bn2]:
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(4)
    out["grouped"] = (m, [(torch.randn(b, 2, 4, 4, generator=gen, dtype=torch.float64),
                           torch.randint(0, 3, (b,), generator=gen)) for b in (3, 4)])
    return out


MODELS = _models()


def _spy(monkeypatch):
    hits = []
    orig = NT.NegThetaMode.__exit__

    def spy(self, *a):
        hits.append(self.marginal_hits)
        return orig(self, *a)

    monkeypatch.setattr(NT.NegThetaMode, "__exit__", spy)
    return hits


@pytest.mark.parametrize("criterion", ["oba", "oba-network", "oba-gn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_marginal_group_scores_equal_the_per_parameter_route(name, criterion, monkeypatch):
    model, cal = MODELS[name]
    graph = oba_fx.trace(model, cal[0][0])
    assert graph.prunable_groups
    hits = _spy(monkeypatch)
    fast = oba_fx.group_scores(graph, cal, criterion, progress=False)
    assert hits and min(hits) > 0, "the marginal route was not taken"
    hits.clear()
    plain = oba_fx.group_scores(graph, cal, criterion, progress=False, marginals=False)
    assert hits and max(hits) == 0
    assert fast.keys() == plain.keys()
    # relative to the largest score of any group (ReLU networks' Fδ is round-off, about 1e-19, on both routes)
    scale = max(float(v.abs().max()) for v in oba_fx.group_scores(graph, cal, "oba", progress=False).values())
    for gid in plain:
        assert float((fast[gid] - plain[gid]).abs().max()) <= 1e-12 * scale, (gid, fast[gid], plain[gid])


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1 << 18, 5])
def test_marginal_group_scores_match_the_dense_hessian(chunk, monkeypatch):
    """Channel scores Σ_slices (g δ + ½ δ (Hδ)) with g, H from a dense float64 Hessian (also with the row and
    column sums taken in chunks of a few elements, as large activations are)."""
    monkeypatch.setattr(NT, "_DOT_CHUNK", chunk)
    model, cal = MODELS["grouped"]
    graph = oba_fx.trace(model, cal[0][0])
    fast = oba_fx.group_scores(graph, cal, "oba", progress=False)
    gm = graph.gm
    fl, g, H, _, _ = dense(gm, cal, third=False)
    trainable = torch.cat([torch.full((p.numel(),), float(p.requires_grad), dtype=torch.float64)
                           for _, p in gm.named_parameters()])
    delta = -fl.theta * trainable  # frozen parameters do not move
    per = fl.unflat(g * delta + 0.5 * delta * (H @ delta))
    ref = {gr.id: S._reduce_to_channels(gr, {n: v for n, v in per.items()
                                             if dict(gm.named_parameters())[n].requires_grad})
           for gr in graph.prunable_groups}
    for gid in ref:
        assert rel(fast[gid], ref[gid]) <= 1e-8, (gid, fast[gid], ref[gid])


def test_in_place_op_on_a_kept_output_is_recomputed(monkeypatch):
    """The leaky_relu(inplace=True) on c1's biased output changes what the marginal layer kept; the backward sees the
    version bump and recomputes (a mutation that skips the check fails the equality above)."""
    model, cal = MODELS["grouped"]
    graph = oba_fx.trace(model, cal[0][0])
    seen = []
    orig = NT._MarginalLayer.backward

    def spy(ctx, g):
        (y, yt), versions = ctx.meta[0].kept[ctx.slot]
        seen.append(y._version != versions[0])
        return orig(ctx, g)

    monkeypatch.setattr(NT._MarginalLayer, "backward", staticmethod(spy))
    oba_fx.group_scores(graph, cal, "oba", progress=False)
    assert any(seen), "no kept output was modified in place: the recompute branch is untested"


def test_marginals_argument_is_checked():
    model, cal = MODELS["relu_mlp"]
    with pytest.raises(ValueError, match="marginals"):
        C.curvature(model, cal, want=("g", "H"), marginals={"fc1.bias": (0,)}, progress=False)
    with pytest.raises(ValueError, match="marginals"):
        C.curvature(model, cal, want=("g", "H"), marginals={"fc1.weight": (2,)}, progress=False)


def test_curvature_marginals_equal_reduced_full_products():
    """Every routed weight's dim-0 and dim-1 marginals (the grouped conv's column sums fold its groups) against
    the full products of the ordinary route, summed along the other dims."""
    model, cal = MODELS["grouped"]
    weights = {n: (0, 1) for n, p in model.named_parameters() if p.ndim >= 2 and p.requires_grad}
    got = C.curvature(model, cal, want=("g", "H", "F"), marginals=weights, progress=False)
    ref = C.curvature(model, cal, want=("g", "H", "F"), progress=False)
    named = dict(model.named_parameters())
    assert set(got.marginals["H"]) == set(weights), set(weights) ^ set(got.marginals["H"])
    for q in "gHF":
        for n, dims in weights.items():
            delta = -named[n].detach()
            full = getattr(ref, q)[n] * delta
            rest = getattr(got, q).get(n)
            for d in dims:
                other = [k for k in range(full.ndim) if k != d]
                want = full.sum(other)
                have = got.marginals[q][n][d] + ((rest * delta).sum(other) if rest is not None else 0)
                assert rel(have, want) <= 1e-12, (q, n, d)
