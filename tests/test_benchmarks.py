"""Every benchmark script runs in a seconds-long smoke mode, so the scripts cannot rot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["fidelity.py", "accuracy.py", "cost.py", "speedup.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, tmp_path):
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OBA_FX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, script, "--smoke"], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "smoke ok" in r.stdout
    after = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    assert after == before, "a smoke run must not overwrite recorded results"


def test_report_renders_every_result(tmp_path):
    """BENCHMARKS.md is generated from the JSON: every result file gets its table."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for p in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        d = json.loads(p.read_text())
        assert d["benchmark"] in mod.RENDERERS, p
        text = "\n".join(mod.RENDERERS[d["benchmark"]](d))
        assert "Machine:" in text and "|" in text


def _report_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_defaults_follow_the_recorded_data():
    """oba_fx.compress's default criterion and normalisation are the ones the accuracy table supports."""
    import inspect
    import json

    import oba_fx

    acc = json.loads((ROOT / "benchmarks" / "results" / "accuracy.json").read_text())
    rec = _report_module().recommend(acc)
    sig = inspect.signature(oba_fx.compress).parameters
    assert rec, "accuracy.json has no complete column"
    assert oba_fx.DEFAULT_CRITERION == rec["criterion"] == sig["criterion"].default, rec
    assert oba_fx.DEFAULT_NORMALIZE == rec.get("normalize", "none") == sig["normalize"].default, rec
    from oba_fx.cli import build_parser

    assert build_parser().parse_args(["compress", "x.pt", "--out", "o"]).criterion == rec["criterion"]
    assert build_parser().parse_args(["demo"]).criterion == "oba"  # the demo shows the paper's criterion


def test_recommend_rule():
    """The rule itself on a made-up table: complete columns only, mean accuracy, normalisation variants."""
    def row(model, crit, t, a):
        return {"dataset": "d", "model": model, "criterion": crit, "mode": "one-shot", "target_flops": t,
                "accuracy_mean": a}

    rows = [row("m", "oba", 0.5, 0.90), row("m", "taylor", 0.5, 0.80), row("m", "random", 0.5, 0.99),
            row("m", "oba", 0.3, 0.70), row("m", "taylor", 0.3, 0.85),
            row("n", "oba", 0.5, 0.10),  # incomplete column: ignored
            row("m", "oba:mean", 0.5, 0.95), row("m", "oba:max", 0.5, 0.91)]
    rec = _report_module().recommend({"rows": rows})
    assert rec["criterion"] == "taylor" and rec["criterion_columns"] == 2
    assert rec["normalize"] == "mean" and rec["normalize_base"] == "oba"
