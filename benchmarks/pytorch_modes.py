"""Which PyTorch way runs a slim model fastest: eager, channels-last, or ``torch.compile``.

For the demo's resnet20 (Fashion-MNIST shape, 10 classes), torchvision resnet50 and mobilenet_v2 (random weights:
latency depends on the widths only), ``oba_fx.compress`` prunes to ``--target`` FLOPs with the default widths
for the PyTorch backend. Original and slim then run at each batch size in three ways, timed together as
medians of interleaved runs (``oba_fx.measure_latency(channels_last=True, compiled=True)``):

- ``pytorch``: eager, default (contiguous) memory format: what ``compress(backend="pytorch")`` targets;
- ``pytorch-channels_last``: eager on a channels-last copy of the model and input;
- ``pytorch-compiled``: ``torch.compile(model, dynamic=False)``, inductor's default mode; compilation (the first
  warm-up run, recorded as ``compile_s``) is not timed.

Per model and batch each row gives the slim model's speed-up over the original in the same way, and over the
eager original (what a user who switches both gets). ``oba_fx.pytorch_guidance`` names the fastest way for the
slim model (one that beats eager by at least 5%); ``oba-fx bench --channels-last --compile`` gives the same
advice for a user's own model on their own machine.

Writes benchmarks/results/pytorch_modes.json; ``python benchmarks/report.py`` renders it.

    python benchmarks/pytorch_modes.py [--models resnet20 resnet50 mobilenet_v2] [--batches 1 32]
                                       [--repeats 10] [--smoke]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch

from common import save

import oba_fx  # noqa: E402
from oba_fx.latency import PYTORCH_MODES  # noqa: E402

MODELS = {
    "resnet20": dict(shape=(1, 28, 28), kw={"in_channels": 1}, classes=10),
    "resnet50": dict(shape=(3, 224, 224), classes=1000),
    "mobilenet_v2": dict(shape=(3, 224, 224), classes=1000),
}


def measure(name: str, target: float, batches, repeats: int) -> list[dict]:
    import models_zoo

    spec = MODELS[name]
    torch.manual_seed(0)
    model = models_zoo.create(name, **spec.get("kw", {})).eval()
    gen = torch.Generator().manual_seed(0)
    calib = [(torch.randn(4, *spec["shape"], generator=gen), torch.randint(0, spec["classes"], (4,), generator=gen))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = oba_fx.compress(model, calib[0][0][:2], calib, target_flops=target, backend="pytorch",
                              compensate=False, reestimate_bn=False, progress=False)
        t0 = time.perf_counter()
        lat = oba_fx.measure_latency({"original": model, "slim": res.model}, spec["shape"], batch_sizes=batches,
                                     repeats=repeats, warmup=2, onnx=False, channels_last=True, compiled=True,
                                     progress=True)
    ms = {(r["model"], r["backend"], r["batch"]): r for r in lat["rows"]}
    advice = {g["batch"]: g for g in oba_fx.pytorch_guidance(lat["rows"]) if g["model"] == "slim"}
    rows = []
    for b in batches:
        eager0 = ms[("original", "pytorch", b)]["median_ms"]
        for mode in PYTORCH_MODES:
            o, s = ms[("original", mode, b)], ms[("slim", mode, b)]
            rows.append({"model": name, "batch": b, "mode": mode, "flops_ratio": res.report["flops"]["ratio"],
                         "round_to": res.report["widths_rounding"]["multiple"],
                         "original_ms": o["median_ms"], "slim_ms": s["median_ms"],
                         "speedup_same_mode": o["median_ms"] / s["median_ms"],
                         "speedup_vs_eager_original": eager0 / s["median_ms"],
                         "compile_s": {"original": o.get("compile_s"), "slim": s.get("compile_s")},
                         "best_for_slim": advice[b]["best"] == mode})
            print(f"{name} b{b} {mode:>22}: {o['median_ms']:9.2f} -> {s['median_ms']:9.2f} ms "
                  f"(x{rows[-1]['speedup_same_mode']:.2f}; x{rows[-1]['speedup_vs_eager_original']:.2f} vs eager "
                  f"original)" + ("  <- fastest for the slim model" if rows[-1]["best_for_slim"] else ""), flush=True)
    print(f"{name}: timed in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="resnet20 at batch 1, 2 repeats; writes nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeats = ["resnet20"], [1], 2
    rows = [r for m in args.models for r in measure(m, args.target, args.batches, args.repeats)]
    if args.smoke:
        assert len(rows) == 3 and sum(r["best_for_slim"] for r in rows) == 1
        assert all(r["slim_ms"] > 0 and (r["compile_s"]["slim"] or 0) > 0 for r in rows
                   if r["mode"] == "pytorch-compiled")
        print(f"smoke ok: {len(rows)} rows")
        return
    save("pytorch_modes", {
        "description": f"PyTorch CPU, {args.target:.0%} FLOPs with the default widths (backend='pytorch'); "
                       f"medians of {args.repeats} interleaved forwards per model, way and batch "
                       "(oba_fx.measure_latency with channels_last=True, compiled=True); torch.compile: inductor, "
                       "default mode, dynamic=False, compilation not timed",
        "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
