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

    python benchmarks/fidelity.py [--models resnet20 vgg_small] [--smoke]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import numpy as np
import torch

from common import command_line, save

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
            res = oba_fx.compress(model, example, calib, target_flops=t, criterion=c_arg, progress=False, **kw)
            ev = _loss_on(res.model, held)
            rows.append({"criterion": crit, "target_flops": t, "flops_ratio": res.report["flops"]["ratio"],
                         "accuracy": ev["accuracy"], "loss": ev["loss"]})
            if progress:
                print(f"  joint {crit:>10} @ {t:.0%}: acc {ev['accuracy']:.4f} loss {ev['loss']:.4f}", flush=True)
    return rows


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
    args = ap.parse_args()
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
