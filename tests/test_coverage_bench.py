"""benchmarks/coverage.py: the sweep's harness (one subprocess per model, every failure a one-line reason), its
independent FLOPs count, and the report sections it feeds (coverage, the speed-up flag)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _bench(name):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared `common` module
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def _one_line(text):
    return isinstance(text, str) and text.strip() and "\n" not in text


@pytest.mark.slow
@pytest.mark.onnx
def test_smoke_sweep_records_every_stage_and_survives_a_crash(tmp_path):
    """Two workers at once: squeezenet1_1 with oba passes every stage with every field filled; the magnitude
    worker kills itself (SIGSEGV) when the FLOPs check starts, and its row keeps the stages it finished and
    names the crash in one line. Recorded results are not touched, and the report renders the section."""
    before = {p: p.stat().st_mtime_ns for p in RESULTS.glob("*.json")}
    out = tmp_path / "coverage.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "coverage.py", "--smoke", "--models", "squeezenet1_1", "--jobs", "2",
                        "--out", str(out), "--inject-crash", "squeezenet1_1:magnitude:flops"],
                       cwd=ROOT / "benchmarks", capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "smoke ok" in r.stdout
    assert {p: p.stat().st_mtime_ns for p in RESULTS.glob("*.json")} == before, "smoke overwrote results"
    d = json.loads(out.read_text())
    assert d["benchmark"] == "coverage" and d["machine"]["cores"] and "--smoke" in d["commands"][-1]
    rows = {row["criterion"]: row for row in d["rows"]}
    assert set(rows) == {"oba", "magnitude"}

    ok = rows["oba"]
    assert ok["status"] == "pass" and ok["reason"] is None and ok["exit_code"] == 0, ok
    assert ok["input_shape"] == [2, 3, 32, 32] and ok["params"] > 0 and ok["peak_rss_mb"] > 0
    st = ok["stages"]
    assert list(st) == ["build", "trace", "compress", "flops", "reload", "onnx"]
    assert all(s["ok"] and s["seconds"] >= 0 for s in st.values())
    assert 0 < st["trace"]["prunable_groups"] <= st["trace"]["groups"]
    fl = st["flops"]
    assert fl["device"] == "meta" and fl["slim"] < fl["original"]
    assert fl["ratio"] == pytest.approx(fl["slim"] / fl["original"]) and abs(fl["ratio"] - 0.5) <= 0.02
    assert 0 < st["compress"]["reported_flops_ratio"] <= 1 and fl["params_slim"] < fl["params_original"]
    assert st["reload"]["max_abs_diff"] == 0.0
    assert 0 <= st["onnx"]["max_rel_error"] <= 1e-4

    bad = rows["magnitude"]
    assert bad["status"] == "fail" and bad["failed_stage"] == "flops" and bad["exit_code"] == -11
    assert _one_line(bad["reason"]) and bad["reason"].startswith("crashed (exit -11, SIGSEGV) in stage flops")
    assert bad["stages"]["compress"]["ok"] and bad["stages"]["trace"]["ok"]  # finished stages are kept
    assert "reload" not in bad["stages"]

    report = _bench("report")
    assert report.RENDERERS["coverage"] is report.coverage and "coverage" in report.ORDER
    text = "\n".join(report.coverage(d))
    # the denominator is the whole smoke list: mobilenet_v3_small was not run
    assert "**torchvision classification**: 0/2 with magnitude (1 not yet run), 1/2 with oba (1 not yet run)" \
        in text, text
    assert "Torch-Pruning reports 77 of 85" in text and "here 1 of 2 torchvision" in text and \
        "pass with `oba` (1 not yet run)" in text
    assert "| torchvision | squeezenet1_1 | oba | 32² |" in text and "| ✗ flops |" in text
    assert f"- torchvision `squeezenet1_1` (magnitude): {bad['reason']}" in text


def test_timeout_is_recorded_with_the_running_stage(tmp_path):
    cov = _bench("coverage")
    row = cov.run_job(("torchvision", "squeezenet1_1", "classification", "oba"), timeout=4, threads=1,
                      giants="meta", workdir=str(tmp_path), inject_hang="squeezenet1_1:trace")
    assert row["status"] == "fail" and _one_line(row["reason"])
    # on a busy machine the worker may still be importing when the 4 s are up
    assert row["reason"] in ("timeout after 4 s in stage trace", "timeout after 4 s in stage build",
                             "timeout after 4 s before the first stage"), row["reason"]
    assert row["exit_code"] == -9 and 4 <= row["wall_seconds"] < 60


def test_crash_reason_names_the_signal_oom_and_last_error_line():
    cov = _bench("coverage")
    assert cov.crash_reason(-9, False, 900, "compress", "") == "killed (exit -9, out of memory?) in stage compress"
    assert cov.crash_reason(1, False, 900, None, "Traceback\n  x\nValueError: bad\nUserWarning: w\n") == \
        "crashed (exit 1) before the first stage: ValueError: bad"


def test_rows_merge_by_suite_model_and_criterion():
    cov = _bench("coverage")
    old = [{"suite": "timm", "model": "a", "criterion": "oba", "status": "fail"},
           {"suite": "timm", "model": "a", "criterion": "magnitude", "status": "pass"},
           {"suite": "torchvision", "model": "a", "criterion": "oba", "status": "pass"}]
    new = [{"suite": "timm", "model": "a", "criterion": "oba", "status": "pass"}]
    got = cov.merge_rows(old, new)
    assert [(r["suite"], r["criterion"], r["status"]) for r in got] == [
        ("timm", "magnitude", "pass"), ("torchvision", "oba", "pass"), ("timm", "oba", "pass")]


def test_compare_two_sweeps(tmp_path):
    """Status or mode changes are listed; a pass that no longer passes (or vanished) is a regression."""
    cov = _bench("coverage")

    def row(model, status, mode="full", crit="oba"):
        return {"suite": "timm", "model": model, "criterion": crit, "status": status, "mode": mode,
                "failed_stage": None if status == "pass" else "onnx", "reason": None if status == "pass" else "1e-3"}

    old = [row("a", "pass"), row("b", "fail"), row("c", "pass"), row("d", "pass"), row("e", "pass", crit="magnitude")]
    new = [row("a", "pass"), row("b", "pass"), row("c", "pass", mode="meta"), row("e", "fail", crit="magnitude")]
    lines, regressed = cov.compare(old, new)
    assert regressed and lines == ["timm b oba: fail (full) -> pass (full)", "timm c oba: pass (full) -> pass (meta)",
                                   "REGRESSED timm d oba: pass (full) -> missing",
                                   "REGRESSED timm e magnitude: pass (full) -> fail (full) - onnx: 1e-3"]
    assert cov.compare(old, old) == ([], False)
    assert cov.compare(old[1:2], new[1:2]) == (["timm b oba: fail (full) -> pass (full)"], False)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"rows": old}))
    b.write_text(json.dumps({"rows": new}))
    assert cov.main(["--compare", str(a), str(b)]) == 1 and cov.main(["--compare", str(a), str(a)]) == 0


def test_unknown_model_and_criterion_are_refused(tmp_path):
    cov = _bench("coverage")
    with pytest.raises(SystemExit, match=r"unknown model\(s\) \['nope'\]"):
        cov.main(["--smoke", "--models", "nope", "--out", str(tmp_path / "c.json")])
    with pytest.raises(SystemExit, match="unknown criteria.*choose from"):
        cov.main(["--smoke", "--criteria", "bogus", "--out", str(tmp_path / "c.json")])
    with pytest.raises(SystemExit, match="never writes benchmarks/results"):
        cov.main(["--smoke", "--out", str(RESULTS / "coverage.json")])


class _Attn(nn.Module):
    """conv, linear, nn.MultiheadAttention (fast-path eligible: eval, batch_first), SDPA, and a matmul with a
    plain tensor attribute (as torch.fx stores constants)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)
        self.const = torch.randn(5, 6)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        t = self.mha(t, t, t, need_weights=False)[0]
        q = t.reshape(t.shape[0], 16, 2, 4).transpose(1, 2)  # (B, 2 heads, 16, 4)
        t = F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(t.shape[0], 16, 8)
        return self.fc(t) @ self.const


