"""Generate BENCHMARKS.md from benchmarks/results/*.json (never edit BENCHMARKS.md by hand).

    python benchmarks/report.py
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))  # the shared `common` module, however this file is loaded

from oba_fx.io import write_text  # noqa: E402

from common import COMP, mean_ci, t95  # noqa: E402


def _machine(m: dict) -> str:
    gpu = m.get("gpu") or "none"
    return (f"{m.get('cpu')} ({m.get('cores')} cores, {m.get('torch_threads')} torch threads, "
            f"{m.get('memory_gb')} GB RAM), GPU: {gpu}; Python {m.get('python')}, torch {m.get('torch')}, "
            f"commit {m.get('commit')}, {m.get('date')}")


def scoring_cost(d: dict) -> list[str]:
    out = ["## Scoring cost per calibration batch", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}", "",
           "Commands: " + "; ".join(f"`{c}`" for c in (d.get("commands") or [d.get("command", "")]) if c), "",
           "| model | criterion | s / batch | × fwd+bwd | extra peak RSS (MB) | × fwd+bwd memory |",
           "|---|---|---:|---:|---:|---:|"]
    marks = "¹²³⁴⁵⁶⁷⁸⁹"
    notes = list(dict.fromkeys(r["note"] for r in d["rows"] if r.get("note")))
    sup = lambda r: (" " + marks[notes.index(r["note"]) % len(marks)]) if r.get("note") else ""  # noqa: E731
    for r in d["rows"]:
        if "error" in r:
            out.append(f"| {r['model']} | {r['criterion']}{sup(r)} | error: {r['error']} | | | |")
            continue
        out.append(f"| {r['model']} | {r['criterion']}{sup(r)} | {r['seconds_per_batch']:.2f} | "
                   f"{r.get('time_vs_fwd_bwd', float('nan')):.2f} | {r.get('extra_peak_mb', float('nan')):.0f} | "
                   f"{r.get('extra_peak_vs_fwd_bwd', float('nan')):.2f} |")
    out += [""] + [f"{marks[i % len(marks)]} {n}." for i, n in enumerate(notes)]
    got = []
    for m in dict.fromkeys(r["model"] for r in d["rows"]):
        v = {r["criterion"]: r for r in d["rows"] if r["model"] == m and "error" not in r}
        part = [f"{c} {v[c]['time_vs_fwd_bwd']:.2f}×{sup(v[c])}" for c in ("oba", "oba-network")
                if c in v and v[c].get("time_vs_fwd_bwd") is not None]
        if part:
            got.append(f"{m} " + ", ".join(part))
    ok = {m: all(r.get("time_vs_fwd_bwd", 99) <= 2.5 for r in d["rows"]
                 if r["model"] == m and r["criterion"] in ("oba", "oba-network"))
          for m in dict.fromkeys(r["model"] for r in d["rows"] if r["criterion"] in ("oba", "oba-network"))}
    verdict = ("met on every model" if all(ok.values()) else
               "**not met**" + (f" (met on {', '.join(m for m in ok if ok[m])} only)" if any(ok.values()) else ""))
    out += ["", "Targets (issues 3 and 6): `oba` ≤ 2.5× and `oba-network` ≤ 2.5× a forward+backward: "
            + verdict + ". Measured: " + "; ".join(got) + ". Forward-over-reverse "
            "does 9 matrix products per layer where a forward+backward does 3; the δ = −θ shortcut brings that to 7 "
            "(compare the `oba` and `oba (no shortcut)` rows). Each row is one timed batch in one process; rows "
            "measured under different conditions carry a note. The paper's code measured "
            "9.9–18.4× for its graph walk and 4.5× for FastOBA on CPU.", ""]
    inter = d.get("interleaved")
    if inter and inter.get("rows"):
        crit = list(dict.fromkeys(c for r in inter["rows"] for c in r["vs_fwd_bwd"]))
        out += ["### End to end, interleaved (the figure the targets judge)", "", inter["description"] + ".", "",
                f"Machine: {_machine(inter['machine'])}", "",
                "Commands: " + "; ".join(f"`{c}`" for c in inter["commands"]), "",
                "`malloc`: `default` is glibc as a process starts; `no-mmap` sets "
                "`MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`, so freed activation-size "
                "blocks stay in the heap and the next batch's tensors do not page-fault in again.", "",
                "| model | batch | batches | repeats | malloc | fwd+bwd s (min) | "
                + " | ".join(f"{c} s (min) | {c} ×" for c in crit) + " |",
                "|---|---:|---:|---:|---|---:|" + "---:|---:|" * len(crit)]
        for r in inter["rows"]:
            cells = [f"{min(r['seconds'][c]):.2f} | {r['vs_fwd_bwd'][c]:.2f}" if c in r["vs_fwd_bwd"] else "– | –"
                     for c in crit]
            out.append(f"| {r['model']}{sup(r)} | {r['batch_size']} | {r['batches']} | {r['repeats']} | "
                       f"{r.get('allocator', 'default')} | {min(r['seconds']['fwd+bwd']):.2f} | "
                       + " | ".join(cells) + " |")
        # judged: the scoring compress runs (group scores); rows measured before it existed fall back to oba
        judge = lambda r: "oba (groups)" if "oba (groups)" in r["vs_fwd_bwd"] else "oba"  # noqa: E731
        judged = [r for r in inter["rows"] if r["model"] in ("resnet32", "resnet50", "vit_small")
                  and judge(r) in r["vs_fwd_bwd"] and r.get("allocator", "default") == "default"]
        bad = [f"{r['model']} (batch {r['batch_size']}, {judge(r)}) {r['vs_fwd_bwd'][judge(r)]:.2f}×" for r in judged
               if r["vs_fwd_bwd"][judge(r)] > 2.5]
        out += ["", "`oba (groups)` is `oba_fx.group_scores(graph, batches, \"oba\")`, the scoring `compress` runs: "
                "a coupled group's score needs each weight's score only summed along its rows and columns, and for "
                "a linear or convolution layer with δ = −θ those sums follow from the layer's output, input and "
                "input gradients (`curvature(marginals=...)`), so its backward skips the weight-gradient products "
                "(4 matrix products per layer instead of 7; exact, tested against the per-parameter route and a "
                "dense Hessian). `oba` is `oba_fx.parameter_scores(model, batches, \"oba\")`, every parameter's "
                "own score.", "",
                "Target (issue 17): `oba` scoring ≤ 2.5× a forward+backward on resnet32, resnet50 and vit_small, "
                "vit_b_16 reported as it is (judged on `oba (groups)` where measured, with the default malloc): "
                + ("**not met**: " + ", ".join(bad) if bad else
                                                  "met on every judged row" if judged else "no judged row yet")
                + ".", ""]
    return out


def _f(v, fmt="{:+.3f}"):
    return "" if v is None or (isinstance(v, float) and v != v) else fmt.format(v)


def fidelity(d: dict) -> list[str]:
    out = ["## Criterion fidelity (single-channel removal and joint one-shot removal)", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}", "",
           "Commands: " + "; ".join(f"`{c}`" for c in (d.get("commands") or [d.get("command", "")]) if c), "",
           f"Calibration: {d['calibration']['batches']} × {d['calibration']['batch_size']} Fashion-MNIST training "
           f"images; true ΔL on {d['heldout_samples']} held-out test images and on the calibration images.", ""]
    for m in d["models"]:
        s = m["single"]
        of = f" of {s['channels_total']}" if s.get("channels_total", s["channels"]) != s["channels"] else ""
        out += [f"### {m['model']} ({m['flops'] / 1e6:.1f} MFLOPs, {s['channels']}{of} channels ablated)", "",
                "| criterion | Spearman (held-out) | Kendall (held-out) | Spearman (calibration) | "
                "Spearman within groups | signed Spearman (calibration) | scoring s |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(s["rows"], key=lambda r: -(r["spearman_heldout"] if r["spearman_heldout"] ==
                                                   r["spearman_heldout"] else -9)):
            out.append(f"| {r['criterion']} | {_f(r['spearman_heldout'])} | {_f(r['kendall_heldout'])} | "
                       f"{_f(r['spearman_calibration'])} | {_f(r.get('spearman_within_group_mean'))} | "
                       f"{_f(r.get('spearman_signed_calibration'))} | {r['score_seconds']:.1f} |")
        if of:
            out += ["", f"group-exact's scoring time covers only the {s['channels']} ablated channels (one "
                        "Hessian-vector product each); the other criteria score every channel."]
        out += ["", "Joint one-shot removal, no fine-tuning (held-out accuracy / loss):", ""]
        targets = sorted({r["target_flops"] for r in m["joint"] if r["criterion"] != "original"}, reverse=True)
        base = next(r for r in m["joint"] if r["criterion"] == "original")
        out += ["| criterion | " + " | ".join(f"{t:.0%} FLOPs" for t in targets) + " |",
                "|---|" + "---:|" * len(targets),
                f"| original | {100 * base['accuracy']:.2f}% / {base['loss']:.3f} |" + " |" * (len(targets) - 1)]
        crits = list(dict.fromkeys(r["criterion"] for r in m["joint"] if r["criterion"] != "original"))
        for c in crits:
            cells = []
            for t in targets:
                r = next((r for r in m["joint"] if r["criterion"] == c and r["target_flops"] == t), None)
                cells.append(f"{100 * r['accuracy']:.2f}% / {r['loss']:.3f}" if r else "")
            out.append(f"| {c} | " + " | ".join(cells) + " |")
        out.append("")
        if m.get("oneshot"):
            out += oneshot(m["model"], m["oneshot"])
    return out


ONESHOT_BASELINE = ("magnitude", "batchnorm")


def paired(o: dict, t: float, a: tuple, b: tuple):
    """Accuracy of (criterion, way) ``a`` minus ``b`` at target ``t``, paired by seed: (mean, 95% half-width, n)."""
    acc = {(r["criterion"], w, r["seed"]): v["accuracy"] for r in o["rows"] if r["target_flops"] == t
           for w, v in r["ways"].items()}
    d = [acc[a + (sd,)] - acc[b + (sd,)] for sd in o["seeds"] if a + (sd,) in acc and b + (sd,) in acc]
    if not d:
        return None
    mean, half = mean_ci(d, o["t95"])
    return mean, half, len(d)


def oneshot_stats(o: dict) -> dict:
    """Per (target, criterion, way): accuracy mean and 95% half-width over seeds, and the difference from the
    baseline (magnitude with BatchNorm re-estimation) paired by seed, with its half-width."""
    out = {}
    for t in o["targets"]:
        for c in o["criteria"]:
            for w in o["ways"]:
                accs = [r["ways"][w]["accuracy"] for r in o["rows"]
                        if r["target_flops"] == t and r["criterion"] == c and w in r["ways"]]
                if not accs:
                    continue
                mean, half = mean_ci(accs, o["t95"])
                d_mean, d_half, n = paired(o, t, (c, w), ONESHOT_BASELINE) or (float("nan"), float("nan"), 0)
                out[t, c, w] = {"mean": mean, "half": half, "n": len(accs), "diff": d_mean, "diff_half": d_half,
                                "significant": bool(n > 1 and abs(d_mean) > d_half)}
    return out


def gap_closed(o: dict, st: dict, t: float):
    """(baseline stats, best (target, criterion, way), fraction of the baseline's gap to the original it closes)
    at target ``t``, or None without a baseline."""
    base = st.get((t,) + ONESHOT_BASELINE)
    if not base:
        return None
    best = max((k for k in st if k[0] == t), key=lambda k: st[k]["mean"])
    gap = o["original"]["accuracy"] - base["mean"]
    return base, best, (st[best]["mean"] - base["mean"]) / gap if gap > 0 else float("nan")


def _pm(x):
    if x is None:
        return "not measured"
    mean, half, n = x
    sig = n > 1 and abs(mean) > half
    txt = f"{100 * mean:+.1f} ± {100 * half:.1f}"
    return f"**{txt}**" if sig else txt


def oneshot_findings(fid: dict) -> list[str]:
    """What beats what in the one-shot rows: paired by seed, 95% intervals; bold where significant."""
    out = []
    for m in fid.get("models", []):
        o = m.get("oneshot")
        if not o:
            continue
        st = oneshot_stats(o)
        a0 = o["original"]["accuracy"]
        parts = []
        for t in o["targets"]:
            g = gap_closed(o, st, t)
            if g is None:
                continue
            base, best_key, closed = g
            cmp = []
            for way in ("batchnorm", "batchnorm+compensation"):
                if "oba-joint" in o["criteria"]:
                    cmp.append(f"oba-joint − magnitude {_pm(paired(o, t, ('oba-joint', way), ('magnitude', way)))}, "
                               f"− group-exact {_pm(paired(o, t, ('oba-joint', way), ('group-exact', way)))} "
                               f"({way})")
            if "oba" in o["criteria"]:
                cmp.append(f"oba − magnitude {_pm(paired(o, t, ('oba', 'batchnorm'), ('magnitude', 'batchnorm')))} "
                           "(batchnorm)")
            parts.append(f"{t:.0%} FLOPs: baseline {100 * base['mean']:.1f}%, best {best_key[1]} ({best_key[2]}) "
                         f"{100 * st[best_key]['mean']:.1f}%, closing {100 * closed:.0f}% of the gap to "
                         f"{100 * a0:.1f}%; " + "; ".join(cmp))
        out.append(f"- **One-shot, {m['model']}** ({len(o['seeds'])} calibration seeds, points of held-out "
                   "accuracy paired by seed, 95% interval, bold if it excludes 0): " + ". ".join(parts) + ".")
    return out


def oneshot(name: str, o: dict) -> list[str]:
    st = oneshot_stats(o)
    a0 = o["original"]["accuracy"]
    n = len(o["seeds"])
    out = [f"One-shot removal evaluated three ways, {n} calibration seeds ({o['calibration']['batches']} × "
           f"{o['calibration']['batch_size']} images each), held-out accuracy on {o['heldout_samples']} test images "
           f"(original {100 * a0:.2f}%): mean ± 95% t-interval over seeds; Δ is the difference from magnitude with "
           "BatchNorm re-estimation paired by seed (**bold**: its 95% interval excludes 0). Machine: "
           f"{_machine(o['machine'])}. Command: `{o['command']}`.", "",
           "| criterion | evaluated | " + " | ".join(f"{t:.0%} FLOPs | Δ" for t in o["targets"]) + " |",
           "|---|---|" + "---:|---:|" * len(o["targets"])]
    for c in o["criteria"]:
        for w in o["ways"]:
            cells = []
            for t in o["targets"]:
                s_ = st.get((t, c, w))
                if s_ is None:
                    cells += ["", ""]
                    continue
                diff = "" if (c, w) == ONESHOT_BASELINE else f"{100 * s_['diff']:+.1f} ± {100 * s_['diff_half']:.1f}"
                cells += [f"{100 * s_['mean']:.1f} ± {100 * s_['half']:.1f}",
                          f"**{diff}**" if diff and s_["significant"] else diff]
            out.append(f"| {c} | {w} | " + " | ".join(cells) + " |")
    out.append("")
    if all(r["ways"]["batchnorm"] == r["ways"]["plain"] for r in o["rows"] if {"plain", "batchnorm"} <= set(r["ways"])):
        out.append(f"- {name} has no BatchNorm: re-estimation changes nothing, so its batchnorm rows are the plain "
                   "ones and the baseline is magnitude's plain removal.")
    for t in o["targets"]:
        g = gap_closed(o, st, t)
        if g is None:
            continue
        base, best_key, closed = g
        best, gap = st[best_key], a0 - base["mean"]
        out.append(f"- {t:.0%} FLOPs: the baseline (magnitude, BatchNorm re-estimated) is {100 * base['mean']:.1f}%, "
                   f"{100 * gap:.1f} points below the original; the best variant, {best_key[1]} "
                   f"({best_key[2]}), reaches {100 * best['mean']:.1f}% and closes {100 * closed:.0f}% of that gap "
                   f"(Δ {100 * best['diff']:+.1f} ± {100 * best['diff_half']:.1f}).")
    joint = [r["joint"] for r in o["rows"] if r.get("joint")]
    if joint:
        starts = {}
        for j in joint:
            starts[j["start"]] = starts.get(j["start"], 0) + 1
        pr = [(r["predicted_delta_loss_calibration"], r["measured_delta_loss_calibration"]) for r in o["rows"]
              if r.get("joint")]
        out.append(f"- oba-joint: start taken from " + ", ".join(f"{k} {v}×" for k, v in starts.items())
                   + f"; {sum(j['swapped_channels'] for j in joint) / len(joint):.0f} channels swapped and "
                   f"{sum(j['accepted_rounds'] for j in joint) / len(joint):.1f} rounds accepted on average; "
                   "predicted vs measured joint ΔL on the calibration data (plain removal): "
                   + ", ".join(f"{p:.2f}/{m_:.2f}" for p, m_ in pr) + ".")
    out.append("")
    return out


def accuracy(d: dict) -> list[str]:
    out = ["## Accuracy after pruning and fine-tuning", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}", ""]
    cmds = d.get("commands") or [d.get("command", "")]
    out += ["Commands: " + "; ".join(f"`{c}`" for c in cmds if c), ""]
    if d.get("partial"):
        out += ["**Partial run**: the table holds the rows finished so far.", ""]
    rows = d["rows"]
    for ds, model in dict.fromkeys((r["dataset"], r["model"]) for r in rows):
        sub = [r for r in rows if r["dataset"] == ds and r["model"] == model]
        base = original(sub, ds, model, "-")
        targets = sorted({r["target_flops"] for r in sub if r["criterion"] != "original"}, reverse=True)
        budgets = list(dict.fromkeys(json.dumps(r["budget"], sort_keys=True) for r in sub if r.get("budget")))  # row order, not set order
        budget = ""
        if budgets:
            bd = [json.loads(x) for x in budgets]
            budget = "Budget: " + "; ".join(
                f"{x['finetune_epochs']} fine-tuning epoch(s) over {x['finetune_samples']} training images, "
                f"{x['calib_batches']}×{x['calib_batch_size']} calibration images per step, accuracy on "
                f"{x['test_samples']} test images" for x in bd) + "."
        out += [f"### {model} on {ds}" + (f" (original: {100 * base['accuracy_mean']:.2f}%)" if base else ""), ""]
        if budget and any(r["mode"] == "iterative" for r in sub):
            n = d["iterative_steps"]
            if all(x["finetune_epochs"] % n for x in bd):
                budget += (f" Iterative runs prune in {n} steps, re-scoring on fresh calibration batches at each step, "
                           f"and fine-tune once after the last step (the epochs do not divide into {n} steps): they "
                           "measure re-scoring between removals, not fine-tuning between them.")
            elif not any(x["finetune_epochs"] % n for x in bd):
                budget += f" Iterative runs prune in {n} steps and fine-tune for an equal share of the epochs after each."
        if budget:
            out += [budget, ""]
        out += [
                "| mode | criterion | " + " | ".join(f"{t:.0%} FLOPs" for t in targets) + " |",
                "|---|---|" + "---:|" * len(targets)]
        keys = dict.fromkeys((r["mode"], r["criterion"]) for r in sub if r["criterion"] != "original")
        for mode, crit in sorted(keys, key=lambda k: (k[0], list(keys).index(k))):
            cells = []
            for t in targets:
                r = next((r for r in sub if (r["mode"], r["criterion"], r["target_flops"]) == (mode, crit, t)), None)
                if r is None:
                    cells.append("")
                    continue
                col = [x for x in sub if x["mode"] == mode and x["target_flops"] == t]
                # complete: every plain criterion run on this model in this mode has a row in this column
                here = {x["criterion"] for x in col if ":" not in x["criterion"]}
                complete = len(here) > 1 and here >= {x["criterion"] for x in sub
                                                      if x["mode"] == mode and ":" not in x["criterion"]}
                best = max(x["accuracy_mean"] for x in col if ":" not in x["criterion"]) if complete else None
                cell = f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}"
                if r["seeds"] < 3:
                    cell += f" ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
                cells.append(f"**{cell}**" if r["accuracy_mean"] == best and ":" not in crit else cell)
            out.append(f"| {mode} | {crit} | " + " | ".join(cells) + " |")
        out.append("")
        for mode in dict.fromkeys(m for m, _ in keys):
            own = original(sub, ds, model, mode)
            if own is not None and own is not base:
                out.append(f"- {mode}: the original measures {100 * own['accuracy_mean']:.2f}% on the test images "
                           "of this regime; its drops are taken from that.")
            for t in targets:
                col = column_stats(d.get("runs", []), ds, model, mode, t, own["accuracy_mean"] if own else None)
                if col:
                    out += column_lines(mode, t, col)
        out.append("")
    out += ["Bold: best mean in its column and mode (complete columns of two or more criteria only: every "
            "criterion run on that model in that mode has a row there; an empty cell was not measured). Below "
            "each table, per column: the drop from the unpruned model with its 95% t-interval over seeds, and every difference between two "
            "criteria, paired by seed (3 or more seeds), whose 95% interval excludes 0. The intervals are not "
            "corrected for multiple comparisons: with no true difference, 5% of the pairs would appear by chance.",
            ""]
    return out


def original(rows: list, ds: str, model: str, mode: str):
    """The unpruned model's row for a budget regime: its own when the regime recorded one, else the shared one."""
    cand = [r for r in rows if (r["dataset"], r["model"], r["criterion"]) == (ds, model, "original")]
    return next((r for r in cand if r["mode"] == mode), next((r for r in cand if r["mode"] == "-"), None))


def column_stats(runs: list, ds: str, model: str, mode: str, target: float, original: float | None) -> dict:
    """One accuracy column from its seed runs.

    ``drop``: per criterion, original − accuracy, mean and 95% half-width over seeds (the original is one fixed
    model, so this is the accuracy's own interval). ``pairs``: for every two criteria run at two or more common
    seeds, a − b paired by seed: (mean, half-width, seeds, significant: 3 or more seeds and 0 outside).
    """
    import itertools

    col = [r for r in runs if (r["dataset"], r["model"], r["mode"], r["target_flops"]) == (ds, model, mode, target)]
    acc = {}
    for r in col:
        acc.setdefault(r["criterion"], {})[r["seed"]] = r["accuracy"]
    if not acc:
        return {}

    def ci(vals):
        return (*mean_ci(vals, {str(len(vals)): t95(len(vals))}), len(vals))

    drop = {c: ci([original - a for a in v.values()]) for c, v in acc.items()} if original is not None else {}
    pairs = {}
    for a, b in itertools.permutations(acc, 2):
        common = sorted(set(acc[a]) & set(acc[b]))
        if len(common) >= 2:
            mean, half, n = ci([acc[a][sd] - acc[b][sd] for sd in common])
            # significance needs 3 seeds: with 2, equal differences (accuracy moves in steps of 1/test images)
            # give a zero-width interval
            pairs[a, b] = (mean, half, n, n >= 3 and abs(mean) > half)
    return {"drop": drop, "pairs": pairs}


def column_lines(mode: str, t: float, col: dict) -> list[str]:
    drops = "; ".join(f"{c} {100 * m:.2f} ± {100 * h:.2f}" + (f" ({n} seed{'s' * (n > 1)})" if n < 3 else "")
                      for c, (m, h, n) in sorted(col["drop"].items(), key=lambda kv: kv[1][0]))
    line = f"- {mode} {t:.0%}: drop from the original, points: {drops}." if drops else f"- {mode} {t:.0%}:"
    out = [line + (" " + _significant(col["pairs"]) if col["pairs"] else "")]
    # the rewrite option against the same criterion without it, paired by seed
    comp = [(c, col["pairs"][c + COMP, c]) for c in sorted(col["drop"]) if (c + COMP, c) in col["pairs"]]
    if comp:
        out.append(f"- {mode} {t:.0%}, compensation (criterion+compensate − criterion, paired by seed, points): "
                   + "; ".join(f"{c} {100 * m:+.2f} ± {100 * h:.2f} ({n} seeds{', significant' if s else ''})"
                               for c, (m, h, n, s) in comp) + ".")
    return out


def _significant(pairs: dict) -> str:
    """The paired differences whose 95% interval excludes 0, each once (the larger minus the smaller)."""
    sig = [f"{a} − {b} {100 * m:+.2f} ± {100 * h:.2f} ({n} seeds)" for (a, b), (m, h, n, s) in pairs.items()
           if s and m > 0]
    n = len(pairs) // 2
    return (f"Significant of {n} paired differences (about {0.05 * n:.1f} expected by chance): "
            + ("; ".join(sig) if sig else "none") + ".")


def speedup(d: dict) -> list[str]:
    runs = d.get("commands") or [{"command": d.get("command", ""), "machine": d["machine"], "models": None}]
    head = []
    for c in runs:
        which = f" ({', '.join(c['models'])})" if c.get("models") else ""
        head += [f"Machine: {_machine(c['machine'])}", "", f"Command{which}: `{c['command']}`", ""]
    out = ["## Speed-up of slimmed models", "", d["description"] + ".", "", *head,
           "| model | variant | FLOPs | params | backend | batch | median ms | speed-up | speed-up / FLOPs reduction |",
           "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    flagged = []
    for r in d["rows"]:
        # faster than the FLOPs shrink: usually the FLOPs count missed work, or the timing is off
        odd = faster_than_flops(r)
        if odd:
            flagged.append(r)
        out.append(f"| {r['model']} | {r['variant']} | {r['flops_ratio']:.1%} | {r['params_ratio']:.1%} | "
                   f"{r['backend']} | {r['batch']} | "
                   f"{r['median_ms']:.2f} | {r['speedup']:.2f}× | {r['speedup_vs_flops']:.2f}"
                   + (f" {INVESTIGATE}" if odd else "") + " |")
    out += ["", "Target (issue 6): speed-up ≥ 0.85 × the FLOPs reduction on resnet50 (≥ 1.7× at 50% FLOPs).", ""]
    if flagged:
        out += [f"**{INVESTIGATE}** ({len(flagged)} row{'s' if len(flagged) > 1 else ''}): "
                + "; ".join(f"{r['model']} {r['variant']} {r['backend']} batch {r['batch']}: {r['speedup']:.2f}× "
                            f"vs a FLOPs reduction of {1 / r['flops_ratio']:.2f}×" for r in flagged)
                + ". A speed-up beyond the FLOPs reduction points at a FLOPs count that misses work (the real "
                  "ratio is below the reported one, as when attention kernels go uncounted) or at a timing "
                  "artefact.", ""]
    return out


def widths(d: dict) -> list[str]:
    """Hardware-friendly widths: the conv-pair sweep per backend and the round_to decision table."""
    out = ["## Hardware-friendly widths (`round_to` per backend)", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}", "", f"Command: `{d['command']}`", "",
           "**Width sweep**: `conv(64 → c) → ReLU → conv(c → 64)`, 3×3 at 14×14, batch 32: milliseconds per "
           "GFLOP by width (lower is better; the minima mark the backend's channel blocks).", ""]
    backends = sorted({r["backend"] for r in d["sweep"]})
    sweep = {(r["backend"], r["width"]): r for r in d["sweep"]}
    ws = sorted({r["width"] for r in d["sweep"]})
    out += ["| width | " + " | ".join(f"{b} ms | {b} ms/GFLOP" for b in backends) + " |",
            "|---:|" + "---:|---:|" * len(backends)]
    for w in ws:
        out.append(f"| {w} | " + " | ".join(f"{sweep[(b, w)]['median_ms']:.3f} | {sweep[(b, w)]['ms_per_gflop']:.2f}"
                                           for b in backends) + " |")
    mults = sorted({r["round_to"] for r in d["rows"] if r["round_to"] is not None})
    models = list(dict.fromkeys(r["model"] for r in d["rows"]))
    batches = sorted({r["batch"] for r in d["rows"]})
    cell = {(r["model"], r["backend"], r["batch"], r["round_to"]): r for r in d["rows"] if r["round_to"]}
    out += ["", f"**Decision**: each model pruned to {d['target_flops']:.0%} FLOPs with every `round_to`; the "
            "cell is speed-up / FLOPs reduction (1.00 = the speed-up the FLOPs promise), with the FLOPs kept in "
            "brackets.", "",
            "| model | backend | batch | " + " | ".join(f"round_to={m}" for m in mults) + " |",
            "|---|---|---:|" + "---:|" * len(mults)]
    row_backends = sorted({r["backend"] for r in d["rows"]})
    for mdl in models:
        for b in row_backends:
            for bs in batches:
                out.append(f"| {mdl} | {b} | {bs} | " + " | ".join(
                    f"{cell[(mdl, b, bs, m)]['efficiency']:.2f} ({cell[(mdl, b, bs, m)]['flops_ratio']:.1%})"
                    if (mdl, b, bs, m) in cell else "–" for m in mults) + " |")
    out += ["", f"Rule: per backend, the smallest multiple whose geometric-mean efficiency over models and batches "
            f"is within {d['tie']:.0%} of the best. `oba_fx.ROUND_TO` holds the choice (a test checks it):", ""]
    for b, c in d["chosen"].items():
        effs = ", ".join(f"{m}: {v:.3f}" for m, v in c["geomean_efficiency"].items())
        note = " — guidance only: `backend=\"pytorch\"` selects for the default memory format" \
            if b == "pytorch-channels_last" else ""
        out.append(f"- **{b}: round_to={c['chosen']}** (geometric means {effs}){note}")
    out.append("")
    return out


def latency_target(d: dict) -> list[str]:
    out = ["## Latency as a target (`compress(target_latency=...)`)", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}", "",
           "Commands: " + "; ".join(f"`{c}`" for c in (d.get("commands") or [d["command"]])), "",
           "| model | backend | batch | target | predicted | measured by compress | re-measured | within "
           f"±{d['tolerance']:.0%} | FLOPs kept | attempts | compress s |",
           "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in d["rows"]:
        if not r.get("reachable", True):
            out.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['target_fraction']:.0%} | "
                       f"unreachable: {r['reason'].split('; frozen groups')[0]} | | | | | | {r['compress_seconds']:.0f} |")
            continue
        out.append(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['target_fraction']:.0%} | "
                   f"{r['predicted_fraction']:.1%} | {r['compress_measured_fraction']:.1%} | "
                   f"{r['remeasured_fraction']:.1%} | {'yes' if r['within_tolerance'] else '**no**'} | "
                   f"{r['flops_ratio']:.1%} | {r['attempts']} | {r['compress_seconds']:.0f} |")
    ok = sum(r.get("within_tolerance", False) for r in d["rows"])
    reach = [r for r in d["rows"] if r.get("reachable", True)]
    out += ["", f"{ok} of {len(reach)} reachable rows land within ±{d['tolerance']:.0%} of the requested latency "
            f"(re-measured); {len(d['rows']) - len(reach)} row(s) ask for less than channel removal can reach, "
            "and compress says so.", ""]
    return out


