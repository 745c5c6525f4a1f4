"""Every benchmark script runs in a seconds-long smoke mode, so the scripts cannot rot."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["fidelity.py", "accuracy.py", "cost.py", "cost.py --interleaved", "speedup.py", "widths.py",
           "latency_target.py", "eager_breakdown.py", "pytorch_modes.py", "equivalence.py"]  # fidelity --oneshot: see below


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke(script, tmp_path):
    _smoke(script.split(), tmp_path)


def _smoke(args, tmp_path):
    """Run a script's smoke mode; it must succeed and leave the recorded results untouched."""
    results = ROOT / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    env = dict(os.environ, PYTHONPATH=str(ROOT), OBA_FX_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *args, "--smoke"], cwd=ROOT / "benchmarks", capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "smoke ok" in r.stdout
    after = {p: p.stat().st_mtime_ns for p in results.glob("*.json")} if results.exists() else {}
    assert after == before, "a smoke run must not overwrite recorded results"
    return r.stdout


@pytest.mark.slow
def test_fidelity_oneshot_smoke_in_one_process_and_per_seed_processes(tmp_path):
    """``--jobs 2`` runs the seeds in two worker processes and gives the rows one process gives, in order."""
    rows, workers = [], []
    for jobs in ("1", "2"):
        out = _smoke(["fidelity.py", "--oneshot", "--jobs", jobs], tmp_path)
        lines = out.splitlines()
        (line,) = [ln for ln in lines if ln.startswith("smoke rows ")]
        rows.append(json.loads(line[len("smoke rows "):]))
        (line,) = [ln for ln in lines if ln.startswith("smoke worker processes ")]
        workers.append(int(line.split()[-1]))
    assert workers == [0, 2]
    assert len(rows[0]) == 4 and [r[0] for r in rows[0]] == [0, 0, 1, 1]  # 2 criteria x 1 target x 2 seeds
    assert rows[0] == rows[1]


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


def _bench_module(name):
    import importlib.util

    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their shared `common` module
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def _report_module():
    return _bench_module("report")


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
    # the after-rewrite options follow the one-shot rows of the fidelity benchmark
    fid = json.loads((ROOT / "benchmarks" / "results" / "fidelity.json").read_text())
    post = _report_module().recommend_post(fid, rec["criterion"])
    assert set(post) == {"reestimate_bn", "compensate"}, "fidelity.json has no one-shot rows for the default"
    cli = build_parser().parse_args(["compress", "x.pt", "--out", "o"])
    for opt, r in post.items():
        assert sig[opt].default is r["on"] and getattr(cli, opt) is r["on"], (opt, r)


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
    # a second regime with a criterion run only there, and a compensated variant: neither is a candidate,
    # and the complete columns of both regimes still count
    full = [dict(row("m", c, 0.5, a), mode="full-budget") for c, a in
            (("oba", 0.93), ("taylor", 0.90), ("oba-joint", 0.99), ("oba+compensate", 0.99))]
    rec = _report_module().recommend({"rows": rows + full})
    assert rec["criterion_columns"] == 3 and set(rec["criterion_mean_accuracy"]) == {"oba", "taylor"}
    assert rec["criterion"] == "taylor"  # (0.80 + 0.85 + 0.90) / 3 > (0.90 + 0.70 + 0.93) / 3


def test_seed_dominated_columns_are_paired():
    """A column where every criterion moves with the seed is flagged and shown paired by seed; one where the
    criteria differ more than the seeds is not."""
    def run(crit, seed, a, model="m"):
        return {"dataset": "d", "model": model, "criterion": crit, "mode": "one-shot", "target_flops": 0.5,
                "seed": seed, "accuracy": a}

    runs = [run("oba", 0, 0.60), run("oba", 1, 0.80), run("taylor", 0, 0.62), run("taylor", 1, 0.84),
            run("random", 0, 0.10), run("random", 1, 0.95),  # random is left out
            run("oba", 0, 0.60, "n"), run("oba", 1, 0.61, "n"), run("taylor", 0, 0.90, "n"),
            run("taylor", 1, 0.91, "n")]
    lines = _report_module()._seed_dominated({"runs": runs})
    assert len(lines) == 1 and lines[0].startswith("- **m one-shot 50%: the seed dominates**")
    # paired: taylor is 1.5 points above its seed's mean on average, oba 1.5 below
    assert "taylor +1.5" in lines[0] and "oba -1.5" in lines[0]


