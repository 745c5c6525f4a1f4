"""Hessian block structure: predicted zero blocks of F are numerically zero, and vice versa.

Every tiny float64 model is traced, analysed, and checked against a reference
``F·v = H·v - G·v`` computed with torch.func over the whole calibration set.
"""
from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

import oba_fx
from helpers import randomize_norms
from oba_fx.passes.block_rules import BLOCK_RULES, INPUTS, gelu_rule
from oba_fx.passes.hessian_blocks import HessianBlocks, check_blocks, hessian_blocks
from oba_fx.passes.trace import trace_module

ZERO_TOL = 1e-10
NONZERO_TOL = 1e-8


# ---------------------------------------------------------------------------
# models


class MLP(nn.Module):
    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.fc1, self.act1 = nn.Linear(6, 8), act()
        self.fc2, self.act2 = nn.Linear(8, 8), act()
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ResCNN(nn.Module):
    """Stem conv-bn-relu, then a residual block conv-bn-relu, conv-bn, + skip, relu, pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0 = nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        s = F.relu(self.bn0(self.conv0(x)))
        y = F.relu(self.bn1(self.conv1(s)))
        y = F.relu(self.bn2(self.conv2(y)) + s)
        return self.fc(torch.flatten(self.pool(y), 1))


class Attention(nn.Module):
    """embed, LayerNorm, separate q/k/v, softmax(q kᵀ) v, proj, residual, mean, head."""

    def __init__(self, d=8):
        super().__init__()
        self.d = d
        self.embed = nn.Linear(5, d)
        self.ln = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (B, N, 5)
        x = self.embed(x)
        h = self.ln(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        a = (q @ k.transpose(-2, -1) / math.sqrt(self.d)).softmax(-1)
        x = x + self.proj(a @ v)
        return self.head(x.mean(1))


class TinyViT(nn.Module):
    """cls token and position embedding (get_attr layers), fused qkv + SDPA, layer scale, GELU MLP."""

    def __init__(self, d=8, heads=2, n=3):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.patch = nn.Linear(4, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, d) * 0.5)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)
        self.ln2 = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (B, n, 4)
        b = x.size(0)
        x = self.patch(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embed
        t = x.shape[1]
        qkv = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, self.dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, self.h * self.dh)
        x = x + self.gamma * self.proj(a)
        x = x + self.fc2(self.act(self.fc1(self.ln2(x))))
        return self.head(x[:, 0])


class MHABlock(nn.Module):
    """nn.MultiheadAttention as a leaf module."""

    def __init__(self, d=8):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.embed(x)
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return self.head(x.mean(1))


@torch.fx.wrap
def mystery(x):
    """An op the analysis has no rule for (it is smooth: tanh)."""
    return torch.tanh(x) * 1.5


class OddOps(nn.Module):
    """Product of branches, division by a tensor, an unknown op, a dead and a detached layer."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(6, 8)
        self.f = nn.Linear(6, 8)
        self.dead = nn.Linear(6, 8)
        self.frozen = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        p = self.a(x) * self.b(x)  # parallel (a, b); linear in a and in b separately
        q = p / (1.5 + self.c(x).abs())  # (c, c) smooth; (a, c), (b, c) products
        s = mystery(self.f(x))  # unknown: conservative (f, f)
        _ = self.dead(x)  # never reaches the output
        g = self.frozen(x).detach()  # detached: no derivative
        return self.out(q + s * g)


