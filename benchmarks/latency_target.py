"""``compress(target_latency=...)``: does the slim model land within +-10% of the requested latency?

For the demo's resnet20 (Fashion-MNIST shape), torchvision resnet50 and mobilenet_v2 (random weights:
latency depends on the widths only), in PyTorch eager and onnxruntime on the CPU, prune to ``--target`` of
the original's latency with the default criterion and widths, then re-measure the result independently of
``compress``'s own timing: a fresh ``oba_fx.measure_latency`` run, original and slim interleaved, more
repeats. Reports the requested, predicted, compress-measured and re-measured fractions, the FLOPs kept, the
attempts the landing loop took and the seconds ``compress`` spent (the latency table is measured on the first
run per machine and cached; ``--fresh-cache`` measures it again).

    python benchmarks/latency_target.py [--models resnet20 resnet50 mobilenet_v2] [--backends pytorch onnxruntime]
                                        [--target 0.5] [--batch N] [--repeats 20] [--smoke]

A target below what channel removal can reach (a small model at batch 1 in PyTorch eager spends most of its
time in per-op overhead) is recorded as unreachable with compress's own message, not skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings

import torch

from common import save

import oba_fx  # noqa: E402

MODELS = {
    "resnet20": dict(shape=(1, 28, 28), kw={"in_channels": 1}, classes=10, batches=(1, 32)),
    "resnet50": dict(shape=(3, 224, 224), classes=1000, batches=(1,)),
    "mobilenet_v2": dict(shape=(3, 224, 224), classes=1000, batches=(1,)),
}
TOLERANCE = 0.10


def run_one(name: str, backend: str, target: float, batch: int, repeats: int) -> dict:
    import models_zoo

    spec = MODELS[name]
    torch.manual_seed(0)
    model = models_zoo.create(name, **spec.get("kw", {})).eval()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, *spec["shape"], generator=gen), torch.randint(0, spec["classes"], (4,), generator=gen))]
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = oba_fx.compress(model, calib[0][0][:2], calib, target_latency=target, backend=backend,
                                  latency_batch=batch, compensate=False, reestimate_bn=False, progress=True)
    except ValueError as e:  # the latency floor (overheads no channel removal shrinks) is above the target
        if "cannot be reached" not in str(e):
            raise
        msg = str(e).splitlines()[0]
        print(f"  {name:>12} {backend:>11} b{batch}: target {target:.0%} UNREACHABLE: {msg}", flush=True)
        return {"model": name, "backend": backend, "batch": batch, "target_fraction": target, "reachable": False,
                "reason": msg, "compress_seconds": time.perf_counter() - t0}
    seconds = time.perf_counter() - t0
    lat = res.report["latency"]
    check = oba_fx.measure_latency({"original": model, "slim": res.model}, spec["shape"], batch_sizes=(batch,),
                                   repeats=repeats, warmup=2, onnx=backend == "onnxruntime",
                                   pytorch=backend == "pytorch", progress=False)
    ms = {r["model"]: r["median_ms"] for r in check["rows"]}
    frac = ms["slim"] / ms["original"]
    row = {"model": name, "backend": backend, "batch": batch, "target_fraction": target, "reachable": True,
           "predicted_fraction": lat["predicted_fraction"], "compress_measured_fraction": lat["measured_fraction"],
           "remeasured_fraction": frac, "original_ms": ms["original"], "slim_ms": ms["slim"],
           "within_tolerance": abs(frac / target - 1) <= TOLERANCE, "flops_ratio": res.report["flops"]["ratio"],
           "attempts": len(lat["attempts"]), "compress_seconds": seconds,
           "round_multiple": res.report["widths_rounding"]["multiple"], "fit": lat["fit"]}
    print(f"  {name:>12} {backend:>11} b{batch}: target {target:.0%}  predicted {row['predicted_fraction']:.1%}  "
          f"measured {row['compress_measured_fraction']:.1%}  re-measured {frac:.1%} "
          f"({'ok' if row['within_tolerance'] else 'MISS'})  FLOPs {row['flops_ratio']:.1%}  "
          f"{row['attempts']} attempt(s), {seconds:.0f} s", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--backends", nargs="+", default=["pytorch", "onnxruntime"], choices=["pytorch", "onnxruntime"])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--batch", type=int, help="latency batch for every model (default: each model's own: resnet20 "
                                                "at 1 and 32, the ImageNet models at 1)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--fresh-cache", action="store_true", help="measure the latency tables again")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of results/latency_target.json for (model, backend, batch) not run now")
    ap.add_argument("--smoke", action="store_true", help="resnet20 in PyTorch, a private cache; writes nothing")
    args = ap.parse_args(argv)
    tmp = None
    if args.smoke:
        # batch 8: at batch 1 resnet20's floor (fixed per-layer costs) measured 67-71% on a quiet machine and
        # 93.8% on a loaded one, so even a 0.9 target failed there; at batch 8 the convolutions set the latency
        args.models, args.backends, args.repeats, args.target, args.batch = ["resnet20"], ["pytorch"], 3, 0.8, 8
        tmp = tempfile.TemporaryDirectory()
        os.environ["OBA_FX_CACHE"] = tmp.name
    elif args.fresh_cache:
        from oba_fx.latency_model import cache_dir

        for p in cache_dir().glob("*.json"):
            p.unlink()
    rows = [run_one(m, b, args.target, bs, args.repeats) for m in args.models
            for bs in ((args.batch,) if args.batch else MODELS[m]["batches"]) for b in args.backends]
    if args.smoke:
        assert rows and all(r["reachable"] and r["slim_ms"] > 0 and r["attempts"] >= 1 for r in rows)
        print("smoke ok")
        return 0
    commands = []
    if args.merge:
        import json

        from common import RESULTS, command_line

        old = json.loads((RESULTS / "latency_target.json").read_text())
        done = {(r["model"], r["backend"], r["batch"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["backend"], r["batch"]) not in done] + rows
        commands = [c for c in old.get("commands", [old.get("command")]) if c] + [command_line()]
    path = save("latency_target", {
        "description": f"compress(target_latency={args.target}) with the default criterion and widths, random "
                       "weights, float32 CPU; re-measured as medians of interleaved runs of "
                       "the original and the slim model, independently of compress's own timing",
        "tolerance": TOLERANCE, "repeats": args.repeats, "threads": torch.get_num_threads(), "rows": rows,
        **({"commands": commands} if commands else {}),
    })
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
