"""Criterion fidelity: predicted vs true loss change of removing single channels, and joint one-shot removal.

For each trained Fashion-MNIST model (zoo resnet20, vgg_small, vit_small, trained
by this project, see ``models_zoo.trained``):

1. Single groups.  For every channel of every prunable group (or a seeded
   sample of ``--max-channels``), the true ΔL of removing that channel alone is
   measured by rewriting the model (``Graph.prune``) and evaluating the loss on
   held-out data (test images) and on the calibration data itself.  Each
   criterion's per-channel score (``group_scores``, ranked as compress ranks
   it: |ΔL| for the loss-change criteria, the score itself for the baselines)
   is compared with the true ΔL: Spearman and Kendall, over all channels and
   within each group (mean over groups with ≥ 5 channels).
2. Joint removal.  One-shot ``compress`` to 80/60/40% FLOPs without fine-tuning;
   held-out accuracy and loss per criterion, plus an ablation oracle that ranks
   by the measured single-channel ΔL (small models only).
3. One-shot removal three ways (``--oneshot``).  For each calibration seed
   (``--seeds``: the calibration sample), criterion (``oba-joint`` included) and
   target (80/60%), one ``compress`` selects the removal; the same removal is
   then evaluated on the held-out images plain (sliced weights and statistics),
   with BatchNorm statistics re-estimated on the calibration batches, and with
   least-squares compensation of every consumer followed by the re-estimation
   (``Graph.compensate``, ``oba_fx.reestimate_batchnorm``).  Written into each
   model's ``oneshot`` entry of results/fidelity.json (the single-channel
   results are kept).

    python benchmarks/fidelity.py [--models resnet20 vgg_small] [--smoke]
    python benchmarks/fidelity.py --oneshot --models resnet20 vgg_small vit_small --seeds 0 1 2 [--jobs 2]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import numpy as np
import torch

from common import command_line, save, t95

import oba_fx  # noqa: E402  (common puts the repo on sys.path)

CRITERIA = ["oba", "oba-network", "oba-gn", "oba-k3", "group-exact", "taylor", "obd", "magnitude"]
DELTA_L = {"oba", "oba-network", "oba-gn", "oba-k3", "group-exact"}  # criteria that predict ΔL itself


def _loss_on(model, batches):
    return oba_fx.evaluate(model, batches)


def _data(args):
    """(model factory, calibration batches, held-out batches, example input)."""
    import models_zoo

    if args.smoke:
        g = torch.Generator().manual_seed(0)
        calib = [(torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g))
                 for _ in range(2)]
        held = [(torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))]

        def make(name):
            torch.manual_seed(0)
            kw = {"in_channels": 1, **({"img_size": 28} if name.startswith("vit") else {})}
            return models_zoo.create(name, **kw).eval()

        return make, calib, held
    spec = oba_fx.get_dataset("fashion-mnist", args.data)
    calib = spec.calibration(args.calib_batches, args.calib_batch_size, seed=args.seed)
    test = list(spec.test(256))
    gen = torch.Generator().manual_seed(args.seed + 17)
    xs = torch.cat([b[0] for b in test])
    ys = torch.cat([b[1] for b in test])
    idx = torch.randperm(len(ys), generator=gen)[:args.heldout]
    held = [(xs[idx[i:i + 256]], ys[idx[i:i + 256]]) for i in range(0, len(idx), 256)]
    return (lambda name: models_zoo.trained(name, data=args.data)), calib, held


def _spearman(a, b):
    from scipy.stats import kendalltau, spearmanr

    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(a, b).statistic), float(kendalltau(a, b).statistic)


def single_group(model, graph, calib, held, criteria, max_channels, seed, progress=True):
    from tqdm.auto import tqdm

    groups = graph.prunable_groups
    channels = [(g.id, c) for g in groups for c in range(g.size) if g.size > 1]
    total = len(channels)
    if max_channels and len(channels) > max_channels:
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(channels), max_channels, replace=False))
        channels = [channels[i] for i in pick]
    base_h = _loss_on(graph.gm, held)["loss"]
    base_c = _loss_on(graph.gm, calib)["loss"]
    true_h, true_c = [], []
    t0 = time.perf_counter()
    for gid, c in tqdm(channels, desc="single-channel ablations", disable=not progress):
        slim = graph.prune({gid: [c]})
        true_h.append(_loss_on(slim, held)["loss"] - base_h)
        true_c.append(_loss_on(slim, calib)["loss"] - base_c)
    t_ablate = time.perf_counter() - t0
    true_h, true_c = np.array(true_h), np.array(true_c)
    preds, seconds = {}, {}
    for crit in criteria:
        t0 = time.perf_counter()
        if crit == "group-exact":  # exact (vmap), and only for the ablated channels: one HVP per channel
            sub = {}
            for gid, c in channels:
                sub.setdefault(gid, []).append(c)
            scores, _ = oba_fx.group_exact_scores(graph, calib, method="vmap", progress=progress,
                                                  channels=None if len(channels) == total else sub)
        else:
            scores = oba_fx.group_scores(graph, calib, crit, progress=False)
        seconds[crit] = time.perf_counter() - t0
        preds[crit] = scores
    rows = []
    for crit, scores in preds.items():
        raw = np.array([float(scores[gid][c]) for gid, c in channels])
        rank = np.abs(raw) if crit in DELTA_L else raw  # what compress ranks by
        row = {"criterion": crit, "score_seconds": seconds[crit]}
        for tag, truth in (("heldout", true_h), ("calibration", true_c)):
            rho, tau = _spearman(rank, truth)
            row[f"spearman_{tag}"], row[f"kendall_{tag}"] = rho, tau
        if crit in DELTA_L:
            row["spearman_signed_heldout"] = _spearman(raw, true_h)[0]
            row["spearman_signed_calibration"] = _spearman(raw, true_c)[0]
            row["median_abs_error_calibration"] = float(np.median(np.abs(raw - true_c)))
        within = []
        for g in graph.prunable_groups:
            sel = [i for i, (gid, _) in enumerate(channels) if gid == g.id]
            if len(sel) >= 5:
                rho = _spearman(rank[sel], true_h[sel])[0]
                if not math.isnan(rho):
                    within.append((len(sel), rho, g.label if hasattr(g, "label") else str(g.id)))
        if within:
            row["spearman_within_group_mean"] = float(np.mean([r for _, r, _ in within]))
            row["within_group"] = [{"group": lab, "channels": n, "spearman": r} for n, r, lab in within]
        rows.append(row)
    oracle = {}
    for (gid, c), v in zip(channels, true_c):
        oracle.setdefault(gid, {})[c] = float(v)
    return {"channels": len(channels), "channels_total": total, "ablation_seconds": t_ablate, "base_loss_heldout": base_h,
            "base_loss_calibration": base_c, "true_delta_heldout": {"mean": float(true_h.mean()),
                                                                     "max": float(true_h.max()),
                                                                     "frac_negative": float((true_h < 0).mean())},
            "rows": rows}, oracle, len(channels) == sum(g.size for g in groups if g.size > 1)


def joint(model, calib, held, criteria, targets, oracle, example, progress=True):
    rows = []
    base = _loss_on(model, held)
    rows.append({"criterion": "original", "target_flops": 1.0, "accuracy": base["accuracy"], "loss": base["loss"]})
    names = list(criteria) + (["oracle (single-channel ablation)"] if oracle else [])
    for crit in names:
        for t in targets:
            if crit.startswith("oracle"):
                def crit_fn(graph, batches, _o=oracle):
                    return {g.id: torch.tensor([_o.get(g.id, {}).get(c, 0.0) for c in range(g.size)],
                                               dtype=torch.float64) for g in graph.prunable_groups}
                c_arg = crit_fn
            else:
                c_arg = crit
            kw = {"probes": 8} if crit == "group-exact" else {}
            # round_to=None: the criteria compared at free widths, as the results record
            res = oba_fx.compress(model, example, calib, target_flops=t, criterion=c_arg, progress=False,
                                  compensate=False, reestimate_bn=False, round_to=None, **kw)
            ev = _loss_on(res.model, held)
            rows.append({"criterion": crit, "target_flops": t, "flops_ratio": res.report["flops"]["ratio"],
                         "accuracy": ev["accuracy"], "loss": ev["loss"]})
            if progress:
                print(f"  joint {crit:>10} @ {t:.0%}: acc {ev['accuracy']:.4f} loss {ev['loss']:.4f}", flush=True)
    return rows


ONESHOT_CRITERIA = ["magnitude", "taylor", "oba", "group-exact", "oba-joint"]
WAYS = ("plain", "batchnorm", "batchnorm+compensation")


def _removal_of(graph, report):
    """The compress report's removal as {group id of ``graph``: channels} (groups matched by their key)."""

    (step,) = report["step_reports"]
    keys = {g.key: g.id for g in graph.prunable_groups}
    return {keys[k]: list(cs) for k, cs in step["removed_channels"].items()}


