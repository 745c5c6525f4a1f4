"""Paper-style accuracy table: accuracy after pruning + the same fine-tuning budget, per criterion.

FLOPs targets 50/30/14%, criteria oba, oba-network, group-exact, taylor, obd,
magnitude, random, one-shot and iterative (steps=5), seeds 0..2 (a seed picks
the calibration sample, the fine-tuning data order and the random criterion's
draw; the trained model is the same).  Every run gets the same fine-tuning
budget: ``--finetune-epochs`` epochs over ``--finetune-samples`` training
images, SGD + cosine + KD from the original.  An iterative run prunes in 5
steps, re-scoring on fresh calibration batches at each step; the epochs are
split over the steps when they divide evenly, and otherwise (the default single
epoch) all fine-tuning runs after the last step, so the iterative column then
measures re-scoring between removals, not fine-tuning between them.  Runs on
Fashion-MNIST with models trained by this project (``models_zoo.trained``); with ``--cifar DIR`` it also runs on CIFAR-10 (models
trained here first, which takes long on a CPU).

    python benchmarks/accuracy.py [--models resnet20] [--seeds 0 1 2] [--smoke]
"""
from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import sys
import time
import warnings

import torch

from common import COMP, command_line, save

import oba_fx  # noqa: E402

CRITERIA = ["oba", "oba-network", "group-exact", "taylor", "obd", "magnitude", "random"]
# A criterion name ending in common.COMP runs with compensate=True (least-squares refit of the consumers).


@functools.lru_cache(maxsize=4)
def _subset(name, data, n):
    return oba_fx.get_dataset(name, data, limit_train=n)


ITERATIVE_STEPS = 5  # stored in the results as "iterative_steps"; report.py describes the budget from it