def test_noise_level_fidelity_models_reported_apart():
    def model(name, frac, rho):
        rows = [{"criterion": c, "spearman_heldout": rho + d, "spearman_calibration": 0.0}
                for c, d in (("oba", 0.0), ("group-exact", 0.2), ("magnitude", 0.1), ("taylor", 0.05))]
        return {"model": name, "single": {"channels": 10, "rows": rows, "base_loss_heldout": 0.5,
                                          "true_delta_heldout": {"mean": 1e-5, "max": 1e-3, "frac_negative": frac}}}

    fid = {"models": [model("clear", 0.1, 0.4), model("noisy", 0.45, -0.5)]}
    text = "\n".join(_report_module().findings({"fidelity": fid}))
    assert "(clear; mean held-out Spearman" in text and "group-exact +0.60" in text
    assert "**noisy: single-channel ΔL is at the noise level**" in text and "45% of single removals" in text


def test_cost_table_marks_notes_and_judges_each_model():
    """Rows from runs with different notes get different footnote marks, and the 2.5× target is judged per
    model (met on one model and missed on another is not reported as met)."""
    def row(m, c, t, note):
        return {"model": m, "criterion": c, "seconds_per_batch": t, "peak_rss_mb": 10.0, "rss_after_setup_mb": 1.0,
                "time_vs_fwd_bwd": t, "extra_peak_mb": 9.0, "extra_peak_vs_fwd_bwd": 1.0, "note": note}

    rows = [row("a", "fwd+bwd", 1.0, "run one"), row("a", "oba", 2.0, "run one"),
            row("b", "fwd+bwd", 1.0, "run two"), row("b", "oba", 3.0, "run two"),
            {"model": "b", "criterion": "oba-k3", "error": "exit -9: killed (out of memory?)"}]
    d = {"description": "x", "machine": {}, "command": "c", "rows": rows}
    text = "\n".join(_report_module().scoring_cost(d))
    assert "| a | oba ¹ | 2.00 | 2.00 |" in text and "| b | oba ² | 3.00 | 3.00 |" in text
    assert "¹ run one." in text and "² run two." in text
    assert "**not met** (met on a only)" in text and "b oba 3.00× ²" in text
    assert "| b | oba-k3 | error: exit -9" in text
    rows[3]["time_vs_fwd_bwd"] = 2.4
    assert "met on every model" in "\n".join(_report_module().scoring_cost(d))


def test_cost_jobs_default_to_each_models_own_criteria():
    """vit_b_16's memory-control rows run without being named (they were once silently skipped), the small
    models run every criterion, --criteria narrows, and unknown names are refused with the valid choices."""
    cost = _bench_module("cost")
    jobs = cost.select_jobs(["vit_b_16", "resnet32"], None)
    assert ("vit_b_16", "oba (checkpoint, micro_batch 4)") in jobs and ("vit_b_16", "oba-k3") not in jobs
    assert {c for m, c in jobs if m == "resnet32"} == set(cost.CRITERIA)
    assert cost.select_jobs(["vit_b_16", "resnet32"], ["oba (checkpoint)", "taylor"]) == [
        ("vit_b_16", "taylor"), ("vit_b_16", "oba (checkpoint)"), ("resnet32", "taylor")]
    with pytest.raises(SystemExit, match="unknown criteria.*bogus.*choose from"):
        cost.select_jobs(["resnet32"], ["bogus"])
    with pytest.raises(SystemExit, match="unknown model.*nope"):
        cost.select_jobs(["nope"], None)