class _Memo:
    """Scores depend on the calibration sample, not on the target: the benchmark scores each (model, seed,
    criterion) once and reuses it for every target (compress itself re-scores every call), and group-exact's
    two parts (first-order term, exact self terms) once per (model, seed) for both group-exact and oba-joint.
    Group ids are stable across re-traces of one model. ``key`` is (model, seed)."""

    def __init__(self):
        import oba_fx.scoring  # noqa: F401  (the modules, not the re-exported functions)

        self.comp, self.scoring = sys.modules["oba_fx.compress"], sys.modules["oba_fx.scoring"]
        self.orig_parts = self.scoring.group_exact_parts
        self.orig_scores = self.comp.group_scores
        self.cache = {}
        self.key = None

    def __enter__(self):
        def parts(graph, calibration, loss_fn, method, probes, seed, *a, **k):
            return self._get(("parts",), self.orig_parts, (graph, calibration, loss_fn, method, probes, seed) + a, k)

        def scores(graph, batches, criterion, *a, **k):
            return self._get(("scores", criterion), self.orig_scores, (graph, batches, criterion) + a, k)

        self.comp.group_exact_parts = self.scoring.group_exact_parts = parts
        self.comp.group_scores = scores
        return self

    def _get(self, what, fn, a, k):
        key = self.key + what
        if key not in self.cache:
            self.cache[key] = fn(*a, **k)
        return self.cache[key]

    def __exit__(self, *exc):
        self.comp.group_exact_parts = self.scoring.group_exact_parts = self.orig_parts
        self.comp.group_scores = self.orig_scores