def run_one(model, spec, calib_seed, target, criterion, steps, args, test):
    calib = spec.calibration(args.calib_batches * steps, args.calib_batch_size, seed=calib_seed)
    sub = _subset(spec.name, args.data, args.finetune_samples) if spec.name == "fashion-mnist" else spec
    train = sub.train(128, seed=calib_seed + 1)
    per_step = args.finetune_epochs / steps

    def ft(m, step):
        # the same total budget for one-shot and iterative: epochs are split over the steps
        epochs = int(round(per_step * step)) - int(round(per_step * (step - 1)))
        if epochs:
            oba_fx.finetune(m, train, epochs=epochs, lr=args.lr, teacher=model, progress=False)

    if steps > 1 and args.finetune_epochs % steps:
        # fractional epochs per step: fine-tune once at the end instead
        def ft(m, step):  # noqa: F811
            if step == steps:
                oba_fx.finetune(m, train, epochs=args.finetune_epochs, lr=args.lr, teacher=model, progress=False)
    criterion, comp = (criterion[:-len(COMP)], True) if criterion.endswith(COMP) else (criterion, False)
    criterion, _, normalize = criterion.partition(":")
    kw = {"probes": 8} if criterion == "group-exact" else {}
    if normalize:
        kw["normalize"] = normalize
    # explicit, so a recorded column reproduces whatever the library defaults are now
    kw["compensate"] = comp
    kw["reestimate_bn"] = bool(args.reestimate_bn)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = oba_fx.compress(model, calib[0][0][:2], calib, target_flops=target, criterion=criterion, steps=steps,
                              batches_per_step=args.calib_batches, finetune=ft if args.finetune_epochs else None,
                              # round_to=None: the criteria compared at free widths, as the results record
                              seed=calib_seed, progress=False, round_to=None, **kw)
    ev = oba_fx.evaluate(res.model, test)
    return {"accuracy": ev["accuracy"], "loss": ev["loss"], "flops_ratio": res.report["flops"]["ratio"],
            "params_ratio": res.report["params"]["ratio"], "seconds": time.perf_counter() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet32", "vit_small"])
    ap.add_argument("--criteria", nargs="+", default=CRITERIA)
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3, 0.14])
    ap.add_argument("--modes", nargs="+", default=["one-shot", "iterative"], choices=["one-shot", "iterative"])
    ap.add_argument("--label", help="record the runs under this mode name instead of one-shot/iterative (a second "
                                    "budget regime, e.g. full-budget, kept apart from the cheap columns)")
    ap.add_argument("--reestimate-bn", action="store_true",
                    help="re-estimate BatchNorm statistics on the calibration batches after each rewrite")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--finetune-samples", type=int, default=10000)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--calib-batch-size", type=int, default=64)
    ap.add_argument("--test-samples", type=int, default=10000)
    ap.add_argument("--data", help="Fashion-MNIST folder")
    ap.add_argument("--cifar", help="a CIFAR-10 folder: also run on CIFAR-10")
    ap.add_argument("--append", "--resume", action="store_true", dest="append",
                    help="add to the --out results file instead of replacing it: runs already recorded there with "
                         "the same cell, seed and budget are skipped (so a cut grid resumes), others are added")
    ap.add_argument("--out", default="accuracy",
                    help="results file name under benchmarks/results (default accuracy); use another name for a "
                         "run in parallel, then --merge it")
    ap.add_argument("--merge", nargs="+", metavar="NAME",
                    help="merge these results files (rows and runs) into --out and exit")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run: random weights, synthetic data")
    args = ap.parse_args()
    if args.smoke:
        return smoke()
    if args.merge:
        return merge(args.out, args.merge)
    import models_zoo

    spec = oba_fx.get_dataset("fashion-mnist", args.data, limit_test=args.test_samples)
    test = spec.test(512)
    rows, raw, commands = [], [], []
    if args.append:
        import json

        from common import RESULTS

        path = RESULTS / f"{args.out}.json"
        if path.exists():
            old = json.loads(path.read_text())
            rows, raw = old["rows"], old["runs"]
            commands = old.get("commands", [old.get("command", "")])
    args._commands = commands
    datasets = [("fashion-mnist", spec, test)]
    if args.cifar:
        cs = oba_fx.get_dataset("cifar10", args.cifar, limit_test=args.test_samples)
        datasets.append(("cifar10", cs, cs.test(512)))
    for ds_name, ds, ds_test in datasets:
        for name in args.models:
            if ds_name == "fashion-mnist":
                model = models_zoo.trained(name, data=args.data)
            else:
                model = _train_cifar(name, ds)
            base = oba_fx.evaluate(model, ds_test)
            print(f"== {ds_name} {name}: original accuracy {base['accuracy']:.4f}", flush=True)
            # a labelled regime (full-budget) keeps its own original row: it may be measured on another test set
            # or another training of the checkpoint than the cheap columns
            orig_mode = args.label or "-"
            rows = [x for x in rows if not (x["dataset"] == ds_name and x["model"] == name
                                            and x["criterion"] == "original" and x["mode"] == orig_mode)]
            rows.append({"dataset": ds_name, "model": name, "criterion": "original", "mode": orig_mode,
                         "target_flops": 1.0, "accuracy_mean": base["accuracy"], "accuracy_std": 0.0, "seeds": 1,
                         "test_samples": args.test_samples})
            # seed-major order: a grid cut short still holds every criterion at the seeds it finished, so the
            # differences paired by seed can be taken; each run is saved as soon as it ends (--resume skips it)
            for target, mode in itertools.product(args.targets, args.modes):
                steps = ITERATIVE_STEPS if mode == "iterative" else 1
                for seed, crit in itertools.product(args.seeds, args.criteria):
                    key = (ds_name, name, crit, args.label or mode, target)
                    if any(_key(x) == key and x["seed"] == seed and x.get("budget") == _budget(args) for x in raw):
                        print(f"  {target:.0%} {args.label or mode} {crit} seed {seed}: done, skipped", flush=True)
                        continue
                    r = run_one(model, ds, seed, target, crit, steps, args, ds_test)
                    r.update(dataset=ds_name, model=name, criterion=crit, mode=args.label or mode,
                             target_flops=target, seed=seed, budget=_budget(args))
                    # runs of this cell made with another budget are dropped, never pooled with this one
                    raw = [x for x in raw if not (_key(x) == key and (x["seed"] == seed
                                                                      or x.get("budget") != r["budget"]))] + [r]
                    rows = [x for x in rows if _key(x) != key] + [_row(key, raw, args)]
                    print(f"  {target:.0%} {args.label or mode:>9} {crit:>12} seed {seed}: "
                          f"{100 * r['accuracy']:.2f} ({r['seconds']:.0f} s)", flush=True)
                    save(args.out, _payload(args, rows, raw, partial=True))
    path = save(args.out, _payload(args, rows, raw, partial=False))
    print("wrote", path)


