"""Issue 2 acceptance: every prunable group prunes, rewrites are exact, errors are clear."""
from __future__ import annotations

import pytest
import torch
import torchvision

import models_zoo
import oba_fx
from helpers import random_removal, randomize_norms, same_state, state_snapshot, zero_consumers

# (name, constructor kwargs, input shape)
ZOO = {
    "resnet32": ({"in_channels": 3}, (2, 3, 32, 32)),
    "vgg19_bn": ({"in_channels": 3}, (2, 3, 32, 32)),
    "vit_small": ({"in_channels": 3, "img_size": 32}, (2, 3, 32, 32)),
}
TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "regnet_x_400mf", "efficientnet_b0",
               "convnext_tiny", "vit_b_16"]


def build(name: str):
    torch.manual_seed(0)
    if name in ZOO:
        kw, shape = ZOO[name]
        model = models_zoo.create(name, **kw)
    else:
        model, shape = models_zoo.create(name), (1, 3, 224, 224)
    randomize_norms(model)
    return model.eval(), torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ZOO) + TORCHVISION)
def test_every_prunable_group_prunes(name):
    model, x = build(name)
    snap = state_snapshot(model)
    graph = oba_fx.trace(model, x)
    assert graph.prunable_groups, f"{name}: no prunable groups"
    removal = random_removal(graph, 0.3)
    assert set(removal) == {g.id for g in graph.prunable_groups if int(0.3 * g.size) > 0}
    slim = graph.prune(removal)
    with torch.no_grad():
        y0, y1 = model(x), slim(x)
    assert y1.shape == y0.shape
    assert torch.isfinite(y1).all()
    f0, p0 = oba_fx.count(model, x)
    f1, p1 = oba_fx.count(slim, x)
    assert p1 < p0 and f1 < f0, f"{name}: params {p0}->{p1}, flops {f0}->{f1}"
    # every member tensor shrank by exactly the removed positions
    params = dict(slim.named_parameters()) | dict(slim.named_buffers())
    orig = dict(graph.gm.named_parameters()) | dict(graph.gm.named_buffers())
    for gid in removal:
        for m in graph.group(gid).members:
            assert params[m.name].shape[m.dim] < orig[m.name].shape[m.dim], m
    assert same_state(model, snap), "the user's model changed"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet32", "vgg19_bn", "resnet18", "mobilenet_v2", "densenet121"])
def test_rewrite_is_exact(name):
    """Slimmed output == original with the removed channels' consumer weights zeroed."""
    model, x = build(name)
    graph = oba_fx.trace(model, x)
    removal = random_removal(graph, 0.3, seed=3)
    slim = graph.prune(removal)
    ref = zero_consumers(graph, removal)
    with torch.no_grad():
        y_ref, y = ref(x), slim(x)
        y_orig = model(x)
    rel = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
    assert rel <= 1e-5, f"{name}: relative max diff {rel:.2e}"
    # and the removal mattered: the zeroed reference differs from the original
    assert not torch.allclose(y_ref, y_orig, rtol=1e-4, atol=1e-6)


def test_unpruned_groups_keep_function_vit_small():
    """Removing only MLP hidden channels of vit_small equals zeroing their consumer columns."""
    model, x = build("vit_small")
    graph = oba_fx.trace(model, x)
    mlp = [g for g in graph.prunable_groups if any(m.role == "consumer" and "fc2" in m.name or "mlp" in m.name
                                                    for m in g.members) and g.size > 192]
    assert mlp, graph.summary()
    removal = {g.id: list(range(0, g.size, 3)) for g in mlp}
    slim = graph.prune(removal)
    ref = zero_consumers(graph, removal)
    with torch.no_grad():
        rel = ((slim(x) - ref(x)).abs().max() / ref(x).abs().max()).item()
    assert rel <= 1e-5