def eager_breakdown(d: dict) -> list[str]:
    """What bounds the PyTorch-eager speed-up: time per op kind and the convolutions against their FLOPs."""
    out = ["## What bounds the PyTorch-eager speed-up", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}, {d['threads']} threads", "", f"Command: `{d['command']}`", "",
           "Op time is self CPU time in one profiled forward (original → slim, ms). *Conv time ratio* is the slim "
           "model's summed per-conv forward time over the original's (forward hooks), against the FLOPs ratio of "
           "the same convs counted from their shapes.", ""]
    kinds = list(dict.fromkeys(k for r in d["rows"] for part in r["kinds_ms"].values() for k in part))
    out += ["| model | batch | FLOPs kept | speed-up | efficiency | conv FLOPs ratio | conv time ratio | "
            + " | ".join(kinds) + " |", "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for r in d["rows"]:
        t0 = sum(c["original_ms"] for c in r["conv_layers"])
        t1 = sum(c["slim_ms"] for c in r["conv_layers"])
        cells = [f"{r['kinds_ms']['original'].get(k, 0):.1f} → {r['kinds_ms']['slim'].get(k, 0):.1f}" for k in kinds]
        out.append(f"| {r['model']} | {r['batch']} | {r['flops_ratio']:.1%} | {r['speedup']:.2f}× | "
                   f"{r['efficiency']:.2f} | {r['conv_flops_ratio_counted']:.3f} | {t1 / t0:.3f} | "
                   + " | ".join(cells) + " |")
    out += ["", "Convolutions whose time shrinks least against their FLOPs (slim/original), per row:", ""]
    for r in d["rows"]:
        worst = sorted(r["conv_layers"], key=lambda c: c["flops_ratio"] / max(c["time_ratio"], 1e-9))[:3]
        out.append(f"- {r['model']} batch {r['batch']}: " + "; ".join(
            f"conv #{c['index']} ({c['original']} → {c['slim']}) FLOPs ×{c['flops_ratio']:.2f}, time "
            f"×{c['time_ratio']:.2f} ({c['original_ms']:.2f} → {c['slim_ms']:.2f} ms)" for c in worst))
    out.append("")
    return out


def pytorch_modes(d: dict) -> list[str]:
    """Eager, channels-last and torch.compile for original and slim: which way runs the slim model fastest."""
    out = ["## Which PyTorch way runs the slim model fastest", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])}, {d['threads']} threads", "", f"Command: `{d['command']}`", "",
           "*Same way*: slim against original run the same way. *Vs eager original*: slim in this way against the "
           "original in plain eager. **Bold**: the fastest way for the slim model (`oba_fx.pytorch_guidance`: it "
           "must beat eager by 5%, else eager is the advice).", "",
           "| model | batch | way | FLOPs kept | original ms | slim ms | speed-up, same way | vs eager original | "
           "compile s (original / slim) |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in d["rows"]:
        c = r["compile_s"]
        comp = f"{c['original']:.0f} / {c['slim']:.0f}" if c.get("slim") is not None else ""
        way = f"**{r['mode']}**" if r["best_for_slim"] else r["mode"]
        out.append(f"| {r['model']} | {r['batch']} | {way} | {r['flops_ratio']:.1%} | {r['original_ms']:.2f} | "
                   f"{r['slim_ms']:.2f} | {r['speedup_same_mode']:.2f}× | {r['speedup_vs_eager_original']:.2f}× | "
                   f"{comp} |")
    out.append("")
    return out


