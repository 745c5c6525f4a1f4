"""What bounds the PyTorch-eager speed-up of a slim model: time per op kind, original against slim.

For each model (torchvision resnet50 and mobilenet_v2, random weights: latency depends on the widths only),
``oba_fx.compress`` prunes it to ``--target`` FLOPs with the default widths (``round_to="auto"`` for the
PyTorch backend). Both models then run ``--repeats`` interleaved eager forwards at each batch size under
``torch.no_grad`` in the default (contiguous) memory format, and once more under ``torch.profiler``. The
profile's self CPU time is split by op kind (convolution, batch norm, elementwise, pooling/linear, other) and
every convolution is timed per layer by its call order, so each layer's time ratio can be set against its
FLOPs ratio (counted independently from the conv shapes: ``2·N·Cout·Cin/groups·k²·Hout·Wout``).

The efficiency of the whole model is its speed-up divided by its FLOPs reduction; the breakdown says which
op kinds keep it below 1: those whose time shrinks less than their FLOPs (or does not shrink at all).

Writes benchmarks/results/eager_breakdown.json; ``python benchmarks/report.py`` renders it.

    python benchmarks/eager_breakdown.py [--models resnet50 mobilenet_v2] [--batches 1 32] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn

from common import save

import oba_fx  # noqa: E402

KINDS = {  # aten op -> kind, by exact name (self time: the wrappers above them count ~0)
    "convolution": {"conv2d", "convolution", "_convolution", "mkldnn_convolution", "_mkldnn_convolution",
                    "thnn_conv2d", "_slow_conv2d_forward", "_nnpack_spatial_convolution", "slow_conv_dilated2d"},
    "batch norm": {"batch_norm", "_batch_norm_impl_index", "native_batch_norm",
                   "_native_batch_norm_legit_no_training"},
    "elementwise (relu, add, clamp)": {"relu", "relu_", "clamp", "clamp_", "clamp_min", "clamp_min_", "hardtanh",
                                       "hardtanh_", "add", "add_", "threshold", "threshold_"},
    "pooling, linear": {"max_pool2d", "max_pool2d_with_indices", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
                        "mean", "linear", "addmm", "mm", "flatten"},
}


def kind_of(op: str) -> str:
    name = op.split("::")[-1]
    for k, names in KINDS.items():
        if name in names:
            return k
    return "other"


def conv_flops(model: nn.Module, x: torch.Tensor) -> list[float]:
    """(FLOPs, shape text) of each Conv2d in call order, from its own shapes (not oba_fx's counter)."""
    out = []

    def hook(m, inp, y):
        k = m.kernel_size[0] * m.kernel_size[1]
        out.append((2.0 * y.shape[0] * m.out_channels * (m.in_channels // m.groups) * k * y.shape[2] * y.shape[3],
                    f"{m.in_channels}->{m.out_channels} k{m.kernel_size[0]} s{m.stride[0]} g{m.groups} "
                    f"{y.shape[2]}x{y.shape[3]}"))

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    return out


def conv_times(model: nn.Module, x: torch.Tensor, repeats: int) -> list[float]:
    """Median seconds of each Conv2d's forward in call order (timed by pre/post hooks)."""
    starts, times = {}, {}
    order = []

    def pre(m, inp):
        starts[id(m)] = time.perf_counter()

    def post(m, inp, y):
        times.setdefault(id(m), []).append(time.perf_counter() - starts[id(m)])
        if id(m) not in order:
            order.append(id(m))

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    hs = [h for m in convs for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    with torch.no_grad():
        for _ in range(repeats):
            model(x)
    for h in hs:
        h.remove()
    return [statistics.median(times[i]) for i in order]


def profile_kinds(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    from torch.profiler import profile

    with torch.no_grad():
        model(x)
        with profile() as p:
            model(x)
    kinds: dict[str, float] = {}
    for e in p.key_averages():
        if not e.key.startswith("aten::") or e.self_cpu_time_total <= 0:
            continue
        k = kind_of(e.key)
        kinds[k] = kinds.get(k, 0.0) + e.self_cpu_time_total / 1000.0
    return kinds


def measure(name: str, target: float, batches, repeats: int) -> list[dict]:
    import models_zoo

    torch.manual_seed(0)
    model = models_zoo.create(name).eval()
    gen = torch.Generator().manual_seed(0)
    shape = (3, 224, 224)
    calib = [(torch.randn(4, *shape, generator=gen), torch.randint(0, 1000, (4,), generator=gen))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = oba_fx.compress(model, calib[0][0][:2], calib, target_flops=target, backend="pytorch",
                              compensate=False, reestimate_bn=False, progress=False)
    slim = res.model.eval()
    rows = []
    for b in batches:
        x = torch.randn(b, *shape, generator=gen)
        lat = oba_fx.measure_latency({"original": model, "slim": slim}, shape, batch_sizes=(b,), repeats=repeats,
                                     warmup=1, onnx=False, progress=False)
        ms = {r["model"]: r["median_ms"] for r in lat["rows"]}
        f0, f1 = conv_flops(model, x), conv_flops(slim, x)
        t0, t1 = conv_times(model, x, max(3, repeats // 2)), conv_times(slim, x, max(3, repeats // 2))
        if len(f0) != len(f1) or len(t0) != len(f0) or len(t1) != len(f1):
            raise RuntimeError(f"{name}: conv layers differ between original and slim ({len(f0)} vs {len(f1)})")
        k0, k1 = profile_kinds(model, x), profile_kinds(slim, x)
        layers = [{"index": i, "original": a_[1], "slim": b_[1], "flops_ratio": b_[0] / a_[0],
                   "time_ratio": tb / ta, "original_ms": ta * 1e3, "slim_ms": tb * 1e3}
                  for i, (a_, b_, ta, tb) in enumerate(zip(f0, f1, t0, t1))]
        row = {"model": name, "batch": b, "round_to": res.report["widths_rounding"]["multiple"],
               "flops_ratio": res.report["flops"]["ratio"], "conv_flops_ratio_counted": sum(f for f, _ in f1) / sum(f for f, _ in f0),
               "original_ms": ms["original"], "slim_ms": ms["slim"], "speedup": ms["original"] / ms["slim"],
               "efficiency": ms["original"] / ms["slim"] * res.report["flops"]["ratio"],
               "kinds_ms": {"original": k0, "slim": k1}, "conv_layers": layers}
        rows.append(row)
        share = {k: v / sum(k1.values()) for k, v in k1.items()}
        print(f"{name} b{b}: x{row['speedup']:.2f} at {row['flops_ratio']:.1%} FLOPs (efficiency "
              f"{row['efficiency']:.2f}); slim time by kind: "
              + ", ".join(f"{k} {k0.get(k, 0):.1f}->{v:.1f} ms ({share[k]:.0%})" for k, v in k1.items()), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="mobilenet_v2 at batch 1, 2 repeats; writes nothing")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.repeats = ["mobilenet_v2"], [1], 2
    rows = [r for m in args.models for r in measure(m, args.target, args.batches, args.repeats)]
    if args.smoke:
        assert rows and all(r["speedup"] > 0 and r["conv_layers"] for r in rows)
        print(f"smoke ok: {len(rows)} rows")
        return
    save("eager_breakdown", {
        "description": f"PyTorch eager CPU, contiguous memory format, {args.target:.0%} FLOPs with the default "
                       "widths; median of interleaved forwards (oba_fx.measure_latency), op kinds from one "
                       "torch.profiler forward (self CPU time), per-conv times from forward hooks",
        "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