def test_meta_flops_matches_a_hand_count_and_leaves_the_model_alone():
    cov = _bench("coverage")
    model = _Attn().eval()
    const = model.const
    B, L, E, H, D = 2, 16, 8, 2, 4
    hand = (2 * B * L * 8 * 3 * 9  # conv 3->8, 3x3, 4x4 output
            + 2 * B * L * E * 3 * E  # MHA in-projection
            + 2 * 2 * B * H * L * L * D  # MHA q k^T and attn v
            + 2 * B * L * E * E  # MHA out-projection
            + 2 * 2 * B * H * L * L * D  # SDPA
            + 2 * B * L * E * 5  # fc
            + 2 * B * L * 5 * 6)  # @ const
    x = torch.randn(B, 3, 4, 4)
    assert cov.meta_flops(model, (x,)) == hand
    assert cov.meta_flops(model, (x,), "cpu") == hand  # the fast path is off on real tensors too
    assert model.const is const and const.device.type == "cpu" and not model.training
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.backends.mha.get_fastpath_enabled()


def test_meta_flops_leaves_a_shared_module_and_tied_weights_in_place():
    """A module reached under two names (CoaT's shared position encodings) and weights tied across modules
    keep their own Parameters after the count (functional_call's restore left meta tensors in the first)."""
    cov = _bench("coverage")
    sys.path.insert(0, str(Path(__file__).parent))
    from test_shared_modules import SharedPE, TiedAcross

    for model, x, hand in [
        (SharedPE().eval(), torch.randn(2, 3, 6, 6),
         2 * 2 * 36 * (8 * 3 * 9 + 2 * (8 * 9 + 8 * 8)) + 2 * 2 * 8 * 10),
        (TiedAcross().eval(), torch.randn(2, 6), 2 * 2 * 3 * 36),
    ]:
        before = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
        ref = model(x).detach()
        assert cov.meta_flops(model, (x,)) == hand
        after = [(n, p) for n, p in model.named_parameters(remove_duplicate=False)]
        assert [n for n, _ in after] == [n for n, _ in before]
        assert all(p is q and p.device.type == "cpu" for (_, p), (_, q) in zip(after, before))
        assert torch.equal(model(x), ref)
    lstm = nn.LSTM(8, 16, batch_first=True)
    xs = torch.randn(2, 5, 8)
    ref = lstm(xs)[0].detach()
    assert cov.meta_flops(lstm, (xs,)) == 2 * 2 * 5 * 4 * 16 * (8 + 16)  # 4 gates, input and hidden matmuls
    assert torch.equal(lstm(xs)[0], ref)