INVESTIGATE = "investigate: faster than its FLOPs reduction"


def faster_than_flops(r: dict) -> bool:
    """The measured speed-up exceeds the FLOPs reduction 1 / flops_ratio."""
    return bool(r.get("flops_ratio")) and r["speedup"] > 1.0 / r["flops_ratio"]


TORCH_PRUNING = (77, 85)  # torchvision models Torch-Pruning reports pruned (classification, segmentation, detection)


def coverage_counts(d: dict) -> list[dict]:
    """Per model list ("torchvision classification", ...) and criterion: passes, rows run, models listed.

    A pass is a row whose every stage passed in full mode: compressed to the target within the tolerance by
    the independent count, reloaded with equal outputs, exported with onnxruntime within the tolerance."""
    crits = list(dict.fromkeys(r["criterion"] for r in d["rows"]))
    out = []
    for lst, names in d.get("model_lists", {}).items():
        suite = lst.split()[0]
        for c in crits:
            rows = [r for r in d["rows"] if r["suite"] == suite and r["model"] in set(names) and r["criterion"] == c]
            meta = [r["model"] for r in rows if r.get("mode") == "meta" and (r.get("stages", {}).get("flops") or {})
                    .get("ok")]
            out.append({"list": lst, "criterion": c, "passed": sum(r["status"] == "pass" for r in rows),
                        "run": len(rows), "listed": len(names), "meta_only": meta})
    return out


