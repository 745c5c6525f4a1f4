"""Latency of models in PyTorch eager and onnxruntime: medians of repeated, interleaved runs."""
from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .passes.modes import kept_modes
from .passes.errors import UsageError

__all__ = ["measure_latency", "ort_session", "pytorch_guidance"]

#: the PyTorch ways to run a model that measure_latency can time
PYTORCH_MODES = ("pytorch", "pytorch-channels_last", "pytorch-compiled")


def ort_session(model: nn.Module, example: torch.Tensor, folder: Path, name: str, threads: int,
                dynamo: bool | None = None):
    """An onnxruntime session of ``model`` (exported and verified by ``export_onnx``) for timing."""
    import onnxruntime as ort

    from .export import ort_providers, export_onnx

    path = export_onnx(model, example, folder / f"{name}.onnx", dynamo=dynamo)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # no busy-waiting between runs: with interleaved sessions a spinning pool would steal the cores of the next one
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=ort_providers())


def measure_latency(
    models: dict[str, nn.Module],
    input_shape: Iterable[int],
    batch_sizes: Iterable[int] = (1, 32),
    repeats: int = 30,
    warmup: int = 3,
    onnx: bool = True,
    threads: int | None = None,
    progress: bool = True,
    pytorch: bool = True,
    channels_last: bool = False,
    compiled: bool = False,
) -> dict:
    """Median latency (ms) of each model per backend and batch size.

    Runs are interleaved: every repeat times each model once in turn, so drift
    in machine load hits all models alike.  Inputs are random normal.

    Args:
        models: name -> module (run in eval mode under ``torch.no_grad``; each module's training flag
            is restored afterwards).
        input_shape: one sample's shape, e.g. ``(1, 28, 28)``.
        onnx: also export each model (verified, see ``oba_fx.export_onnx``) and
            time it in onnxruntime.
        threads: torch and onnxruntime intra-op threads (default torch's).
        pytorch: time PyTorch eager too (False: onnxruntime only).
        channels_last: also time PyTorch eager in the channels-last memory format (backend
            ``"pytorch-channels_last"``: a copy of each model and the input converted with
            ``memory_format=torch.channels_last``; 4-D inputs only). The models are not changed.
        compiled: also time ``torch.compile(model, dynamic=False)`` (backend ``"pytorch-compiled"``,
            inductor's default mode). Compilation happens in the first warm-up run of each batch size and is
            not timed; those rows record it as ``compile_s``. The models are not changed.

    Returns:
        ``{"rows": [{"model", "backend", "batch", "median_ms", "p10_ms", "p90_ms", "runs"}],
        "threads": n}``; when ``models`` has "original", each row also has
        ``speedup`` = original's median / this median on the same backend and batch.
    """
    input_shape = tuple(int(v) for v in input_shape)
    threads = threads or torch.get_num_threads()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as modes:
            for m in models.values():  # timed in eval mode; each module's own flag comes back afterwards
                modes.enter_context(kept_modes(m, training=False))
            sessions = {}
            if onnx:
                for name, m in models.items():
                    sessions[name] = ort_session(m, torch.randn(2, *input_shape), Path(tmp), name, threads)
            if channels_last and len(input_shape) != 3:
                raise UsageError(f"channels_last needs image inputs (one sample's shape C, H, W), got {input_shape}")
            backends = ((["pytorch"] if pytorch else []) + (["pytorch-channels_last"] if channels_last else [])
                        + (["pytorch-compiled"] if compiled else []) + (["onnxruntime"] if onnx else []))
            cl = {}
            if channels_last:
                import copy

                cl = {name: copy.deepcopy(m).to(memory_format=torch.channels_last) for name, m in models.items()}
            # a wrapper around the module: the user's model stays as it is (unlike ``m.compile()``)
            tc = {name: torch.compile(m, dynamic=False) for name, m in models.items()} if compiled else {}
            if not backends:
                raise UsageError("measure_latency: nothing to time (pytorch=False and onnx=False)")
            jobs = [(b, bs) for bs in batch_sizes for b in backends]
            it = jobs
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(jobs, desc="latency", leave=False)
            for backend, bs in it:
                x = torch.randn(bs, *input_shape)
                xn = x.numpy()
                runners = {}
                for name, m in models.items():
                    if backend == "pytorch":
                        runners[name] = (lambda m=m: m(x))
                    elif backend == "pytorch-channels_last":
                        xc = x.contiguous(memory_format=torch.channels_last)
                        runners[name] = (lambda m=cl[name], xc=xc: m(xc))
                    elif backend == "pytorch-compiled":
                        runners[name] = (lambda m=tc[name]: m(x))
                    else:
                        sess = sessions[name]
                        feed = {sess.get_inputs()[0].name: xn}
                        runners[name] = (lambda s=sess, f=feed: s.run(None, f))
                times = {name: [] for name in models}
                first = {}
                with torch.no_grad():
                    for i in range(max(warmup, 1 if backend == "pytorch-compiled" else 0)):
                        for name, run in runners.items():
                            t = time.perf_counter()
                            run()
                            if i == 0:
                                first[name] = time.perf_counter() - t
                    for _ in range(repeats):
                        for name, run in runners.items():
                            t = time.perf_counter()
                            run()
                            times[name].append((time.perf_counter() - t) * 1e3)
                for name, ts in times.items():
                    q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
                    rows.append({"model": name, "backend": backend, "batch": bs, "median_ms": statistics.median(ts),
                                 "p10_ms": q[0], "p90_ms": q[-1], "runs": len(ts)})
                    if backend == "pytorch-compiled":
                        rows[-1]["compile_s"] = first[name]
    finally:
        torch.set_num_threads(old_threads)
    if "original" in models:
        base = {(r["backend"], r["batch"]): r["median_ms"] for r in rows if r["model"] == "original"}
        for r in rows:
            r["speedup"] = base[(r["backend"], r["batch"])] / r["median_ms"]
    return {"rows": rows, "threads": threads, "repeats": repeats, "input_shape": list(input_shape)}


def pytorch_guidance(rows: list[dict], min_gain: float = 1.05) -> list[dict]:
    """Per (model, batch): the fastest of the PyTorch ways timed in ``rows`` (``measure_latency``'s), against
    eager in the default memory format.

    A mode is recommended only when it beats eager by ``min_gain`` (5%: below that, run-to-run noise); else
    the advice is plain eager. Returns ``[{"model", "batch", "best", "gain", "eager_ms", "best_ms", "modes"}]``
    where ``gain`` = eager ms / best ms and ``modes`` maps each timed mode to its median ms.
    """
    by = {}
    for r in rows:
        if r["backend"] in PYTORCH_MODES:
            by.setdefault((r["model"], r["batch"]), {})[r["backend"]] = r["median_ms"]
    out = []
    for (model, batch), modes in by.items():
        if "pytorch" not in modes or len(modes) < 2:
            continue
        eager = modes["pytorch"]
        fastest = min(modes, key=modes.get)
        best = fastest if eager / modes[fastest] >= min_gain else "pytorch"
        out.append({"model": model, "batch": batch, "best": best, "gain": eager / modes[best], "eager_ms": eager,
                    "best_ms": modes[best], "modes": dict(modes)})
    return out