def test_accuracy_table_bolds_complete_columns_and_states_the_iterative_budget():
    def row(mode, crit, t, a):
        return {"dataset": "d", "model": "m", "criterion": crit, "mode": mode, "target_flops": t, "accuracy_mean": a,
                "accuracy_std": 0.01, "seeds": 3, "budget": {"finetune_epochs": 1, "finetune_samples": 10,
                                                             "calib_batches": 1, "calib_batch_size": 2,
                                                             "test_samples": 5}}

    rows = [row("one-shot", "oba", 0.5, 0.9), row("one-shot", "taylor", 0.5, 0.8),
            row("iterative", "oba", 0.5, 0.7), row("iterative", "taylor", 0.5, 0.6),
            row("iterative", "oba", 0.3, 0.5),  # taylor was not run iteratively at 30%: that column is incomplete
            row("full-budget", "oba+compensate", 0.5, 0.95)]  # a column of one criterion: nothing to bold
    d = {"description": "x", "machine": {}, "command": "c", "iterative_steps": 5, "rows": rows}
    text = "\n".join(_report_module().accuracy(d))
    assert "| one-shot | oba | **90.00 ± 1.00** |" in text and "| iterative | oba | **70.00 ± 1.00** | 50.00 ± 1.00 |" \
        in text
    assert "| full-budget | oba+compensate | 95.00 ± 1.00 |" in text
    assert "prune in 5 steps" in text and "fine-tune once after the last step" in text
    d["iterative_steps"] = 1  # one epoch divides into one step
    assert "equal share of the epochs" in "\n".join(_report_module().accuracy(d))


def test_oneshot_statistics_by_hand():
    """Mean, 95% t-interval and the paired difference from the baseline, against a hand computation."""
    rep = _report_module()
    acc = {("magnitude", "batchnorm"): [0.80, 0.84, 0.82], ("oba-joint", "batchnorm"): [0.83, 0.86, 0.86],
           ("oba-joint", "plain"): [0.10, 0.90, 0.50]}
    rows = []
    for sd in range(3):
        for crit in ("magnitude", "oba-joint"):
            ways = {w: {"accuracy": acc[crit, w][sd]} for c, w in acc if c == crit}
            rows.append({"seed": sd, "criterion": crit, "target_flops": 0.6, "ways": ways})
    o = {"rows": rows, "targets": [0.6], "criteria": ["magnitude", "oba-joint"], "ways": ["plain", "batchnorm"],
         "seeds": [0, 1, 2], "t95": {"2": 12.706, "3": 4.303}}
    st = rep.oneshot_stats(o)
    b = st[0.6, "magnitude", "batchnorm"]
    assert b["mean"] == pytest.approx(0.82) and b["half"] == pytest.approx(4.303 * 0.02 / 3 ** 0.5)
    j = st[0.6, "oba-joint", "batchnorm"]
    # paired differences 0.03, 0.02, 0.04: mean 0.03, sd 0.01
    assert j["diff"] == pytest.approx(0.03) and j["diff_half"] == pytest.approx(4.303 * 0.01 / 3 ** 0.5)
    assert j["significant"]
    p = st[0.6, "oba-joint", "plain"]  # differences -0.7, 0.06, -0.32: the interval holds 0
    assert p["diff"] == pytest.approx(-0.32) and not p["significant"]
    assert ("magnitude", "plain") not in {(k[1], k[2]) for k in st}
    # the best variant (oba-joint batchnorm, 0.85) closes (0.85 - 0.82) / (0.88 - 0.82) = half the gap
    base, best, closed = rep.gap_closed(dict(o, original={"accuracy": 0.88}), st, 0.6)
    assert best == (0.6, "oba-joint", "batchnorm") and closed == pytest.approx(0.5)