def _row(key, raw, args):
    """The summary row of one cell, from every run of that cell recorded with this budget."""
    rs = [x for x in raw if _key(x) == key and x.get("budget") == _budget(args)]
    accs = [x["accuracy"] for x in rs]
    ds_name, name, crit, mode, target = key
    return {"dataset": ds_name, "model": name, "criterion": crit, "mode": mode, "target_flops": target,
            "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "seeds": len(accs), "flops_ratio_mean": statistics.mean(x["flops_ratio"] for x in rs),
            "budget": _budget(args)}


def _budget(args):
    return {"finetune_epochs": args.finetune_epochs, "finetune_samples": args.finetune_samples,
            "calib_batches": args.calib_batches, "calib_batch_size": args.calib_batch_size,
            "test_samples": args.test_samples, "reestimate_bn": bool(getattr(args, "reestimate_bn", False))}


def _key(x):
    return x["dataset"], x["model"], x["criterion"], x["mode"], x["target_flops"]


def merge(out, names):
    """Fold other results files into ``out``: their rows replace rows with the same key."""
    import json

    from common import RESULTS

    def backfill(d):  # rows of older files carry their budget in the file's settings only
        st = d.get("settings", {})
        for r in d["rows"]:
            if "budget" not in r and r["criterion"] != "original" and st:
                r["budget"] = _budget(argparse.Namespace(**st))
        return d

    base = backfill(json.loads((RESULTS / f"{out}.json").read_text()))
    base.setdefault("commands", [base.get("command", "")])
    others = [backfill(json.loads((RESULTS / f"{name}.json").read_text())) for name in names]
    for name, other in zip(names, others):
        label = other.get("settings", {}).get("label")
        for r in other["rows"]:  # files written before originals were kept per labelled regime
            if label and r["criterion"] == "original" and r["mode"] == "-":
                r["mode"] = label
        if other.get("partial"):
            print(f"note: {name} is a partial run; merging the cells it finished")
        keys = {_key(r) for r in other["rows"]}
        base["rows"] = [r for r in base["rows"] if _key(r) not in keys] + other["rows"]
        base["runs"] = [r for r in base["runs"] if _key(r) not in keys] + other["runs"]
        base["commands"] += [c for c in other.get("commands", [other.get("command", "")]) if c not in base["commands"]]
    steps = {d["iterative_steps"] for d in [base, *others] if "iterative_steps" in d}
    if len(steps) > 1:
        raise SystemExit(f"cannot merge runs made with different iterative step counts {sorted(steps)}")
    base.update(partial=False, **({"iterative_steps": steps.pop()} if steps else {}))
    from oba_fx.io import write_json

    print("wrote", write_json(RESULTS / f"{out}.json", base))


def _payload(args, rows, raw, partial):
    return {"description": "test accuracy after pruning to a FLOPs target and the same fine-tuning budget "
                           f"({args.finetune_epochs} epoch(s) over {args.finetune_samples} training images, KD from "
                           "the original), mean ± std over seeds",
            "settings": {k: v for k, v in vars(args).items() if k not in ("smoke", "_commands", "append", "merge", "out")},
            "partial": partial, "commands": args._commands + [command_line()],
            "iterative_steps": ITERATIVE_STEPS,
            "rows": rows, "runs": raw}


def _train_cifar(name, spec):
    import models_zoo

    torch.manual_seed(0)
    kw = {"in_channels": 3, "num_classes": spec.num_classes, **({"img_size": 32} if name.startswith("vit") else {})}
    model = models_zoo.create(name, **kw)
    oba_fx.train(model, spec.train(128), 30, lr=0.1)
    return model.eval()


def smoke():
    import models_zoo

    class _Spec:  # synthetic stand-in for a DataSpec
        name = "synthetic"

        def calibration(self, b, bs, seed):
            g = torch.Generator().manual_seed(seed)
            return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g))
                    for _ in range(b)]

        def train(self, bs, seed=0):
            return self.calibration(2, bs, seed + 100)

    spec = _Spec()
    torch.manual_seed(0)
    model = models_zoo.create("resnet20", in_channels=1).eval()
    args = argparse.Namespace(calib_batches=1, calib_batch_size=8, finetune_epochs=1, finetune_samples=16, lr=0.01,
                              data=None, reestimate_bn=True)
    test = spec.calibration(1, 16, 999)
    for crit, steps in (("oba", 1), ("random", 2), ("magnitude" + COMP, 1)):
        r = run_one(model, spec, 0, 0.5, crit, steps, args, test)
        assert abs(r["flops_ratio"] - 0.5) < 0.02, r
    print("smoke ok")


if __name__ == "__main__":
    sys.exit(main())