def oneshot(name, model, example, calib_for, held, criteria, targets, seeds, progress=True):
    """Rows (seed, criterion, target) with the held-out accuracy/loss of one removal evaluated three ways."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = oba_fx.trace(model, example)
    base = _loss_on(model, held)
    rows = []
    with _Memo() as memo:
        for seed in seeds:
            calib = calib_for(seed)
            memo.key = (name, seed)
            for crit in criteria:
                for t in targets:
                    t0 = time.perf_counter()
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        # the selection only: the three ways are applied to its removal below
                        res = oba_fx.compress(model, example, calib, target_flops=t, criterion=crit,
                                              progress=False, compensate=False, reestimate_bn=False, round_to=None)
                    t_compress = time.perf_counter() - t0
                    removal = _removal_of(graph, res.report)
                    step = res.report["step_reports"][0]
                    ways = {}
                    for way in WAYS:
                        slim = graph.prune(removal)
                        if way == "plain":  # the same model compress returned
                            with torch.no_grad():
                                x = held[0][0][:64]
                                assert torch.allclose(slim(x), res.model(x), atol=1e-4, rtol=1e-4)
                        info = {}
                        if way.endswith("compensation"):
                            info["compensation"] = graph.compensate(slim, removal, calib)
                        if way != "plain":
                            info["batchnorm"] = oba_fx.reestimate_batchnorm(slim, calib)
                        ev = _loss_on(slim, held)
                        ways[way] = {"accuracy": ev["accuracy"], "loss": ev["loss"]}
                        if way == "batchnorm+compensation":
                            ways[way]["compensated_layers"] = len(info["compensation"].get("layers", []))
                    row = {"seed": seed, "criterion": crit, "target_flops": t,
                           "flops_ratio": res.report["flops"]["ratio"], "seconds_compress": t_compress,
                           "predicted_delta_loss_calibration": step["predicted_delta_loss"],
                           "measured_delta_loss_calibration": step["measured_delta_loss_rewrite"],
                           "ways": ways}
                    if "joint" in step:
                        j = step["joint"]
                        row["joint"] = {k: j[k] for k in ("start", "starts", "predicted_start", "predicted",
                                                          "hvps", "swapped_channels")}
                        row["joint"]["accepted_rounds"] = sum(r["accepted"] for r in j["rounds"])
                    rows.append(row)
                    if progress:
                        print(f"  seed {seed} {crit:>11} @ {t:.0%}: " + ", ".join(
                            f"{w} {100 * v['accuracy']:.1f}%" for w, v in ways.items())
                            + f" ({t_compress:.0f} s)", flush=True)
    return {"original": {"accuracy": base["accuracy"], "loss": base["loss"]}, "seeds": list(seeds),
            "targets": list(targets), "criteria": list(criteria), "ways": list(WAYS), "rows": rows,
            "t95": _t95_table(len(seeds))}


def _t95_table(n_seeds):
    return {str(n): t95(n) for n in range(2, n_seeds + 1)}


def _oneshot_model(args, name, seeds, threads=None):
    """The one-shot entry of one model over ``seeds`` (a worker of ``--jobs`` runs one seed)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    make, _, held = _data(args)
    model = make(name)
    if args.smoke:
        def calib_for(seed, _g=torch.Generator()):
            _g.manual_seed(seed)
            return [(torch.randn(4, 1, 28, 28, generator=_g), torch.randint(0, 10, (4,), generator=_g))
                    for _ in range(2)]
    else:
        spec = oba_fx.get_dataset("fashion-mnist", args.data)

        def calib_for(seed, _s=spec):
            return _s.calibration(args.calib_batches, args.calib_batch_size, seed=seed)
    example = held[0][0][:2]
    entry = oneshot(name, model, example, calib_for, held, args.criteria, args.targets, seeds,
                    progress=not args.smoke)
    return entry, os.getpid()


