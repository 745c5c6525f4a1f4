"""Issue 7: activation checkpointing during scoring gives the same scores."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models_zoo
import oba_fx
from dense_reference import dense
from oba_fx.passes.checkpoint import RecomputeError, SegmentedGraph
from oba_fx.passes.curvature import curvature
from tiny_models import TINY, make


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


class InplaceResidual(nn.Module):
    """In-place updates of values that cross segment cuts (``out += identity``, ``relu_``)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        z = self.bn2(self.conv2(y))
        z += y
        z = self.relu(z)
        return self.fc(F.gelu(z).mean((2, 3)))


class SplitGate(nn.Module):
    """A differentiable tuple (chunk) unpacked by getitem: no cut may fall between them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(4, 3)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, dim=1)
        return self.fc2(a * torch.tanh(b))


def _split_model():
    torch.manual_seed(5)
    gen = torch.Generator().manual_seed(6)
    cal = [(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))]
    return SplitGate().double().eval(), cal


def _inplace_model():
    torch.manual_seed(3)
    from helpers import randomize_norms

    model = randomize_norms(InplaceResidual()).double().eval()
    gen = torch.Generator().manual_seed(4)
    cal = [(torch.randn(b, 2, 5, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (4, 3)]
    return model, cal


def _segment_counts(model):
    sg = SegmentedGraph(model, [n for n, _ in model.named_parameters()], 1)
    n = len(sg.chunks[0])
    return [True, 1, 2, 3, n, 10 * n]  # n: every operation is its own segment, every value crosses a cut


@pytest.mark.parametrize("name", TINY + ["inplace_residual", "split_gate"])
def test_checkpointed_products_equal_plain_and_dense(name):
    model, cal = {"inplace_residual": _inplace_model, "split_gate": _split_model}.get(name, lambda: make(name))()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = curvature(model, cal, want=("g", "H", "G", "F"), progress=False)
    fl, g, H, G, _ = dense(model, cal, third=False)
    d = -fl.theta
    for segments in _segment_counts(model):
        r = curvature(model, cal, want=("g", "H", "G", "F"), progress=False, checkpoint=segments)
        for q in "gHGF":
            for n in plain.names:
                a, b = getattr(r, q)[n], getattr(plain, q)[n]
                assert rel(a, b) <= 1e-12, (segments, q, n)
        assert rel(d * fl.flat(r.H), d * (H @ d)) <= 1e-8
        assert rel(d * fl.flat(r.G), d * (G @ d)) <= 1e-8
        g_only = curvature(model, cal, want=("g",), progress=False, checkpoint=segments)
        assert rel(fl.flat(g_only.g), g) <= 1e-10
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_recomputation_really_happens():
    """With checkpointing each layer runs twice per batch (forward, then recomputed in the backward)."""
    model, cal = make("residual_cnn")
    calls = []
    h = model.conv1.register_forward_hook(lambda *a: calls.append(1))
    try:
        curvature(model, cal[:1], want=("g", "H"), progress=False)
        plain = len(calls)
        calls.clear()
        curvature(model, cal[:1], want=("g", "H"), progress=False, checkpoint=True)
        assert plain == 1 and len(calls) == 2
    finally:
        h.remove()
    sg = SegmentedGraph(model, [n for n, _ in model.named_parameters()], True)
    assert len(sg.chunks) >= 2 and max(len(c) for c in sg.crossing) <= 3


@pytest.fixture
def recomputes(monkeypatch):
    """Counts segmented backward passes, so a test fails if checkpoint= is dropped on the way down."""
    import oba_fx.passes.checkpoint as C

    calls = []
    orig = C.SegmentedGraph.backward

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(C.SegmentedGraph, "backward", spy)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("criterion", ["oba", "oba-network", "oba-gn", "taylor", "obd"])
def test_scores_and_compress_unchanged(criterion, recomputes):
    torch.manual_seed(0)
    model = models_zoo.create("resnet20", in_channels=1).eval()
    gen = torch.Generator().manual_seed(0)
    cal = [(torch.randn(6, 1, 28, 28, generator=gen), torch.randint(0, 10, (6,), generator=gen)) for _ in range(2)]
    graph = oba_fx.trace(model, cal[0][0][:2])
    a = oba_fx.group_scores(graph, cal, criterion, probes=2, progress=False)
    assert not recomputes
    b = oba_fx.group_scores(graph, cal, criterion, probes=2, progress=False, checkpoint=True)
    assert recomputes
    for gid in a:
        # float32: without checkpoint= the oba criteria take the row/column-marginal route, with it the
        # per-parameter one; both sum the same products in a different order (each is 1e-6 of the group's largest
        # score from float64, measured), so the tolerance is relative to that largest score
        assert torch.allclose(a[gid], b[gid], rtol=1e-5, atol=1e-5 * float(b[gid].abs().max())), gid
    if criterion == "oba":
        r1 = oba_fx.compress(model, cal[0][0][:2], cal, target_flops=0.6, criterion="oba", progress=False)
        recomputes.clear()
        r2 = oba_fx.compress(model, cal[0][0][:2], cal, target_flops=0.6, criterion="oba", progress=False,
                             checkpoint=True, micro_batch=4)
        assert recomputes  # compress passed checkpoint= on
        assert r1.report["step_reports"][0]["removed_channels"] == r2.report["step_reports"][0]["removed_channels"]
        x = cal[1][0]
        assert torch.equal(r1.model(x), r2.model(x))


def test_vit_and_unstructured(recomputes):
    torch.manual_seed(0)
    model = models_zoo.create("vit_small", in_channels=1, img_size=28).double().eval()
    gen = torch.Generator().manual_seed(0)
    cal = [(torch.randn(3, 1, 28, 28, generator=gen, dtype=torch.float64), torch.randint(0, 10, (3,), generator=gen))]
    a = oba_fx.parameter_scores(model, cal, "oba", progress=False)
    b = oba_fx.parameter_scores(model, cal, "oba", progress=False, checkpoint=5)
    assert max(rel(b[n], a[n]) for n in a) <= 1e-12
    m2, cal2 = make("cnn_bn")
    u1 = oba_fx.compress_unstructured(m2, cal2, sparsity=0.5, progress=False)
    recomputes.clear()
    u2 = oba_fx.compress_unstructured(m2, cal2, sparsity=0.5, progress=False, checkpoint=True)
    assert recomputes
    for (n, b1), (_, b2) in zip(u1.model.named_buffers(), u2.model.named_buffers()):
        assert torch.equal(b1, b2), n


def test_clear_errors():
    model, cal = make("relu_mlp")
    with pytest.raises(RecomputeError, match="third-order.*micro_batch"):
        oba_fx.parameter_scores(model, cal, "oba-k3", progress=False, checkpoint=True)
    with pytest.raises(RecomputeError, match="positive number of segments"):
        curvature(model, cal, progress=False, checkpoint=-2)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return -self.fc(x)

    m = Untraceable().double()
    with pytest.raises(RecomputeError, match="fx-traceable.*micro_batch"):
        curvature(m, cal, progress=False, checkpoint=True)


def test_multihead_attention_module():
    """nn.MultiheadAttention's fused no-grad fast path has no forward AD; checkpointing must avoid it."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, 8)
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.layer(self.embed(x)).mean(1))

    torch.manual_seed(0)
    model = Net().double().eval()
    gen = torch.Generator().manual_seed(1)
    cal = [(torch.randn(4, 3, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen))]
    a = curvature(model, cal, want=("g", "H"), progress=False)
    b = curvature(model, cal, want=("g", "H"), progress=False, checkpoint=True)
    assert b.backend == "forward-over-reverse"
    assert max(rel(b.H[n], a.H[n]) for n in a.names) <= 1e-12
    assert torch.backends.mha.get_fastpath_enabled()