class FunctionalOps(nn.Module):
    """Functional layers on get_attr weights, einsum, addmm, PReLU, hardswish, an in-place add, detach."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6) * 0.4)
        self.u = nn.Parameter(torch.randn(8, 8) * 0.4)
        self.bn_w = nn.Parameter(torch.rand(8) + 0.5)
        self.register_buffer("rm", torch.randn(8) * 0.1)
        self.register_buffer("rv", torch.rand(8) + 0.5)
        self.l1, self.l2, self.l3 = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(6, 8)
        self.prelu, self.hs = nn.PReLU(8), nn.Hardswish()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = F.linear(x, self.w)  # series with everything downstream
        h = F.batch_norm(h, self.rm, self.rv, self.bn_w, None, False)  # eval statistics: (w, bn_w) series
        g = torch.einsum("bi,ij->bj", self.l1(x), self.u)  # (l1, u) series
        g = torch.addmm(h, g, self.l2.weight.t())  # l2 is read as a tensor: layer "l2.weight"
        r = self.prelu(g)  # linear in its slope
        acc = torch.zeros_like(g)
        acc.add_(self.l1(x))  # in-place: acc depends on l1
        k = self.hs(self.l3(x)) ** 1  # hardswish is piecewise quadratic: (l3, l3); ** 1 is linear
        q = r + 0.5 * k + 0.1 * torch.tanh(acc)  # (l1, l1) smooth through the in-place alias
        return self.out(q / (h.detach().abs() + 1.0))  # division by a constant


MODELS = {
    "relu_mlp": (lambda: MLP(nn.ReLU), (6,)),
    "gelu_mlp": (lambda: MLP(nn.GELU), (6,)),
    "res_cnn": (ResCNN, (2, 5, 5)),
    "attention": (Attention, (3, 5)),
    "vit": (TinyViT, (3, 4)),
    "mha": (MHABlock, (3, 5)),
    "odd": (OddOps, (6,)),
    "functional": (FunctionalOps, (6,)),
}


def make(name: str, seed: int = 0, models=MODELS):
    """(float64 eval model, calibration: 2 batches of (x, integer class y))."""
    torch.manual_seed(seed)
    ctor, shape = models[name]
    model = randomize_norms(ctor(), seed).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    cal = [
        (torch.randn(b, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
        for b in (4, 4)
    ]
    return model, cal


# ---------------------------------------------------------------------------
# reference F·v = H·v - G·v with torch.func


def ref_fvp(model, calibration, v):
    """Network-curvature product of the mean cross-entropy over all calibration samples."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x = torch.cat([a for a, _ in calibration])
    y = torch.cat([b for _, b in calibration])

    def f(p):
        return functional_call(model, (p, buffers), (x,))

    def loss(p):
        return F.cross_entropy(f(p), y)

    # the fused CPU attention kernels (SDPA flash, MHA fast path) have no forward-mode AD
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            _, hv = jvp(grad(loss), (params,), (v,))
            out, jv = jvp(f, (params,), (v,))
            s = out.softmax(-1)
            hl_jv = (s * jv - s * (s * jv).sum(-1, keepdim=True)) / out.shape[0]  # ∇²ℓ (mean CE) · Jv
            _, pull = vjp(f, params)
            (gv,) = pull(hl_jv)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return {n: hv[n] - gv[n] for n in params}


_CACHE: dict[str, tuple] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one torch thread avoids OpenMP oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def analysed(name: str):
    """(model, calibration, blocks, {(l, m): ‖F_lm v‖}) for one model, computed once."""
    if name not in _CACHE:
        model, cal = make(name)
        blocks = hessian_blocks(trace_module(model, cal[0][0]))
        norms = check_blocks(blocks, model, cal, ref_fvp, probes=2, seed=0)
        _CACHE[name] = (model, cal, blocks, norms)
    return _CACHE[name]


# ---------------------------------------------------------------------------
# numerical agreement


@pytest.mark.parametrize("name", list(MODELS))
def test_prediction_matches_numerics(name):
    _, _, blocks, norms = analysed(name)
    assert set(norms) == {(l, m) for l in blocks.layers for m in blocks.layers}
    bad_zero = {k: v for k, v in norms.items() if blocks.zero(*k) and not v < ZERO_TOL}
    bad_nonzero = {k: v for k, v in norms.items() if not blocks.zero(*k) and not v > NONZERO_TOL}
    assert not bad_zero, f"predicted zero but ‖F_lm v‖ large: {bad_zero}"
    assert not bad_nonzero, f"predicted non-zero but ‖F_lm v‖ tiny: {bad_nonzero}"


@pytest.mark.parametrize("name", list(MODELS))
def test_symmetry_and_gauss_newton(name):
    _, _, blocks, _ = analysed(name)
    for l in blocks.layers:
        for m in blocks.layers:
            assert blocks.zero(l, m) == blocks.zero(m, l)
            assert blocks.reason(l, m) == blocks.reason(m, l)
            assert (blocks.reason(l, m) == "") == blocks.zero(l, m)
            assert blocks.gauss_newton_nonzero(l, m) == (blocks.reaches_output(l) and blocks.reaches_output(m))
            if not blocks.zero(l, m):  # curvature only flows where the output depends on both layers
                assert blocks.gauss_newton_nonzero(l, m)
    order = {l: i for i, l in enumerate(blocks.layers)}
    for l, m, reason in blocks.pairs():
        assert order[l] <= order[m] and reason == blocks.reason(l, m) and reason


# ---------------------------------------------------------------------------
# expected structure


def test_relu_mlp_structure():
    _, _, b, _ = analysed("relu_mlp")
    assert b.layers == ["fc1", "fc2", "fc3"]
    assert all(b.zero(l, l) for l in b.layers)
    for l, m in [("fc1", "fc2"), ("fc1", "fc3"), ("fc2", "fc3")]:
        assert b.reason(l, m) == "series"
    c = b.counts()
    assert (c["zero"], c["nonzero"], c["series"]) == (3, 3, 3)


