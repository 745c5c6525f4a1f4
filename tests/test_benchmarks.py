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
