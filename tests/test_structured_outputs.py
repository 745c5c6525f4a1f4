"""Issue 15, defects 7 and 9: model outputs that are not one tensor, and losses other than cross-entropy.

A model returning ``{"a": t1, "b": t2}`` (or a tuple) is scored with a loss
that couples both outputs; g, Hδ, Gδ, Fδ and ∇³L[δ,δ] are checked against a
dense float64 reference that flattens the outputs into one vector, so the
Gauss-Newton part uses the loss Hessian over the whole output structure.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacfwd

import oba_fx
from dense_reference import Flat, _jacobian_loop, full_data
from oba_fx.passes.curvature import CalibrationError, curvature


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


class TwoHeads(nn.Module):
    """A shared trunk and two heads, returned as a dict, a tuple, or a nested dict holding a tuple."""

    def __init__(self, kind="dict"):
        super().__init__()
        self.kind = kind
        self.fc1 = nn.Linear(5, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head_a = nn.Linear(8, 3)
        self.head_b = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.tanh(self.fc2(torch.tanh(self.fc1(x))))
        a, b = self.head_a(h), self.head_b(h)
        if self.kind == "dict":
            return {"a": a, "b": b}
        if self.kind == "tuple":
            return a, b
        return {"logits": a, "extra": (b, None)}


def _parts(out):
    if isinstance(out, dict) and "a" in out:
        return out["a"], out["b"]
    if isinstance(out, dict):
        return out["logits"], out["extra"][0]
    return out


def coupled_loss(out, y):
    """Cross-entropy on head a, a quadratic on head b and a product of both: ∇²ℓ has off-diagonal blocks."""
    a, b = _parts(out)
    return F.cross_entropy(a, y) + 0.3 * (b**2).mean() + 0.2 * (a[:, :2] * torch.sin(b[:, :2])).mean()


def _make(kind="dict", seed=0):
    torch.manual_seed(seed)
    model = TwoHeads(kind).double().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    cal = [(torch.randn(b, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (b,), generator=gen))
           for b in (4, 3)]
    return model, cal


def dense_structured(model, cal, loss):
    """g, H, G (the output Hessian over both heads, concatenated), third-derivative tensor T."""
    fl = Flat(model)
    x, y = full_data(cal)

    def heads(v):
        return _parts(functional_call(model, fl.unflat(v), (x,)))

    a0, b0 = (t.detach() for t in heads(fl.theta))

    def flat_out(v):
        a, b = heads(v)
        return torch.cat([a.reshape(-1), b.reshape(-1)])

    def loss_of_flat(o):
        a, b = o[: a0.numel()].reshape(a0.shape), o[a0.numel():].reshape(b0.shape)
        return loss({"a": a, "b": b}, y)

    def L(v):
        return loss_of_flat(flat_out(v))

    g = torch.func.grad(L)(fl.theta)
    H = _jacobian_loop(lambda v: torch.autograd.grad(L(v), v, create_graph=True)[0], fl.theta)
    J = _jacobian_loop(flat_out, fl.theta)
    o = flat_out(fl.theta).detach()
    Hl = _jacobian_loop(lambda u: torch.autograd.grad(loss_of_flat(u), u, create_graph=True)[0], o)
    T = jacfwd(jacfwd(torch.func.grad(L)))(fl.theta)
    return fl, g, H, J.T @ Hl @ J, T


@pytest.mark.parametrize("kind", ["dict", "tuple", "nested"])
def test_products_match_dense(kind):
    model, cal = _make(kind)
    fl, g, H, G, T = dense_structured(model, cal, coupled_loss)
    d = -fl.theta
    Hd, Gd, T3 = H @ d, G @ d, torch.einsum("ijk,j,k->i", T, d, d)
    assert rel(Gd, Hd) > 1e-3  # the network-curvature part is not negligible: F is tested too
    paths = [{"backend": "fwad"}, {"backend": "double-backward"}, {"checkpoint": 2}]
    for kw in paths:
        r = curvature(model, cal, want=("g", "H", "G", "F"), loss_fn=coupled_loss, progress=False, **kw)
        assert rel(fl.flat(r.g), g) <= 1e-8, kw
        assert rel(fl.flat(r.H), Hd) <= 1e-8, kw
        assert rel(fl.flat(r.G), Gd) <= 1e-8, kw
        assert rel(fl.flat(r.F), Hd - Gd) <= 1e-8, kw
        for want in (("g",), ("g", "G"), ("F",)):  # the other cotangent plans
            r1 = curvature(model, cal, want=want, loss_fn=coupled_loss, progress=False, **kw)
            for q in want:
                assert torch.allclose(fl.flat(getattr(r1, q)), fl.flat(getattr(r, q)), rtol=1e-10, atol=1e-14)
    r3 = curvature(model, cal, want=("g", "H", "T3"), loss_fn=coupled_loss, progress=False)
    assert rel(fl.flat(r3.T3), T3) <= 1e-8
    crit = {"oba": g * d + 0.5 * d * Hd, "oba-gn": g * d + 0.5 * d * Gd, "oba-network": g * d + 0.5 * d * (Hd - Gd),
            "oba-k3": g * d + 0.5 * d * Hd + d * T3 / 6, "taylor": (g * d).abs(), "magnitude": d**2}
    for c, want in crit.items():
        s = oba_fx.parameter_scores(model, cal, c, loss_fn=coupled_loss, progress=False)
        assert rel(fl.flat(s), want) <= 1e-8, c


def test_fisher_obd_random_and_group_exact_on_dict_output():
    model, cal = _make("dict")
    fl, g, H, _, _ = dense_structured(model, cal, coupled_loss)
    d = -fl.theta
    x, y = full_data(cal)
    fisher = torch.zeros_like(fl.theta)
    for i in range(len(y)):
        gi = torch.func.grad(lambda v: coupled_loss(functional_call(model, fl.unflat(v), (x[i:i + 1],)),
                                                    y[i:i + 1]))(fl.theta)
        fisher += gi**2
    s = oba_fx.parameter_scores(model, cal, "obd-fisher", loss_fn=coupled_loss, progress=False)
    assert rel(fl.flat(s), 0.5 * fisher / len(y) * d**2) <= 1e-8
    s = oba_fx.parameter_scores(model, cal, "obd", loss_fn=coupled_loss, probes=300, progress=False)
    assert rel(fl.flat(s), 0.5 * H.diag() * d**2) <= 0.3
    s = oba_fx.parameter_scores(model, cal, "random", loss_fn=coupled_loss, progress=False)
    assert all(((v >= 0) & (v < 1)).all() for v in s.values())
    graph = oba_fx.trace(model, cal[0][0])
    assert graph.prunable_groups
    scores = oba_fx.group_scores(graph, cal, "group-exact", loss_fn=coupled_loss, method="vmap", progress=False)
    params = dict(graph.gm.named_parameters())
    for grp in graph.prunable_groups:
        want = []
        for c in range(grp.size):
            masks = {n: torch.zeros_like(p) for n, p in params.items()}
            for m in grp.members:
                if m.name in masks:
                    masks[m.name].index_fill_(m.dim, m.index[m.channel == c], 1.0)
            dc = fl.flat(masks) * d
            want.append((g @ dc + 0.5 * dc @ H @ dc).item())
        assert torch.allclose(scores[grp.id], torch.tensor(want, dtype=torch.float64), rtol=1e-8, atol=1e-12)
    # unstructured pruning scores the same way
    res = oba_fx.compress_unstructured(model, cal, sparsity=0.5, loss_fn=coupled_loss, include_last=True,
                                       progress=False)
    ws = [m.weight for m in res.model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((w == 0).sum()) for w in ws)
    assert zeros == round(0.5 * sum(w.numel() for w in ws))


def test_default_loss_on_structured_output_says_pass_loss_fn():
    model, cal = _make("dict")
    snap = copy.deepcopy(model.state_dict())
    for crit in ("oba", "taylor", "obd-fisher", "oba-k3"):
        with pytest.raises(CalibrationError, match=r"returned a dict.*loss_fn=lambda out, y: F.cross_entropy\(out\['a'\], y\)"):
            oba_fx.parameter_scores(model, cal, crit, progress=False)
    graph = oba_fx.trace(model, cal[0][0])
    with pytest.raises(CalibrationError, match="loss_fn="):
        oba_fx.group_scores(graph, cal, "group-exact", progress=False)
    tmodel, _ = _make("tuple")
    with pytest.raises(CalibrationError, match=r"returned a tuple.*out\[0\]"):
        oba_fx.parameter_scores(tmodel, cal, "oba", progress=False)
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


def test_group_exact_with_mse_loss():
    """Defect 9: mse_loss's double backward updated the targets' ZeroTensor tangent in place."""
    model, cal = _make("tuple")
    gen = torch.Generator().manual_seed(7)
    cal = [(x, torch.randn(x.shape[0], 3, generator=gen, dtype=torch.float64)) for x, _ in cal]

    def mse(out, y):
        return F.mse_loss(out[0], y)

    fl = Flat(model)
    x, y = full_data(cal)
    L = lambda v: mse(functional_call(model, fl.unflat(v), (x,)), y)  # noqa: E731
    g = torch.func.grad(L)(fl.theta)
    H = _jacobian_loop(lambda v: torch.autograd.grad(L(v), v, create_graph=True)[0], fl.theta)
    graph = oba_fx.trace(model, cal[0][0])
    params = dict(graph.gm.named_parameters())
    for method in ("vmap", "probes"):
        scores, _ = oba_fx.group_exact_scores(graph, cal, mse, method=method, probes=400, progress=False)
        for grp in graph.prunable_groups:
            want = []
            for c in range(grp.size):
                masks = {n: torch.zeros_like(p) for n, p in params.items()}
                for m in grp.members:
                    if m.name in masks:
                        masks[m.name].index_fill_(m.dim, m.index[m.channel == c], 1.0)
                dc = fl.flat(masks) * -fl.theta
                want.append((g @ dc + 0.5 * dc @ H @ dc).item())
            want = torch.tensor(want, dtype=torch.float64)
            if method == "vmap":
                assert torch.allclose(scores[grp.id], want, rtol=1e-8, atol=1e-12)
            else:  # an unbiased estimate: only close
                assert rel(scores[grp.id], want) <= 0.5
    # and with a plain tensor output, as the issue reports it
    single = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    g1 = oba_fx.trace(single, cal[0][0])
    s = oba_fx.group_scores(g1, cal, "group-exact", loss_fn=F.mse_loss, progress=False)
    assert all(torch.isfinite(v).all() for v in s.values())


def _ort_outputs(path, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in sess.get_outputs()], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})


@pytest.mark.onnx
@pytest.mark.parametrize("dynamo", [False, True])
def test_onnx_export_names_structured_outputs(tmp_path, dynamo):
    torch.manual_seed(0)
    x = torch.randn(2, 5)
    for kind, names in (("dict", ["a", "b"]), ("tuple", ["output_0", "output_1"])):
        model = TwoHeads(kind).eval()
        path = oba_fx.export_onnx(model, x, tmp_path / f"{kind}.onnx", dynamo=dynamo)
        got_names, got = _ort_outputs(path, x)
        assert got_names == names
        ref = model(x)
        ref = [ref[k] for k in names] if kind == "dict" else list(ref)
        for g, r in zip(got, ref):
            np.testing.assert_allclose(g, r.detach().numpy(), rtol=1e-5, atol=1e-6)
    nested = {"logits": torch.zeros(1), "extra": (torch.zeros(1), torch.zeros(1))}
    assert oba_fx.export.output_names(nested)[0] == ["logits", "extra.0", "extra.1"]
    with pytest.raises(TypeError, match="'extra.1' is a NoneType"):
        oba_fx.export_onnx(TwoHeads("nested").eval(), x, tmp_path / "n.onnx", dynamo=dynamo)
    assert not (tmp_path / "n.onnx").exists()


@pytest.mark.onnx
def test_onnx_export_torchvision_segmentation(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(num_classes=3, weights=None,
                                                                      weights_backbone=None).eval()
    x = torch.randn(1, 3, 64, 64)
    path = oba_fx.export_onnx(model, x, tmp_path / "seg.onnx", dynamo=False)
    names, got = _ort_outputs(path, x)
    assert names == ["out"]
    ref = model(x)["out"].detach().numpy()
    assert got[0].shape == (1, 3, 64, 64)
    assert np.abs(got[0] - ref).max() <= 1e-4 * np.abs(ref).max()
