"""Which channel multiple each backend runs fastest: the measurement behind ``oba_fx.ROUND_TO``.

Two measurements, per backend (PyTorch eager CPU, onnxruntime CPU; CUDA where a GPU is present):

1. **Width sweep.** A pruned channel group between two 3x3 convs, ``conv(64 -> c) -> ReLU -> conv(c -> 64)``
   at 14x14, batch 32, for every width ``c`` from 4 to 64: latency against width shows where the backend's
   kernels block channels (the steps of the curve) -- ms per FLOP is lowest at the block multiples.
2. **Decision.** The demo's resnet20 (Fashion-MNIST shape), torchvision resnet50 and mobilenet_v2 are pruned to
   50% FLOPs with the default criterion (random weights: latency depends on the widths only) and
   ``round_to`` = each candidate multiple (1 = no rounding), then timed against the original at batch 1 and 32.
   The efficiency of a variant is its speed-up divided by its FLOPs reduction. Per backend, the chosen multiple
   is the smallest one whose geometric-mean efficiency over models and batches is within ``--tie`` (2%) of the
   best: finer multiples keep the selection closer to the ranking, so they win ties. PyTorch is also timed in
   the channels-last memory format (``pytorch-channels_last``), the guidance BENCHMARKS.md gives for eager use.

Timings are medians of interleaved runs (``oba_fx.measure_latency``). Writes benchmarks/results/widths.json;
``tests/test_benchmarks.py`` checks that ``oba_fx.ROUND_TO`` equals the multiples it chose.

    python benchmarks/widths.py [--models resnet20 resnet50 mobilenet_v2] [--multiples 1 4 8 16 32]
                                [--repeats 7] [--smoke]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import torch
import torch.nn as nn

from common import save

import oba_fx  # noqa: E402

MODELS = {
    "resnet20": dict(shape=(1, 28, 28), kw={"in_channels": 1}, classes=10),
    "resnet50": dict(shape=(3, 224, 224), classes=1000),
    "mobilenet_v2": dict(shape=(3, 224, 224), classes=1000),
}


class ConvPair(nn.Module):
    """``conv(64 -> c) -> ReLU -> conv(c -> 64)``: one pruned group between its producer and consumer."""

    def __init__(self, c: int, outer: int = 64):
        super().__init__()
        self.a = nn.Conv2d(outer, c, 3, padding=1)
        self.b = nn.Conv2d(c, outer, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def width_sweep(widths, repeats: int, onnx: bool) -> list[dict]:
    torch.manual_seed(0)
    models = {f"c{c}": ConvPair(c).eval() for c in widths}
    lat = oba_fx.measure_latency(models, (64, 14, 14), batch_sizes=(32,), repeats=repeats, warmup=2, onnx=onnx,
                                 progress=True)
    rows = []
    for r in lat["rows"]:
        c = int(r["model"][1:])
        flops = 2 * (2 * 64 * c * 9 * 14 * 14) * 32  # two convs, multiply-add = 2 FLOPs, batch 32
        rows.append({"width": c, "backend": r["backend"], "batch": r["batch"], "median_ms": r["median_ms"],
                     "p10_ms": r["p10_ms"], "p90_ms": r["p90_ms"], "gflops": flops / 1e9,
                     "ms_per_gflop": r["median_ms"] / (flops / 1e9)})
    return rows


def decision(names, multiples, target: float, batch_sizes, repeats: int, onnx: bool) -> list[dict]:
    import models_zoo

    rows = []
    for name in names:
        spec = MODELS[name]
        torch.manual_seed(0)
        model = models_zoo.create(name, **spec.get("kw", {})).eval()
        gen = torch.Generator().manual_seed(0)
        calib = [(torch.randn(4, *spec["shape"], generator=gen),
                  torch.randint(0, spec["classes"], (4,), generator=gen))]
        variants, info = {"original": model}, {"original": {"round_to": None, "flops_ratio": 1.0}}
        for m in multiples:
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = oba_fx.compress(model, calib[0][0][:2], calib, target_flops=target, round_to=m,
                                      compensate=False, reestimate_bn=False, progress=False)
            key = f"round_to={m}"
            variants[key] = res.model
            info[key] = {"round_to": m, "flops_ratio": res.report["flops"]["ratio"],
                         "compress_seconds": time.perf_counter() - t0}
        print(f"== {name}: timing {len(variants)} variants", flush=True)
        lat = oba_fx.measure_latency(variants, spec["shape"], batch_sizes=batch_sizes, repeats=repeats, warmup=1,
                                     onnx=onnx, channels_last=True, progress=True)
        for r in lat["rows"]:
            extra = info[r["model"]]
            row = {"model": name, "variant": r["model"], **extra,
                   **{k: v for k, v in r.items() if k != "model"}}
            row["efficiency"] = r["speedup"] * extra["flops_ratio"]  # speed-up / FLOPs reduction
            rows.append(row)
            print(f"  {r['model']:>12} {r['backend']:>11} b{r['batch']:<3} {r['median_ms']:9.2f} ms  "
                  f"x{r['speedup']:.2f} (FLOPs x{1 / extra['flops_ratio']:.2f})", flush=True)
    return rows


def choose(rows: list[dict], tie: float) -> dict:
    """Per backend: geometric-mean efficiency per multiple, and the smallest multiple within ``tie`` of the best.
    ``pytorch-channels_last`` gets its figures too (the guidance on the memory format), but ``compress``'s
    ``backend="pytorch"`` means the default memory format, so its multiple is chosen from ``pytorch`` rows."""
    out = {}
    for backend in sorted({r["backend"] for r in rows}):
        eff = {}
        for m in sorted({r["round_to"] for r in rows if r["round_to"] is not None}):
            vals = [r["efficiency"] for r in rows if r["backend"] == backend and r["round_to"] == m]
            if not vals:
                continue
            eff[m] = math.exp(sum(math.log(v) for v in vals) / len(vals))
        best = max(eff.values())
        chosen = min(m for m, v in eff.items() if v >= (1 - tie) * best)
        out[backend] = {"chosen": chosen, "geomean_efficiency": {str(m): v for m, v in eff.items()}}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--multiples", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sweep-widths", nargs=2, type=int, default=[4, 64], metavar=("FROM", "TO"))
    ap.add_argument("--tie", type=float, default=0.02)
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on resnet20 only; writes nothing")
    args = ap.parse_args(argv)
    if any(m < 1 for m in args.multiples):
        ap.error("--multiples must be >= 1 (1 = no rounding)")
    if args.smoke:
        args.models, args.multiples, args.batch_sizes, args.repeats = ["resnet20"], [1, 8], [4], 2
        args.sweep_widths = [6, 9]
    sweep = width_sweep(range(args.sweep_widths[0], args.sweep_widths[1] + 1), args.repeats, onnx=True)
    rows = decision(args.models, args.multiples, args.target, args.batch_sizes, args.repeats, onnx=True)
    chosen = choose(rows, args.tie)
    for backend, c in chosen.items():
        effs = ", ".join(f"{m}: {v:.3f}" for m, v in c["geomean_efficiency"].items())
        print(f"{backend}: round_to={c['chosen']}  (geometric-mean speed-up / FLOPs reduction {effs})")
    if args.smoke:
        assert sweep and rows and all(r["median_ms"] > 0 for r in rows + sweep)
        assert set(chosen) == {"pytorch", "onnxruntime", "pytorch-channels_last"}
        print("smoke ok")
        return 0
    path = save("widths", {
        "description": "latency against channel width (conv pair sweep) and speed-up / FLOPs reduction of models "
                       "pruned to 50% FLOPs with each round_to multiple; medians of interleaved runs, float32",
        "target_flops": args.target, "repeats": args.repeats, "tie": args.tie, "threads": torch.get_num_threads(),
        "sweep": sweep, "rows": rows, "chosen": chosen,
    })
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
