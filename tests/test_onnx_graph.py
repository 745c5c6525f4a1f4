"""The slim model's ONNX graph keeps onnxruntime's fusions: the same ops as the original's, nothing added.

Pruning only narrows tensors, so an exported slim model should be the original's ONNX graph with smaller
initializers: the same op histogram (BatchNormalization folded into Conv where the original's is, no stray
Reshape / Cast / Shape chains), and after onnxruntime's own graph optimizations the same fused ops
(FusedConv for Conv + activation). Read from the ONNX files themselves, not from oba_fx's bookkeeping.
"""
from __future__ import annotations

import collections
import warnings

import pytest
import torch

import models_zoo
import oba_fx

pytestmark = pytest.mark.onnx  # every test here exports to ONNX and runs onnxruntime

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CASES = {
    "resnet20": dict(kw={"in_channels": 1}, shape=(1, 28, 28), fused_conv=True),  # Conv + Relu
    "mobilenet_v2": dict(kw={}, shape=(3, 64, 64), fused_conv=True),  # Conv + Clip (ReLU6)
    "vit_small": dict(kw={"in_channels": 1, "img_size": 28}, shape=(1, 28, 28)),
}


def _ops(path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def _ort_ops(path, tmp_path, tag) -> collections.Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / f"{tag}.ort.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _ops(so.optimized_model_filepath)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_slim_onnx_has_the_original_ops_and_fusions(name, tmp_path):
    spec = CASES[name]
    torch.manual_seed(0)
    model = models_zoo.create(name, **spec["kw"]).eval()
    x = torch.randn(4, *spec["shape"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = oba_fx.compress(model, x[:2], [(x, torch.randint(0, 10, (4,)))], target_flops=0.5, progress=False,
                              compensate=False, reestimate_bn=False)
    assert res.report["flops"]["ratio"] <= 0.5
    paths = {}
    for tag, m in (("original", model), ("slim", res.model)):
        paths[tag] = tmp_path / f"{tag}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oba_fx.export_onnx(m, x[:1], paths[tag])
    a, b = _ops(paths["original"]), _ops(paths["slim"])
    assert b == a, f"the slim graph's ops differ: extra {dict(b - a)}, missing {dict(a - b)}"
    assert "Cast" not in b
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()):
        assert "BatchNormalization" not in b, "batch norm left unfolded"
    fa, fb = _ort_ops(paths["original"], tmp_path, "original"), _ort_ops(paths["slim"], tmp_path, "slim")
    assert fb == fa, f"onnxruntime fuses the slim graph differently: {dict(fb - fa)} vs {dict(fa - fb)}"
    if spec.get("fused_conv"):
        assert fb["FusedConv"] > 0, "onnxruntime fused no Conv with its activation"