def _cov_cell(st: dict | None, text: str) -> str:
    if st is None:
        return ""
    return text if st.get("ok") else "✗"


def coverage(d: dict) -> list[str]:
    s = d["settings"]
    out = ["## Coverage: torchvision and timm models", "", d["description"] + ".", "",
           f"Machine: {_machine(d['machine'])} (the last run's)", "",
           "Rows per criterion and commit (each row records the commit it ran at): " + "; ".join(
               f"{c} at {k}: {n}" for (c, k), n in sorted(Counter((r["criterion"], r.get("commit", "?"))
                                                                  for r in d["rows"]).items())), "",
           "Commands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(d.get("commands", [])) if c), "",
           f"A pass: traced, compressed to {s['target_flops']:.0%} FLOPs within ± {s['tolerance']} by the "
           "independent meta-device count, reloaded with `oba_fx.load` with equal outputs, and exported with "
           f"onnxruntime's outputs within {s['onnx_rtol']:g} (relative) of the slim model's.", ""]
    counts = coverage_counts(d)
    for lst in dict.fromkeys(c["list"] for c in counts):
        part = [f"{c['passed']}/{c['listed']} with {c['criterion']}"
                + (f", plus {len(c['meta_only'])} too large for this machine that trace, rewrite and meet the "
                   f"FLOPs target on the meta device ({', '.join(c['meta_only'])})" if c["meta_only"] else "")
                + (f" ({c['listed'] - c['run']} not yet run)" if c["run"] < c["listed"] else "")
                for c in counts if c["list"] == lst]
        out.append(f"- **{lst}**: " + ", ".join(part))
    swept = list(dict.fromkeys(r["criterion"] for r in d["rows"]))
    out += ["", f"Criteria swept: {', '.join(swept)}."]
    tv = [c for c in counts if c["list"].startswith("torchvision") and c["criterion"] == "oba"]
    if tv:
        got, listed = sum(c["passed"] for c in tv), sum(c["listed"] for c in tv)
        waiting = listed - sum(c["run"] for c in tv)
        out += ["", f"Torch-Pruning reports {TORCH_PRUNING[0]} of {TORCH_PRUNING[1]} torchvision models pruned "
                    f"(classification, segmentation and detection); here {got} of {listed} torchvision "
                    "classification and segmentation models pass with `oba`"
                    + (f" ({waiting} not yet run)" if waiting else "") + " (detection is not part of this sweep)."]
    out += ["", "| suite | model | criterion | input | groups (prunable) | FLOPs kept (independent / reported) | "
                "reload | ONNX rel. error | seconds: trace / compress / check / onnx | peak MB | result |",
            "|---|---|---|---|---:|---:|---|---:|---:|---:|---|"]
    for r in sorted(d["rows"], key=lambda r: (r["suite"], r.get("task", ""), r["model"], r["criterion"])):
        st = r.get("stages", {})
        tr, co, fl, re_, ox = (st.get(k) for k in ("trace", "compress", "flops", "reload", "onnx"))
        groups = f"{tr['groups']} ({tr['prunable_groups']})" if tr and tr.get("ok") else _cov_cell(tr, "")
        flops = ""
        if fl and fl.get("ratio") is not None:
            rep = co.get("reported_flops_ratio") if co else None
            flops = f"{fl['ratio']:.1%}" + (f" / {rep:.1%}" if rep is not None else "") + ("" if fl["ok"] else " ✗")
        elif fl:
            flops = "✗"
        err = ox.get("max_rel_error") if ox else None
        onnx = (f"{err:.1e}" if err is not None else "") + ("" if ox is None or ox["ok"] else " ✗")
        secs = " / ".join("" if st.get(k) is None or st[k].get("seconds") is None else f"{st[k]['seconds']:.1f}"
                          for k in ("trace", "compress", "flops", "onnx"))
        shape = r.get("input_shape")
        size = f"{shape[-1]}²" if shape else ""
        result = {"pass": "pass", "skipped": "skipped"}.get(r["status"], "meta only" if r.get("mode") == "meta"
                                                            else f"✗ {r.get('failed_stage') or '?'}")
        peak = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else ""
        out.append(f"| {r['suite']} | {r['model']} | {r['criterion']} | {size} | {groups} | {flops} | "
                   f"{_cov_cell(re_, 'equal')} | {onnx} | {secs} | {peak} | {result} |")
    misses = sorted((r for r in d["rows"] if r["status"] != "pass"), key=lambda r: (r["suite"], r["model"]))
    if misses:
        out += ["", f"Misses ({len(misses)}), each with its reason:", ""]
        out += [f"- {r['suite']} `{r['model']}` ({r['criterion']}): {r.get('reason') or 'no reason recorded'}"
                for r in misses]
    out.append("")
    return out