def test_post_option_rule_by_hand():
    """The rule that turns the one-shot rows into on/off defaults for BN re-estimation and compensation."""
    rep = _report_module()

    def model(name, accs):  # accs[way] = per-seed accuracies at the one target
        rows = [{"seed": sd, "criterion": "magnitude", "target_flops": 0.6,
                 "ways": {w: {"accuracy": v[sd]} for w, v in accs.items()}} for sd in range(3)]
        return {"model": name, "oneshot": {"criteria": ["magnitude"], "targets": [0.6], "rows": rows,
                                           "t95": {"2": 12.706, "3": 4.303}}}

    cnn = model("cnn", {"plain": [0.3, 0.4, 0.5], "batchnorm": [0.7, 0.8, 0.9],
                        "batchnorm+compensation": [0.71, 0.79, 0.92]})
    vit = model("vit", {"plain": [0.6, 0.6, 0.6], "batchnorm": [0.6, 0.6, 0.6],  # no BatchNorm: no change
                        "batchnorm+compensation": [0.7, 0.7, 0.7]})
    rec = rep.recommend_post({"models": [cnn, vit]}, "magnitude")
    assert rec["reestimate_bn"]["on"] and [c["model"] for c in rec["reestimate_bn"]["cells"]] == ["cnn"]
    # compensation: +0.0067 on the cnn (not significant) and +0.1 on the vit (significant): on
    assert rec["compensate"]["on"] and len(rec["compensate"]["cells"]) == 2
    # one cell where it lowers the mean: off
    cnn2 = model("cnn", {"plain": [0.3, 0.4, 0.5], "batchnorm": [0.7, 0.8, 0.9],
                         "batchnorm+compensation": [0.69, 0.79, 0.89]})
    assert not rep.recommend_post({"models": [cnn2, vit]}, "magnitude")["compensate"]["on"]
    assert rep.recommend_post({"models": [cnn]}, "oba") == {}


def _acc_run(crit, seed, a, mode="full-budget", t=0.5):
    return {"dataset": "d", "model": "m", "criterion": crit, "mode": mode, "target_flops": t, "seed": seed,
            "accuracy": a}


def test_accuracy_column_statistics_by_hand():
    """Drop from the original with its 95% t-interval, and the differences paired by seed, by hand."""
    rep = _report_module()
    runs = [_acc_run("magnitude", 0, 0.90), _acc_run("magnitude", 1, 0.92), _acc_run("magnitude", 2, 0.91),
            _acc_run("oba", 0, 0.92), _acc_run("oba", 1, 0.93), _acc_run("oba", 2, 0.93),
            _acc_run("taylor", 0, 0.80), _acc_run("taylor", 1, 0.99),  # two seeds, widely spread
            _acc_run("oba", 0, 0.10, mode="one-shot")]  # another column: ignored
    col = rep.column_stats(runs, "d", "m", "full-budget", 0.5, 0.94)
    # magnitude drops 0.04, 0.02, 0.03: mean 0.03, sd 0.01, t(2) = 4.303
    m, h, n = col["drop"]["magnitude"]
    assert (m, n) == (pytest.approx(0.03), 3) and h == pytest.approx(4.303 * 0.01 / 3 ** 0.5, rel=1e-3)
    # oba − magnitude per seed 0.02, 0.01, 0.02: mean 0.01667, sd 0.005774
    m, h, n, sig = col["pairs"]["oba", "magnitude"]
    assert m == pytest.approx(0.05 / 3) and h == pytest.approx(4.303 * 0.005774 / 3 ** 0.5, rel=1e-3) and sig
    assert col["pairs"]["magnitude", "oba"][0] == pytest.approx(-0.05 / 3)
    # taylor − magnitude at seeds 0, 1: -0.10, +0.07, t(1) = 12.706: not significant
    m, h, n, sig = col["pairs"]["taylor", "magnitude"]
    assert n == 2 and m == pytest.approx(-0.015) and not sig
    assert rep.column_stats(runs, "d", "m", "full-budget", 0.3, 0.94) == {}
    # two seeds with equal differences: a zero-width interval, which is not evidence
    two = [_acc_run("a", 0, 0.91), _acc_run("a", 1, 0.93), _acc_run("b", 0, 0.90), _acc_run("b", 1, 0.92)]
    m, h, n, sig = rep.column_stats(two, "d", "m", "full-budget", 0.5, 0.94)["pairs"]["a", "b"]
    assert (n, h) == (2, pytest.approx(0.0, abs=1e-12)) and m == pytest.approx(0.01) and not sig
    line = rep.column_lines("full-budget", 0.5, col)[0]
    assert "Significant of 3 paired differences (about 0.2 expected by chance): oba − magnitude +1.67" in line
    assert "taylor 4.50" in line  # drops 0.14, -0.05
    assert "(2 seeds)" in line  # the two-seed criterion is marked
    assert len(rep.column_lines("full-budget", 0.5, col)) == 1  # no "+compensate" runs: no compensation line
    # with and without compensation, paired by seed: +0.02, +0.03, +0.03 -> mean 0.02667, sd 0.005774
    comp = runs + [_acc_run("magnitude+compensate", s, a) for s, a in enumerate((0.92, 0.95, 0.94))]
    lines = rep.column_lines("full-budget", 0.5, rep.column_stats(comp, "d", "m", "full-budget", 0.5, 0.94))
    assert lines[1] == ("- full-budget 50%, compensation (criterion+compensate − criterion, paired by seed, points): "
                        f"magnitude +2.67 ± {100 * 4.303 * 0.005774 / 3 ** 0.5:.2f} (3 seeds, significant).")