def _merge_seeds(parts):
    """One entry from per-seed entries of the same model (rows in seed order, as one process writes them)."""
    first = parts[0]
    for p in parts[1:]:
        if p["original"] != first["original"]:
            raise RuntimeError("the per-seed workers evaluated different original models")
    seeds = [s for p in parts for s in p["seeds"]]
    return dict(first, seeds=seeds, rows=[r for p in parts for r in p["rows"]],
                t95=_t95_table(len(seeds)))


def main_oneshot(args):
    import json

    from common import RESULTS, machine

    out, workers = {}, set()
    for name in args.models:
        print(f"== {name} (one-shot, three ways)", flush=True)
        jobs = min(args.jobs, len(args.seeds))
        if jobs > 1:  # one process per calibration seed; scores are memoised per seed, so nothing is lost
            import concurrent.futures as cf
            import multiprocessing as mp

            threads = 1 if args.smoke else max(1, (os.cpu_count() or 1) // jobs)
            with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
                parts = list(pool.map(_oneshot_model, [args] * len(args.seeds), [name] * len(args.seeds),
                                      [[s] for s in args.seeds], [threads] * len(args.seeds)))
            out[name] = _merge_seeds([e for e, _ in parts])
            workers |= {pid for _, pid in parts}
        else:
            out[name] = _oneshot_model(args, name, args.seeds)[0]
    if args.smoke:
        assert all(len(v["rows"]) == len(args.criteria) * len(args.targets) * len(args.seeds) for v in out.values())
        digest = [[r["seed"], r["criterion"], r["target_flops"], round(r["flops_ratio"], 9)]
                  + [round(w["accuracy"], 9) for w in r["ways"].values()] for v in out.values() for r in v["rows"]]
        print("smoke rows", json.dumps(digest))
        print("smoke worker processes", len(workers - {os.getpid()}))
        print("smoke ok")
        return
    path = RESULTS / "fidelity.json"
    old = json.loads(path.read_text())
    by = {m["model"]: m for m in old["models"]}
    for name, v in out.items():
        if name not in by:
            raise SystemExit(f"results/fidelity.json has no single-channel entry for {name}: run the single-channel "
                             "part first")
        by[name]["oneshot"] = dict(v, command=command_line(), machine=machine(), heldout_samples=args.heldout,
                                   calibration={"batches": args.calib_batches, "batch_size": args.calib_batch_size})
    old.pop("benchmark", None)  # save() writes it; the file's machine and commands stay those of the single part
    # a one-shot run of some models leaves the other models' one-shot entries, so their commands stay listed
    old["commands"] = [c for c in old.get("commands", []) if c != command_line()] + [command_line()]
    print("wrote", save("fidelity", old))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "vgg_small", "vit_small"])
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=64)
    ap.add_argument("--heldout", type=int, default=1024, help="held-out test samples for the true ΔL")
    ap.add_argument("--max-channels", type=int, default=400, help="sample this many channels per model (0: all)")
    ap.add_argument("--oracle-max-channels", type=int, default=1200,
                    help="run the ablation oracle only when every channel was ablated and there are at most this many")
    ap.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.6, 0.4])
    ap.add_argument("--data", help="Fashion-MNIST folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--merge", action="store_true",
                    help="keep the models in results/fidelity.json that this run does not measure")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run: random weights and data; writes nothing")
    ap.add_argument("--oneshot", action="store_true",
                    help="only the one-shot removal three ways (plain, BatchNorm re-estimated, compensated), over "
                         "--seeds; merged into results/fidelity.json")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration seeds for --oneshot")
    ap.add_argument("--jobs", type=int, default=1,
                    help="--oneshot: run the seeds in this many processes (CPU threads split among them); the "
                         "result is the same as one process gives")
    args = ap.parse_args()
    if args.oneshot:
        if args.criteria == CRITERIA:
            args.criteria = ONESHOT_CRITERIA
        if args.targets == [0.8, 0.6, 0.4]:
            args.targets = [0.8, 0.6]
        if args.smoke:
            args.models, args.criteria, args.targets, args.seeds = ["resnet20"], ["magnitude", "oba-joint"], [0.7], \
                [0, 1]
        torch.manual_seed(args.seed)
        return main_oneshot(args)
    if args.smoke:
        args.models, args.criteria, args.max_channels, args.targets = ["resnet20"], ["oba", "group-exact", "taylor",
                                                                                   "magnitude"], 12, [0.8]
    torch.manual_seed(args.seed)
    make, calib, held = _data(args)
    out = []
    for name in args.models:
        print(f"== {name}", flush=True)
        model = make(name)
        example = calib[0][0][:2]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = oba_fx.trace(model, example)
        single, oracle, complete = single_group(model, graph, calib, held, args.criteria, args.max_channels,
                                                args.seed, progress=not args.smoke)
        for r in single["rows"]:
            print(f"  {r['criterion']:>12}: spearman held-out {r['spearman_heldout']:+.3f} "
                  f"(calibration {r['spearman_calibration']:+.3f}), within-group "
                  f"{r.get('spearman_within_group_mean', float('nan')):+.3f}", flush=True)
        use_oracle = complete and single["channels"] <= args.oracle_max_channels
        jr = joint(model, calib, held, args.criteria, args.targets, oracle if use_oracle else None, example,
                   progress=not args.smoke)
        f, p = oba_fx.count(model, example[:1])
        out.append({"model": name, "flops": f, "params": p, "max_channels": args.max_channels, "single": single,
                    "joint": jr})
    if args.smoke:
        assert all(r["single"]["rows"] and r["joint"] for r in out)
        print("smoke ok")
        return
    commands = []
    if args.merge:
        import json

        from common import RESULTS

        old = json.loads((RESULTS / "fidelity.json").read_text())
        done = {m["model"] for m in out}
        kept = [dict(m, max_channels=m.get("max_channels", old.get("max_channels"))) for m in old["models"]
                if m["model"] not in done]
        out = kept + out
        commands = old.get("commands", [old.get("command", "")])
    path = save("fidelity", {
        "commands": commands + [command_line()],
        "description": "single-channel removal: criterion score vs measured loss change (true ΔL by rewriting the "
                       "model without that channel); joint one-shot removal without fine-tuning",
        "calibration": {"batches": args.calib_batches, "batch_size": args.calib_batch_size,
                        "source": "Fashion-MNIST train, seeded"},
        "heldout_samples": args.heldout, "max_channels": args.max_channels, "targets": args.targets,
        "models": out,
    })
    print("wrote", path)


if __name__ == "__main__":
    sys.exit(main())
