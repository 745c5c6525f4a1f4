"""Real speed-up of slimmed models: latency vs the original in PyTorch eager and onnxruntime.

For torchvision resnet50, vit_b_16, mobilenet_v2 and zoo resnet32, prune to
50% and 30% FLOPs with ``oba`` (random weights: latency does not depend on the
values, only on the shapes the criterion chose), with and without
``round_to=8``, then time every variant against the original at batch 1 and
32: medians of repeated runs, interleaved (each repeat runs every variant once
in turn), ``oba_fx.measure_latency``.

    python benchmarks/speedup.py [--models resnet50 ...] [--repeats 10] [--merge] [--smoke]

``--merge`` re-measures only the named models and keeps every other model's rows from the
existing results file (the file then records each command that produced its rows).
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from common import save

import oba_fx  # noqa: E402

MODELS = {
    "resnet50": dict(shape=(3, 224, 224), torchvision=True),
    # ViT-B/16 at batch 32 takes ~20 s per run on 2 CPU cores: fewer repeats, no round_to variant
    "vit_b_16": dict(shape=(3, 224, 224), torchvision=True, repeats=3, round_to=False),
    "mobilenet_v2": dict(shape=(3, 224, 224), torchvision=True),
    "resnet32": dict(shape=(3, 32, 32), kw={"in_channels": 3}),
}


def build(name: str, spec: dict) -> torch.nn.Module:
    import models_zoo

    torch.manual_seed(0)
    return models_zoo.create(name, **spec.get("kw", {})).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.3])
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--criterion", default="oba")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on a tiny model; writes nothing")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the named models' rows in benchmarks/results/speedup.json")
    args = ap.parse_args()
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown and not args.smoke:
        ap.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    models = MODELS
    if args.smoke:
        models = {"resnet20": dict(shape=(1, 28, 28), kw={"in_channels": 1})}
        args.models, args.targets, args.batch_sizes, args.repeats = ["resnet20"], [0.5], [1, 4], 2
    rows = []
    for name in args.models:
        spec = models[name]
        model = build(name, spec)
        shape = spec["shape"]
        gen = torch.Generator().manual_seed(0)
        calib = [(torch.randn(4, *shape, generator=gen), torch.randint(0, 10 if not spec.get("torchvision") else
                                                                       1000, (4,), generator=gen))]
        example = calib[0][0][:2]
        variants = {"original": model}
        info = {}
        for t in args.targets:
            for rt in (None, args.round_to) if spec.get("round_to", True) and args.round_to else (None,):
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    # speed depends on the widths only: random weights, no refit of them
                    res = oba_fx.compress(model, example, calib, target_flops=t, criterion=args.criterion,
                                          compensate=False, reestimate_bn=False,
                                          round_to=rt, progress=False)
                key = f"{t:.0%}" + (f" round_to={rt}" if rt else "")
                variants[key] = res.model
                info[key] = {"target_flops": t, "round_to": rt, "flops_ratio": res.report["flops"]["ratio"],
                             "params_ratio": res.report["params"]["ratio"],
                             "compress_seconds": time.perf_counter() - t0}
        print(f"== {name}: timing {len(variants)} variants", flush=True)
        lat = oba_fx.measure_latency(variants, shape, batch_sizes=args.batch_sizes,
                                     repeats=min(args.repeats, spec.get("repeats", args.repeats)), warmup=1,
                                     progress=not args.smoke)
        for r in lat["rows"]:
            extra = info.get(r["model"], {"target_flops": 1.0, "round_to": None, "flops_ratio": 1.0,
                                           "params_ratio": 1.0})
            row = {"model": name, "variant": r["model"], **extra, **{k: v for k, v in r.items() if k != "model"}}
            row["flops_speedup"] = 1.0 / extra["flops_ratio"]
            row["speedup_vs_flops"] = r["speedup"] / row["flops_speedup"]
            rows.append(row)
            print(f"  {r['model']:>18} {r['backend']:>11} b{r['batch']:<3} {r['median_ms']:9.2f} ms  "
                  f"x{r['speedup']:.2f} (FLOPs x{row['flops_speedup']:.2f})", flush=True)
    if args.smoke:
        assert rows and all(r["median_ms"] > 0 for r in rows)
        print("smoke ok")
        return
    repeats = {m: min(args.repeats, MODELS[m].get("repeats", args.repeats)) for m in args.models}
    extra = {}
    if args.merge:
        rows, repeats, extra = _merge(rows, repeats, args)
    path = save("speedup", {
        "description": "latency of slimmed vs original models (random weights; structure chosen by the criterion "
                       "on random calibration data), medians of interleaved runs, float32, CPU",
        "criterion": args.criterion, "repeats": repeats, "threads": torch.get_num_threads(), "rows": rows, **extra,
    })
    print("wrote", path)


def _merge(rows, repeats, args):
    """Rows of the models not re-measured, kept from the existing file, plus the commands behind them."""
    import json

    from common import RESULTS, command_line, machine

    path = RESULTS / "speedup.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    if old.get("criterion", args.criterion) != args.criterion:
        raise SystemExit(f"--merge: {path} was measured with criterion {old['criterion']!r}, not {args.criterion!r}")
    kept = [r for r in old["rows"] if r["model"] not in args.models]
    commands = old.get("commands") or [{"command": old.get("command"), "machine": old.get("machine"),
                                        "models": sorted({r["model"] for r in old["rows"]})}]
    commands = [{**c, "models": [m for m in c["models"] if m not in args.models]} for c in commands
                if set(c["models"]) - set(args.models)]
    commands.append({"command": command_line(), "machine": machine(), "models": list(args.models)})
    return kept + rows, {**old.get("repeats", {}), **repeats}, {"commands": commands}


if __name__ == "__main__":
    sys.exit(main())