def test_gelu_mlp_structure():
    _, _, b, _ = analysed("gelu_mlp")
    assert b.reason("fc1", "fc1") == "smooth" and b.reason("fc2", "fc2") == "smooth"
    assert b.zero("fc3", "fc3")  # after the last GELU
    assert b.reason("fc1", "fc2") == "series, smooth"
    assert b.reason("fc2", "fc3") == "series"


def test_res_cnn_structure():
    _, _, b, _ = analysed("res_cnn")
    assert b.layers == ["conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "fc"]
    assert all(b.zero(l, l) for l in b.layers)  # BN in eval mode is linear in its input
    assert all(b.reason(l, m) == "series" for l, m, _ in b.pairs())
    assert b.counts()["nonzero"] == 21  # every pair of distinct layers (all in series)
    assert b.params("bn1") == ["bn1.weight", "bn1.bias"]


def test_attention_structure():
    _, _, b, _ = analysed("attention")
    assert "parallel" in b.reasons("q", "k")
    assert "parallel" in b.reasons("q", "v") and "parallel" in b.reasons("k", "v")
    assert b.reason("q", "q") == "smooth" and b.reason("k", "k") == "smooth"
    assert b.zero("v", "v") and b.zero("proj", "proj") and b.zero("head", "head")
    assert b.reason("embed", "embed") == "parallel, smooth"
    assert b.reason("v", "proj") == "series"
    assert ("matmul", "parallel") in b.where("q", "k")


def test_vit_structure():
    _, _, b, _ = analysed("vit")
    assert b.layers[:3] == ["patch", "cls_token", "pos_embed"]
    assert b.params("cls_token") == ["cls_token"]
    assert "parallel" in b.reasons("qkv", "qkv")  # q and k come from the same layer
    assert "series" in b.reasons("proj", "gamma")  # x * param
    assert b.zero("fc2", "fc2") and b.zero("head", "head") and b.zero("gamma", "gamma") is False
    assert "smooth" in b.reasons("cls_token", "pos_embed")


def test_mha_structure():
    _, _, b, _ = analysed("mha")
    assert b.layers == ["embed", "ln", "attn", "head"]
    assert b.params("attn") == ["attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                "attn.out_proj.bias"]
    for l in ("embed", "ln", "attn"):
        for m in ("embed", "ln", "attn"):
            assert not b.zero(l, m)
    assert b.reason("attn", "attn") == "parallel, series, smooth"
    assert b.zero("head", "head")


def test_odd_ops_structure():
    _, _, b, _ = analysed("odd")
    assert b.reason("a", "b") == "parallel"
    assert b.zero("a", "a") and b.zero("b", "b")
    assert b.reason("c", "c") == "smooth"
    assert b.reason("f", "f") == f"unknown op {__name__}.mystery (conservative)"
    assert b.category("f", "f") == "unknown"
    assert any("mystery" in w for w in b.warnings)
    for dead in ("dead", "frozen"):
        assert not b.reaches_output(dead)
        assert all(b.zero(dead, m) and not b.gauss_newton_nonzero(dead, m) for m in b.layers)
    assert b.zero("f", "a")


def test_functional_ops_structure():
    _, _, b, _ = analysed("functional")
    assert b.layers == ["w", "bn_w", "l1", "u", "l2.weight", "prelu", "l3", "out"]
    smooth_diag = {"l1", "l3"}
    for l in b.layers:
        assert b.zero(l, l) == (l not in smooth_diag), l
    assert b.reason("w", "bn_w") == "series" and b.reason("l1", "u") == "series"
    assert b.reason("u", "l2.weight") == "series" and b.reason("w", "prelu") == "series"
    assert b.zero("w", "l1") and b.zero("w", "l2.weight")  # branches meet by addition only
    assert all(b.zero("l3", m) for m in b.layers if m not in ("l3", "out"))
    assert not b.warnings


# ---------------------------------------------------------------------------
# API and outputs


def test_accepts_public_graph():
    model, cal = make("relu_mlp")
    graph = oba_fx.trace(model, cal[0][0])
    b = hessian_blocks(graph)
    assert isinstance(b, HessianBlocks) and b.layers == ["fc1", "fc2", "fc3"]
    with pytest.raises(TypeError):
        hessian_blocks(model)
    with pytest.raises(KeyError, match="not a layer"):
        b.zero("fc1", "nope")


def test_outputs(tmp_path):
    _, _, b, _ = analysed("attention")
    c = b.counts()
    text = b.to_text()
    assert f"{c['zero']} zero" in text and f"{c['nonzero']} non-zero" in text and "q" in text
    assert (c["layers"], c["pairs"]) == (7, 28) and c["zero"] + c["nonzero"] == 28
    assert "more" in b.to_text(max_rows=2)

    d = json.loads(json.dumps(b.to_dict()))
    assert [x["name"] for x in d["layers"]] == b.layers and len(d["blocks"]) == c["nonzero"]

    g = b.to_networkx()
    assert set(g.nodes) == set(b.layers) and g.number_of_edges() == c["nonzero"]
    assert g.has_edge("q", "q") and g.edges["q", "k"]["reason"] == b.reason("q", "k")

    b.write_graphml(tmp_path / "blocks.graphml")
    back = nx.read_graphml(tmp_path / "blocks.graphml")
    assert back.number_of_edges() == c["nonzero"]

    b.write_dot(tmp_path / "blocks.dot")
    dot = (tmp_path / "blocks.dot").read_text()
    assert dot.startswith("graph hessian_blocks {") and '"q" -- "k"' in dot and dot.rstrip().endswith("}")

    png = tmp_path / "sub" / "blocks.png"
    b.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["blocks.png"]  # no temp file left


def test_check_blocks_is_agnostic():
    """The checker only calls fvp; a fake F (identity on fc2) shows the bookkeeping."""
    model, cal = make("relu_mlp")
    b = hessian_blocks(trace_module(model, cal[0][0]))
    calls = []

    def fake(model, calibration, v):
        calls.append(sorted(n for n, t in v.items() if t.abs().sum() > 0))
        return {n: (t if n.startswith("fc2.") else torch.zeros_like(t)) for n, t in v.items() if n != "fc3.bias"}

    norms = check_blocks(b, model, cal, fake, probes=3, seed=1)
    assert len(calls) == 9 and calls[0] == ["fc1.bias", "fc1.weight"]
    assert norms[("fc2", "fc2")] > 0 and norms[("fc1", "fc2")] == 0 and norms[("fc2", "fc1")] == 0
    assert norms[("fc3", "fc3")] == 0  # fc3.weight present, fc3.bias left out by fvp


@pytest.mark.parametrize("name", ["relu_mlp", "gelu_mlp", "res_cnn", "attention"])
def test_prediction_matches_production_engine(name):
    """The same check with oba_fx's own curvature engine (forward-over-reverse Fv) as the probe."""
    from oba_fx.passes.curvature import curvature

    model, cal, blocks, _ = analysed(name)

    def engine_fvp(m, c, v):
        return curvature(m, c, want=("F",), direction=v, params=list(v), progress=False).F

    norms = check_blocks(blocks, model, cal, engine_fvp, probes=1, seed=1)
    for (l, m), v in norms.items():
        if blocks.zero(l, m):
            assert v < ZERO_TOL, (l, m, v)
        else:
            assert v > NONZERO_TOL, (l, m, v)


# ---------------------------------------------------------------------------
# extending the analysis: a rule registered through the public registry


@torch.fx.wrap
def gated(a, b):
    """An op the analysis has no rule for: bilinear in (a, b), linear in a and in b separately."""
    return a * b + 2.0 * a


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(gated(self.a(x), self.b(x)))


def test_gelu_rule_is_registered_like_a_user_rule():
    assert nn.GELU in BLOCK_RULES and "gelu" in BLOCK_RULES
    assert BLOCK_RULES.module_rule(nn.GELU) is gelu_rule
    assert BLOCK_RULES.module_rule(type("MyGELU", (nn.GELU,), {})) is gelu_rule  # subclasses too


def test_registered_rule_changes_the_analysis():
    """Without a rule ``gated`` is conservatively smooth; a registered product rule gives the exact pattern."""
    model, cal = make("gated", models={"gated": (Gated, (6,))})
    traced = trace_module(model, cal[0][0])
    before = hessian_blocks(traced)
    unknown = f"unknown op {__name__}.gated (conservative)"
    assert before.reason("a", "a") == before.reason("b", "b") == before.reason("a", "b") == unknown
    assert any("gated" in w for w in before.warnings)

    @BLOCK_RULES.register(gated)
    def gated_rule(ctx, node):
        a, b = node.args
        ctx.product(node, a, b)  # both operands depend on the input: "parallel"
        return INPUTS

    try:
        after = hessian_blocks(traced)
    finally:
        assert BLOCK_RULES.unregister(gated) is gated_rule
    assert after.reason("a", "b") == "parallel"
    assert after.zero("a", "a") and after.zero("b", "b") and after.zero("out", "out")
    assert after.reason("a", "out") == after.reason("b", "out") == "series"
    assert not after.warnings
    norms = check_blocks(after, model, cal, ref_fvp, probes=2, seed=0)  # against the dense F·v
    for (l, m), v in norms.items():
        assert (v < ZERO_TOL) if after.zero(l, m) else (v > NONZERO_TOL), (l, m, v)
    assert hessian_blocks(traced).reason("a", "b") == unknown  # unregistered: back to the conservative answer
