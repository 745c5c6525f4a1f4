"""Tests for the models_zoo package: shapes, fx traceability, sizes, registry."""
from __future__ import annotations

import operator

import pytest
import torch
import torch.fx
import torch.nn as nn

import models_zoo

ZOO_NAMES = ["resnet20", "resnet32", "resnet56", "vgg19_bn", "vgg_small", "vit_small"]
CONFIGS = [(1, 28), (3, 32)]  # (in_channels, image size): Fashion-MNIST and CIFAR

# Measured parameter counts (3-channel input, 10 classes) are
# resnet20 272,474  resnet32 466,906  resnet56 855,770 (option-A paper counts
# 0.27M / 0.46M / 0.85M plus 2,752 for the two 1x1 projection shortcuts),
# vgg19_bn 20,035,018, vgg_small 288,746 and vit_small 2,693,578.
PARAM_RANGES = {
    "resnet20": (0.26e6, 0.29e6),
    "resnet32": (0.45e6, 0.48e6),
    "resnet56": (0.84e6, 0.87e6),
    "vgg19_bn": (19.5e6, 20.5e6),
    "vgg_small": (0.28e6, 0.30e6),
    "vit_small": (2.6e6, 2.8e6),
}


def _build(name: str, in_channels: int, size: int, **kw) -> nn.Module:
    if name == "vit_small":
        kw.setdefault("img_size", size)
    torch.manual_seed(0)
    return models_zoo.create(name, in_channels=in_channels, num_classes=10, **kw).eval()


def _num_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("in_channels,size", CONFIGS, ids=[f"{c}x{s}" for c, s in CONFIGS])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_trace_and_size(name, in_channels, size):
    model = _build(name, in_channels, size)
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        y = model(x)
        gm = torch.fx.symbolic_trace(model)
        y_fx = gm(x)
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y_fx, y, rtol=1e-5, atol=1e-5)
    lo, hi = PARAM_RANGES[name]
    assert lo <= _num_params(model) <= hi, f"{name}: {_num_params(model)} params"


def test_resnet_uses_projection_shortcuts():
    model = models_zoo.create("resnet20")
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    for stage in (model.layer2, model.layer3):
        sc = stage[0].shortcut
        assert isinstance(sc, nn.Sequential)
        assert isinstance(sc[0], nn.Conv2d) and sc[0].kernel_size == (1, 1) and sc[0].stride == (2, 2)
        assert isinstance(sc[1], nn.BatchNorm2d)
    assert len(model.layer1) == 3
    assert len(models_zoo.create("resnet56").layer3) == 9


def test_vit_manual_attention_uses_literal_head_sizes():
    """Head counts/widths must be python literals in the fx graph, not C // heads."""
    gm = torch.fx.symbolic_trace(models_zoo.create("vit_small"))
    reshapes = [n for n in gm.graph.nodes if n.op == "call_method" and n.target == "reshape"]
    assert len(reshapes) == 2 * 6
    for n in reshapes:
        literal = [a for a in n.args[1:] if isinstance(a, int)]
        assert literal in ([3, 3, 64], [192]), n.format_node()
    assert not any(n.target in (operator.floordiv, operator.truediv) for n in gm.graph.nodes)


def test_vit_torch_attention():
    model = _build("vit_small", 3, 32, attention="torch")
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    lo, hi = PARAM_RANGES["vit_small"]
    assert lo <= _num_params(model) <= hi
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
        y_fx = torch.fx.symbolic_trace(model)(x)
    assert y.shape == (2, 10)
    torch.testing.assert_close(y_fx, y, rtol=1e-5, atol=1e-5)


def test_vit_rejects_bad_args():
    with pytest.raises(ValueError, match="divisible"):
        models_zoo.create("vit_small", img_size=30)
    with pytest.raises(ValueError, match="attention"):
        models_zoo.create("vit_small", attention="flash")


def test_names():
    names = models_zoo.names()
    assert names[: len(ZOO_NAMES)] == ZOO_NAMES
    for tv in ("resnet18", "mobilenet_v2", "vit_b_16"):
        assert tv in names
    assert len(names) == len(set(names))


def test_create_torchvision_model():
    model = models_zoo.create("resnet18", num_classes=10).eval()
    assert type(model).__module__.startswith("torchvision.models")
    with torch.no_grad():
        y = model(torch.randn(1, 3, 32, 32))
    assert y.shape == (1, 10)
    models_zoo.create("resnet18", weights=None)  # explicit None is fine


def test_unknown_name():
    with pytest.raises(ValueError) as err:
        models_zoo.create("resnet2O")
    msg = str(err.value)
    assert "'resnet2O'" in msg
    assert "resnet20" in msg  # close match suggested
    assert "models_zoo.names()" in msg


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
@pytest.mark.parametrize("kw", [{"weights": "DEFAULT"}, {"weights": "IMAGENET1K_V1"}, {"pretrained": True}])
def test_weights_rejected(name, kw):
    with pytest.raises(ValueError, match="pretrained weights cannot be downloaded"):
        models_zoo.create(name, **kw)