RENDERERS = {"scoring_cost": scoring_cost, "fidelity": fidelity, "accuracy": accuracy, "speedup": speedup,
             "widths": widths, "latency_target": latency_target, "eager_breakdown": eager_breakdown,
             "pytorch_modes": pytorch_modes, "coverage": coverage}
ORDER = ["fidelity", "accuracy", "scoring_cost", "speedup", "widths", "latency_target", "eager_breakdown",
         "pytorch_modes", "coverage"]


def recommend(acc: dict) -> dict:
    """The defaults the accuracy table supports (the rule is stated in BENCHMARKS.md and tested).

    Criterion: the highest accuracy averaged over every complete column (dataset, model, mode, target)
    in which all candidate criteria were run. Candidates: the library criteria run in every budget regime
    (mode), "random" and the variants "name:norm" and "name+compensate" excluded.
    Normalisation: for the criterion's ":mean"/":max" variants (or, if it has none, oba's), the option
    with the highest accuracy averaged over the columns where all variants were run.
    """
    rows = [r for r in acc["rows"] if r["criterion"] != "original"]
    key = lambda r: (r["dataset"], r["model"], r["mode"], r["target_flops"])  # noqa: E731
    cell = {(key(r), r["criterion"]): r["accuracy_mean"] for r in rows}
    columns = list(dict.fromkeys(key(r) for r in rows))

    def mean_over(names):
        cols = [c for c in columns if all((c, n) in cell for n in names)]
        return cols, {n: sum(cell[(c, n)] for c in cols) / len(cols) for n in names} if cols else {}

    # candidates: plain criteria (not "name:norm" or "name+compensate" variants, not random) run in every
    # budget regime (mode: one-shot, iterative, full-budget ...), so a criterion measured in one regime only
    # neither wins by default nor empties the set of complete columns
    plain = [c for c in dict.fromkeys(r["criterion"] for r in rows)
             if ":" not in c and not c.endswith(COMP) and c != "random"]
    regimes = {}  # a regime run with "+compensate" variants only constrains nothing
    for r in rows:
        if r["criterion"] in plain:
            regimes.setdefault(r["mode"], set()).add(r["criterion"])
    crits = [c for c in plain if all(c in names for names in regimes.values())]
    cols, means = mean_over(crits)
    if not means:
        return {}
    best = max(means, key=means.get)
    out = {"criterion": best, "criterion_columns": len(cols), "criterion_mean_accuracy": means}
    for base in (best, "oba"):
        variants = [base] + sorted({r["criterion"] for r in rows if r["criterion"].startswith(base + ":")})
        if len(variants) > 1:
            ncols, nmeans = mean_over(variants)
            if nmeans:
                pick = max(nmeans, key=nmeans.get)
                out.update(normalize=pick.partition(":")[2] or "none", normalize_base=base,
                           normalize_columns=len(ncols),
                           normalize_mean_accuracy={(v.partition(":")[2] or "none"): a for v, a in nmeans.items()})
                break
    return out