def test_full_budget_findings_state_the_claim_and_significance():
    rep = _report_module()
    runs = [_acc_run("magnitude", s, a) for s, a in enumerate((0.935, 0.936, 0.937))] + \
           [_acc_run("oba", s, a) for s, a in enumerate((0.90, 0.91, 0.92))]
    rows = [{"dataset": "d", "model": "m", "criterion": "original", "mode": "-", "target_flops": 1.0,
             "accuracy_mean": 0.938},
            *({"dataset": "d", "model": "m", "criterion": c, "mode": "full-budget", "target_flops": 0.5,
               "accuracy_mean": a} for c, a in (("magnitude", 0.936), ("oba", 0.91)))]
    (line,) = rep.regime_findings({"rows": rows, "runs": runs})
    # magnitude drops 0.3, 0.2, 0.1 points: mean 0.2 ± 0.25, upper end 0.45 > 0.3: not excluded, not shown within
    assert "smallest drop magnitude 0.20 ± 0.25" in line and "is not excluded by its 95% interval" in line
    assert "magnitude − oba +2.60" in line
    runs[:3] = [_acc_run("magnitude", s, 0.937) for s in range(3)]  # drop 0.1 every seed: ± 0
    assert "is within its 95% interval" in rep.regime_findings({"rows": rows, "runs": runs})[0]
    # a cheap column gets no such line
    assert rep.regime_findings({"rows": [dict(r, mode="one-shot") for r in rows], "runs": runs}) == []
    # a regime's own original (another test set) is the one its drops are taken from
    own = dict(rows[0], mode="full-budget", accuracy_mean=0.947)
    assert "smallest drop magnitude 1.00 ± 0.00" in rep.regime_findings({"rows": rows + [own], "runs": runs})[0]
    shown = [dict(r, accuracy_std=0.0, seeds=3) for r in rows + [own]]
    text = "\n".join(rep.accuracy({"description": "x", "machine": {}, "rows": shown, "runs": runs}))
    assert "### m on d (original: 93.80%)" in text and "the original measures 94.70%" in text


def test_merge_keeps_a_labelled_regimes_original_apart(tmp_path, monkeypatch):
    import json

    acc = _bench_module("accuracy")
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def orig(a, mode="-"):
        return {"dataset": "d", "model": "m", "criterion": "original", "mode": mode, "target_flops": 1.0,
                "accuracy_mean": a}

    (tmp_path / "base.json").write_text(json.dumps({"rows": [orig(0.92)], "runs": [], "settings": {}}))
    # written before originals were kept per regime: its original row says "-"
    (tmp_path / "full.json").write_text(json.dumps({"rows": [orig(0.93)], "runs": [],
                                                    "settings": {"label": "full-budget"}}))
    acc.merge("base", ["full"])
    rows = json.loads((tmp_path / "base.json").read_text())["rows"]
    assert sorted((r["mode"], r["accuracy_mean"]) for r in rows) == [("-", 0.92), ("full-budget", 0.93)]