def test_timm_list_covers_the_issue_families():
    timm = pytest.importorskip("timm")
    cov = _bench("coverage")
    assert len(cov.TIMM_MODELS) >= 64 and not set(cov.TIMM_MODELS) - set(timm.list_models())
    families = set(cov.TIMM_MODELS.values())
    for want in ["ResNet-D", "SE-ResNet", "ResNeSt", "Res2Net", "RegNetX", "EfficientNet", "EfficientNet-lite",
                 "EfficientNetV2", "MobileNetV3", "MobileNetV4", "GhostNet", "RepVGG", "RepViT", "FastViT",
                 "ConvNeXt", "ConvNeXt-V2", "DLA", "HRNet", "CSPNet", "DPN", "Xception", "NFNet", "ViT", "DeiT",
                 "DeiT3", "BEiT", "EVA-02", "CaiT", "Swin", "Swin-V2", "Twins", "PVT-v2", "PiT", "CoaT", "LeViT",
                 "MobileViT", "MobileViT-V2", "EfficientFormer", "EfficientViT (MIT)", "EdgeNeXt", "XCiT",
                 "MaxViT", "CoAtNet", "DaViT", "GCViT", "FocalNet", "TinyViT", "PoolFormer", "MLP-Mixer",
                 "ResMLP", "Sequencer"]:
        assert want in families, want


