"""Training flags are per module: nothing oba_fx runs on a model may flatten them to the root's flag.

A model that trains with one BatchNorm frozen (``net.train(); net.bn.eval()``) and a live dropout must come out
of every call with the same flags, and the slim model must take them module by module.
"""
from __future__ import annotations

import doctest

import pytest

import torch
import torch.nn as nn

import oba_fx
import oba_fx.passes.modes
from test_widths import Net, _data


def _partly_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(Net(), nn.Dropout(0.5)).train()
    net[0].b1.eval()
    return net


def _flags(model):
    return {name: m.training for name, m in model.named_modules()}


def test_doctest():
    assert doctest.testmod(oba_fx.passes.modes).failed == 0


@pytest.mark.onnx
def test_scoring_evaluation_export_keep_each_modules_flag(tmp_path):
    net = _partly_frozen()
    want = _flags(net)
    assert want["0.b1"] is False and want[""] is True
    x = torch.randn(2, 3, 12, 12)
    oba_fx.parameter_scores(net, _data(), "oba", progress=False)
    assert _flags(net) == want
    oba_fx.evaluate(net, _data())
    assert _flags(net) == want
    oba_fx.export_onnx(net, x, tmp_path / "m.onnx")
    assert _flags(net) == want
    oba_fx.measure_latency({"m": net}, (3, 12, 12), batch_sizes=(1,), repeats=1, warmup=0, onnx=False,
                           progress=False)
    assert _flags(net) == want


def test_compress_gives_the_slim_model_the_originals_flags_module_by_module():
    net = _partly_frozen()
    want = _flags(net)
    x = torch.randn(2, 3, 12, 12)
    for target in (0.6, 1.0):  # a real cut, and a target met without one (the re-traced copy)
        res = oba_fx.compress(net, x, _data(), target_flops=target, criterion="oba", progress=False)
        assert _flags(net) == want
        slim = _flags(res.model)
        assert slim["0.b1"] is False and slim[""] is True, slim
        assert all(slim[n] == want[n] for n in slim if n in want)