#: The after-rewrite options, as the one-shot benchmark's ways: (compress keyword, way with it, way without it).
POST_OPTIONS = (("reestimate_bn", "batchnorm", "plain"), ("compensate", "batchnorm+compensation", "batchnorm"))


def recommend_post(fid: dict, criterion: str) -> dict:
    """On/off for each after-rewrite option, from the one-shot rows of results/fidelity.json.

    Rule: an option is on by default when, for the default ``criterion``, it raises the mean held-out accuracy
    (paired by calibration seed) in every (model, target) cell where it changes anything, and its paired 95%
    interval excludes 0 in at least one of them. Cells where the option changes nothing (BatchNorm
    re-estimation of a model without BatchNorm) do not count. No cell: no recommendation.
    """
    import statistics

    out = {}
    for opt, with_, without in POST_OPTIONS:
        cells = []
        for m in fid.get("models", []):
            o = m.get("oneshot")
            if not o or criterion not in o["criteria"]:
                continue
            for t in o["targets"]:
                rows = [r for r in o["rows"] if r["criterion"] == criterion and r["target_flops"] == t]
                diffs = [r["ways"][with_]["accuracy"] - r["ways"][without]["accuracy"] for r in rows]
                if not diffs or all(d == 0 for d in diffs):
                    continue
                mean, half = mean_ci(diffs, o["t95"])
                cells.append({"model": m["model"], "target": t, "diff": mean, "half": half,
                              "significant": bool(len(diffs) > 1 and abs(mean) > half)})
        if cells:
            on = all(c["diff"] > 0 for c in cells) and any(c["significant"] and c["diff"] > 0 for c in cells)
            out[opt] = {"on": on, "cells": cells,
                        "mean_diff": statistics.mean(c["diff"] for c in cells)}
    return out