def test_speedup_rows_faster_than_their_flops_reduction_are_flagged():
    report = _bench("report")

    def row(variant, ratio, speedup):
        return {"model": "m", "variant": variant, "flops_ratio": ratio, "params_ratio": ratio, "backend": "pytorch",
                "batch": 1, "median_ms": 10 / speedup, "speedup": speedup, "speedup_vs_flops": speedup * ratio}

    d = {"description": "x", "machine": {}, "command": "c",
         "rows": [row("original", 1.0, 1.0), row("50%", 0.5, 1.9), row("30%", 0.3, 3.5)]}
    text = "\n".join(report.speedup(d))
    assert "| m | 30% | 30.0% | 30.0% | pytorch | 1 | 2.86 | 3.50× | 1.05 investigate: faster than its FLOPs " \
           "reduction |" in text
    assert "| 50% | 50.0% | 50.0% | pytorch | 1 | 5.26 | 1.90× | 0.95 |" in text
    assert "| original | 100.0% | 100.0% | pytorch | 1 | 10.00 | 1.00× | 1.00 |" in text
    assert "(1 row): m 30% pytorch batch 1: 3.50× vs a FLOPs reduction of 3.33×" in text
    d["rows"] = d["rows"][:2]
    assert "investigate" not in "\n".join(report.speedup(d))


def test_models_too_large_for_the_machine_run_on_meta_or_are_skipped(tmp_path, monkeypatch):
    """With no RAM to spare, a model is traced, cut to 50% FLOPs and rewritten on the meta device (the row says
    so and is not a pass), or skipped with the memory figures as its reason."""
    cov = _bench("coverage")
    monkeypatch.setattr(cov, "_memory_bytes", lambda: 0)
    path = tmp_path / "row.json"
    cov.worker("torchvision", "squeezenet1_1", "classification", "oba", str(path), "meta", None, None)
    row = json.loads(path.read_text())
    assert row["mode"] == "meta" and row["status"] == "fail" and _one_line(row["reason"])
    assert row["reason"].startswith("meta mode (too large for this machine: 1M parameters need about")
    st = row["stages"]
    assert st["trace"]["ok"] and st["trace"]["device"] == "meta" and st["trace"]["prunable_groups"] > 0
    assert st["flops"]["ok"] and abs(st["flops"]["ratio"] - 0.5) <= 0.02 and st["flops"]["device"] == "meta"
    assert not st["compress"]["ok"] and "reload" not in st and "onnx" not in st
    assert "| meta only |" in "\n".join(_bench("report").coverage(
        {"description": "x", "machine": {}, "settings": {"target_flops": 0.5, "tolerance": 0.02, "onnx_rtol": 1e-4},
         "model_lists": {"torchvision classification": ["squeezenet1_1"]}, "rows": [row]}))
    cov.worker("torchvision", "squeezenet1_1", "classification", "oba", str(path), "skip", None, None)
    row = json.loads(path.read_text())
    assert row["status"] == "skipped" and row["reason"].startswith("build: too large for this machine")


def test_zero_initialised_weights_are_redrawn_so_comparisons_mean_something():
    """torchvision's ViT starts its head at zero: every output would be 0 and reload/ONNX checks vacuous."""
    cov = _bench("coverage")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    kept = model[0].weight.clone()
    assert not model(torch.randn(5, 4)).any()
    assert cov.redraw_zero_weights(model) == ["2.weight"]
    assert model[2].weight.all() and torch.equal(model[0].weight, kept) and not model[2].bias.any()
    assert model(torch.randn(5, 4)).any()