def test_accuracy_grid_is_seed_major_saves_each_run_and_resumes(tmp_path, monkeypatch):
    """Every run is saved as it ends; a second invocation skips the recorded runs and pools the new seed; runs
    recorded with another budget are dropped, not pooled."""
    import json
    import types

    acc = _bench_module("accuracy")
    order = []

    def fake_run(model, ds, seed, target, crit, steps, args, test):
        order.append((seed, crit))
        return {"accuracy": 0.5 + 0.01 * seed + (0.1 if crit == "oba" else 0.0), "loss": 1.0, "flops_ratio": target,
                "params_ratio": 0.6, "seconds": 0.0}

    saved = {}
    monkeypatch.setattr(acc, "run_one", fake_run)
    monkeypatch.setattr(acc, "save", lambda name, payload: saved.__setitem__(name, json.loads(json.dumps(payload))))
    monkeypatch.setattr(acc.oba_fx, "get_dataset", lambda *a, **k: types.SimpleNamespace(test=lambda bs: None))
    monkeypatch.setattr(acc.oba_fx, "evaluate", lambda m, t: {"accuracy": 0.9, "loss": 0.3})
    monkeypatch.setitem(sys.modules, "models_zoo", types.SimpleNamespace(trained=lambda name, data=None: None))
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(acc, "RESULTS", results, raising=False)
    import common

    monkeypatch.setattr(common, "RESULTS", results)

    def invoke(*extra):
        monkeypatch.setattr(sys, "argv", ["accuracy.py", "--models", "m", "--targets", "0.5", "--modes", "one-shot",
                                          "--label", "full-budget", "--out", "grid", *extra])
        acc.main()
        (results / "grid.json").write_text(json.dumps(saved["grid"]))
        return saved["grid"]

    d = invoke("--criteria", "magnitude", "oba", "--seeds", "0", "1")
    assert order == [(0, "magnitude"), (0, "oba"), (1, "magnitude"), (1, "oba")]  # seed-major
    assert not d["partial"] and {r["seeds"] for r in d["rows"] if r["criterion"] != "original"} == {2}
    order.clear()
    d = invoke("--criteria", "magnitude", "oba", "--seeds", "0", "1", "2", "--resume")
    assert order == [(2, "magnitude"), (2, "oba")]  # seeds 0 and 1 were recorded: skipped
    oba = next(r for r in d["rows"] if r["criterion"] == "oba")
    assert oba["seeds"] == 3 and oba["accuracy_mean"] == pytest.approx(0.61) and len(d["runs"]) == 6
    order.clear()
    d = invoke("--criteria", "oba", "--seeds", "0", "--resume", "--finetune-epochs", "2")  # another budget
    assert order == [(0, "oba")]
    oba = next(r for r in d["rows"] if r["criterion"] == "oba")
    assert oba["seeds"] == 1 and oba["budget"]["finetune_epochs"] == 2 and len(d["runs"]) == 4


def test_widths_choice_rule_on_synthetic_rows():
    """The round_to pick: geometric mean of speed-up / FLOPs reduction; the smallest multiple within the tie."""
    choose = _bench_module("widths").choose

    def row(backend, m, eff, model="a", batch=1):
        return {"backend": backend, "round_to": m, "efficiency": eff, "model": model, "batch": batch}

    rows = [row("pytorch", 1, 0.5), row("pytorch", 1, 0.8, "b"),  # geomean 0.632
            row("pytorch", 8, 0.9), row("pytorch", 8, 0.9, "b"),  # 0.9
            row("pytorch", 16, 0.91), row("pytorch", 16, 0.91, "b"),  # 0.91: within 2% of 8 -> 8 wins
            row("onnxruntime", 8, 0.7), row("onnxruntime", 16, 0.9), row("onnxruntime", None, 1.0)]
    out = choose(rows, 0.02)
    assert out["pytorch"]["chosen"] == 8
    assert abs(out["pytorch"]["geomean_efficiency"]["1"] - (0.5 * 0.8) ** 0.5) < 1e-12
    assert out["onnxruntime"]["chosen"] == 16  # 0.7 is not within 2% of 0.9
    assert choose(rows, 0.0)["pytorch"]["chosen"] == 16