def _seed_dominated(acc: dict) -> list[str]:
    """Columns where the seed (calibration sample and fine-tuning data order) moves every criterion together more
    than the criteria differ: there the per-criterion ± std mostly measures the seed, and a paired view is fairer."""
    import statistics

    out = []
    runs = [r for r in acc.get("runs", []) if r["criterion"] != "random" and ":" not in r["criterion"]]
    for key in dict.fromkeys((r["dataset"], r["model"], r["mode"], r["target_flops"]) for r in runs):
        col = [r for r in runs if (r["dataset"], r["model"], r["mode"], r["target_flops"]) == key]
        seeds = sorted({r["seed"] for r in col})
        crits = sorted({r["criterion"] for r in col})
        if len(seeds) < 2 or len(crits) < 2:
            continue
        by_seed = {sd: statistics.mean(r["accuracy"] for r in col if r["seed"] == sd) for sd in seeds}
        by_crit = {c: statistics.mean(r["accuracy"] for r in col if r["criterion"] == c) for c in crits}
        seed_sd, crit_sd = statistics.stdev(by_seed.values()), statistics.stdev(by_crit.values())
        if seed_sd > 2 * crit_sd:
            # paired: each criterion's accuracy minus its seed's mean over criteria
            paired = {c: statistics.mean(r["accuracy"] - by_seed[r["seed"]] for r in col if r["criterion"] == c)
                      for c in crits}
            out.append(f"- **{key[1]} {key[2]} {key[3]:.0%}: the seed dominates** — mean over criteria per seed "
                       + ", ".join(f"{100 * v:.1f}%" for v in by_seed.values())
                       + f" (std {100 * seed_sd:.1f} points, vs {100 * crit_sd:.1f} between criteria). Paired by "
                       "seed (accuracy minus that seed's mean): "
                       + ", ".join(f"{c} {100 * v:+.1f}" for c, v in sorted(paired.items(), key=lambda kv: -kv[1]))
                       + " points.")
    return out


CHEAP_MODES = ("one-shot", "iterative")
PAPER_DROP = 0.003  # the paper's claim: at most 0.3% accuracy drop at 42-67% fewer FLOPs


def regime_findings(acc: dict) -> list[str]:
    """For each column of a budget regime other than the cheap ones (the full-budget fine-tuning): the drop of
    every criterion with its 95% interval, which differences are significant, and the paper's ≤ 0.3% claim."""
    out = []
    rows = acc["rows"]
    for ds, model, mode, t in dict.fromkeys((r["dataset"], r["model"], r["mode"], r["target_flops"]) for r in rows
                                            if r["criterion"] != "original" and r["mode"] not in CHEAP_MODES):
        base = original(rows, ds, model, mode)
        if base is None:
            continue
        col = column_stats(acc.get("runs", []), ds, model, mode, t, base["accuracy_mean"])
        if not col:
            continue
        best = min(col["drop"], key=lambda c: col["drop"][c][0])
        m, h, n = col["drop"][best]
        claim = "within" if m + h <= PAPER_DROP else "not excluded by" if m - h <= PAPER_DROP else "outside"
        out.append(f"- **{model} {mode} {t:.0%} FLOPs** (original {100 * base['accuracy_mean']:.2f}%): smallest "
                   f"drop {best} {100 * m:.2f} ± {100 * h:.2f} points ({n} seed{'s' * (n > 1)}); the paper's "
                   f"≤ {100 * PAPER_DROP:.1f}-point drop is {claim} its 95% interval. "
                   + _significant(col["pairs"]))
    return out


NOISY_FRACTION = 0.3  # share of single removals that lower the held-out loss above which ΔL is noise


def findings(results: dict) -> list[str]:
    """Cross-benchmark summary computed from the JSON, and the library defaults it supports."""
    import inspect

    import oba_fx

    sig = inspect.signature(oba_fx.compress).parameters
    out = ["## Findings and defaults", ""]
    fid = results.get("fidelity")
    if fid:
        per = {}
        # A model where a large share of single removals *lower* the held-out loss has single-channel ΔL at the
        # level of sampling noise; its rank correlations say nothing about the criteria (reported separately).
        noisy = [m for m in fid["models"] if m["single"]["true_delta_heldout"]["frac_negative"] >= NOISY_FRACTION]
        clear = [m for m in fid["models"] if m not in noisy] or fid["models"]
        for m in clear:
            for r in m["single"]["rows"]:
                per.setdefault(r["criterion"], []).append(r["spearman_heldout"])
        mean = {c: sum(v) / len(v) for c, v in per.items()}
        order = sorted(mean, key=lambda c: -mean[c])
        models = ", ".join(m["model"] for m in clear)
        out += [f"- **Single-channel fidelity** ({models}; mean held-out Spearman of score vs true ΔL): "
                + ", ".join(f"{c} {mean[c]:+.2f}" for c in order) + "."]
        signed = [r.get("spearman_signed_calibration") for m in clear for r in m["single"]["rows"]
                  if r["criterion"] == "oba" and r.get("spearman_signed_calibration") is not None]
        signed_note = ""
        if signed and sum(signed) / len(signed) < 0:
            signed_note = (f" The signed OBA prediction is even anti-correlated with the measured single-channel ΔL "
                           f"(mean signed Spearman {sum(signed) / len(signed):+.2f} on the calibration data).")
        if {"oba", "group-exact", "magnitude", "taylor"} <= set(mean):
            out += [f"- The outside measurement (magnitude 0.62 > Taylor 0.58 > full OBA 0.47 on a 6-conv VGG) is "
                    f"reproduced: magnitude {mean['magnitude']:+.2f}, taylor {mean['taylor']:+.2f}, oba "
                    f"{mean['oba']:+.2f}. Why: `group-exact` is the same second-order expansion restricted to the "
                    f"channel's own Hessian block and scores {mean['group-exact']:+.2f}. The difference between the "
                    "two is exactly the cross term ½ δ_c·(H δ_rest)_c: with δ = −θ on every parameter, OBA "
                    "predicts each channel's share of the loss change of deleting the whole network at once, "
                    "which is far outside the Taylor expansion's range and says little about deleting that "
                    "channel alone." + signed_note]
        for m in noisy:
            s_ = m["single"]
            rows = {r["criterion"]: r for r in s_["rows"]}
            best = max(rows.values(), key=lambda r: r["spearman_heldout"])
            ge = rows.get("group-exact", {})
            ge_note = ""
            if ge.get("spearman_signed_calibration") is not None:
                ge_note = (f" group-exact's signed prediction does track the calibration ΔL it expands "
                           f"(Spearman {ge['spearman_signed_calibration']:+.2f}, median error "
                           f"{ge['median_abs_error_calibration']:.1e}) but not the held-out ΔL "
                           f"({ge['spearman_signed_heldout']:+.2f}): the single-channel effects are smaller than "
                           "the difference between two samples of the data.")
            out += [f"- **{m['model']}: single-channel ΔL is at the noise level** ({s_['channels']} channels; "
                    f"{100 * s_['true_delta_heldout']['frac_negative']:.0f}% of single removals lower the held-out "
                    f"loss, mean ΔL {s_['true_delta_heldout']['mean']:.1e} on a loss of {s_['base_loss_heldout']:.2f}). "
                    f"No criterion ranks them (best held-out Spearman: {best['criterion']} "
                    f"{best['spearman_heldout']:+.2f}); it is left out of the means above." + ge_note]
        out += oneshot_findings(fid)
    acc = results.get("accuracy")
    if acc:
        rows = [r for r in acc["rows"] if r["criterion"] != "original" and ":" not in r["criterion"]]
        wins = {}
        for key in dict.fromkeys((r["dataset"], r["model"], r["mode"], r["target_flops"]) for r in rows):
            cand = [r for r in rows if (r["dataset"], r["model"], r["mode"], r["target_flops"]) == key]
            regime = {r["criterion"] for r in rows if (r["dataset"], r["model"], r["mode"]) == key[:3]}
            if len(cand) < len(regime):
                continue  # an unfinished column (partial run)
            best = max(cand, key=lambda r: r["accuracy_mean"])
            wins.setdefault(best["criterion"], []).append(f"{key[1]} {key[2]} {key[3]:.0%}")
        out += ["- **Accuracy after fine-tuning**: best mean per (model, mode, target): "
                + "; ".join(f"{c} in {len(v)} ({', '.join(v)})" for c, v in
                            sorted(wins.items(), key=lambda kv: -len(kv[1]))) + "."]
        out += _seed_dominated(acc)
        out += regime_findings(acc)
    rec = recommend(acc) if acc else {}
    if rec:
        accs = ", ".join(f"{c} {100 * a:.2f}" for c, a in sorted(rec["criterion_mean_accuracy"].items(),
                                                                 key=lambda kv: -kv[1]))
        out += [f"- **Rule for the defaults**: the criterion with the highest accuracy averaged over the "
                f"{rec['criterion_columns']} complete columns of the accuracy table (every library criterion run; "
                f"`random` excluded): {accs}. → `{rec['criterion']}`."]
        if "normalize_mean_accuracy" in rec:
            norms = ", ".join(f"{k} {100 * a:.2f}" for k, a in sorted(rec["normalize_mean_accuracy"].items(),
                                                                      key=lambda kv: -kv[1]))
            out += [f"- **Normalisation** (measured with `{rec['normalize_base']}` over "
                    f"{rec['normalize_columns']} columns): {norms}. → `{rec['normalize']}`."]
        out += ["- Differences between the leading criteria are mostly within one standard deviation over "
                "seeds (see the table), so the ranking is weak evidence; the rule is applied as stated and "
                "`tests/test_benchmarks.py` checks that the library follows it."]
    post = recommend_post(fid, sig["criterion"].default) if fid else {}
    for opt, r in post.items():
        cells = ", ".join(f"{c['model']} {c['target']:.0%} {100 * c['diff']:+.1f} ± {100 * c['half']:.1f}"
                          for c in r["cells"])
        out += [f"- **Rule for `{opt}`** (one-shot rows, default criterion `{sig['criterion'].default}`): on when "
                "it raises the mean held-out accuracy, paired by seed, in every cell where it changes anything, "
                f"significantly in at least one: {cells} → {'on' if r['on'] else 'off'}."]
    out += [f"- **Library defaults** (`oba_fx.compress`, CLI): criterion=`{sig['criterion'].default}`, "
            f"normalize=`{sig['normalize'].default}`, signed={sig['signed'].default}, "
            f"reestimate_bn={sig['reestimate_bn'].default}, compensate={sig['compensate'].default}.", ""]
    return out


def main() -> None:
    lines = ["# Benchmarks", "", "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`.", ""]
    loaded = {p.stem: json.loads(p.read_text()) for p in sorted((ROOT / "results").glob("*.json"))}
    extra = [s for s, d in loaded.items() if s not in ORDER]
    if extra:
        raise SystemExit(f"results/{extra[0]}.json is not one of {ORDER}: merge it (accuracy.py --merge) and "
                         "delete it before generating the report")
    lines += findings({d.get("benchmark"): d for d in loaded.values()})
    paths = sorted((ROOT / "results").glob("*.json"),
                   key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem))
    for path in paths:
        d = json.loads(path.read_text())
        render = RENDERERS.get(d.get("benchmark"))
        if render is None:
            lines += [f"## {path.stem}", "", f"(no renderer; see `{path.relative_to(ROOT.parent)}`)", ""]
        else:
            lines += render(d)
    write_text(ROOT.parent / "BENCHMARKS.md", "\n".join(lines) + "\n")
    print("wrote BENCHMARKS.md")


if __name__ == "__main__":
    main()
