"""Latency as a target: a per-layer latency table and the predicted latency of a removal.

``compress(..., target_latency=0.5, backend=..., latency_batch=...)`` keeps that fraction of the original's
measured latency. This module supplies what it selects against:

- **Layers.** Every ``nn.Conv2d`` and ``nn.Linear`` call of the traced graph (subclasses too), with the input
  shape it sees. A layer's widths after a removal follow from the group members on its weight: removing
  channels of a group removes ``member.index[isin(member.channel, removed)]`` along that member's dim, so the
  kept output width is ``out - removed(dim 0)`` and the kept input width ``in - removed(dim 1)`` (a depthwise
  conv keeps ``groups = in = out``; a grouped conv keeps its conv-group size and loses conv groups).
- **Table.** Each layer is timed alone, in the backend (PyTorch eager or onnxruntime on the CPU), at the
  latency batch: at its original widths, along its output width with the input width kept, and along its
  input width with the output width kept (about 9 widths each, at the group's rounding multiple). Between
  the measured widths the table interpolates linearly; a layer's time at (in, out) is the separable product
  ``t(in, OUT) * t(IN, out) / t(IN, OUT)``, exact when time scales with in x out. The table is cached on
  disk per machine, backend, thread count and library versions (``~/.cache/oba_fx/latency``,
  ``$OBA_FX_CACHE``), so it is measured once per machine.
- **Prediction.** The predicted latency of a removal is the measured latency of the whole model minus the
  table's sum at the original widths (the rest: activations, additions, pooling, framework overhead, kept
  constant) plus the table's sum at the kept widths.
- **Order.** A unit's marginal saving is the table's time drop when its group loses one rounding multiple of
  units, divided by that multiple. ``compress`` ranks units by importance / marginal saving, so the least
  important channels per millisecond go first, then fills the ranking to the predicted goal and re-measures
  the result; it corrects the goal by the measured / predicted ratio while the result misses the target.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .passes.modes import kept_modes

from .io import write_json
from .passes.errors import UsageError

__all__ = ["Layer", "LatencyModel", "LatencyTarget", "cache_dir", "find_layers", "layer_members", "time_module"]

#: widths measured along each axis of a layer (fractions of the original, rounded to the group multiple)
GRID = tuple(k / 8 for k in range(1, 9))


def cache_dir() -> Path:
    return Path(os.environ.get("OBA_FX_CACHE", Path.home() / ".cache" / "oba_fx")) / "latency"


def _machine_key(backend: str, threads: int) -> str:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ort = ""
    if backend == "onnxruntime":
        import onnxruntime

        ort = onnxruntime.__version__
    text = f"{cpu}|{os.cpu_count()}|{threads}|torch {torch.__version__}|ort {ort}"
    return f"{backend}-t{threads}-" + hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Layer:
    """One Conv2d / Linear call of the traced graph."""

    node: str
    module: str
    weight: str
    kind: str  # "conv", "dwconv", "gconv", "linear"
    c_in: int
    c_out: int
    groups: int
    config: tuple  # kernel, stride, padding, dilation, padding mode (convs); () for linears
    bias: bool
    in_shape: tuple  # the input's shape without the batch dimension

    def build(self, c_in: int, c_out: int) -> tuple[nn.Module, tuple]:
        """A fresh layer at these widths and its input's shape (without batch)."""
        if self.kind == "linear":
            return nn.Linear(c_in, c_out, bias=self.bias), (*self.in_shape[:-1], c_in)
        k, s, p, d, mode = self.config
        if self.kind == "dwconv":  # in = out = groups: the output width is the one that moves
            c_in = c_out
        groups = c_in if self.kind == "dwconv" else self.groups
        return (nn.Conv2d(c_in, c_out, k, s, p, d, groups=groups, bias=self.bias, padding_mode=mode),
                (c_in, *self.in_shape[1:]))

    def key(self, c_in: int, c_out: int, batch: int) -> str:
        return f"{self.kind}|{c_in}|{c_out}|{self.groups}|{self.config}|{self.bias}|{self.in_shape[1:] if self.kind != 'linear' else self.in_shape[:-1]}|b{batch}"


def find_layers(gm: torch.fx.GraphModule, example_args: tuple) -> list[Layer]:
    """Every Conv2d / Linear call in ``gm`` with its input shape (one forward with hooks)."""
    mods = dict(gm.named_modules())
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(mods.get(n.target), (nn.Conv2d,
                                                                                                    nn.Linear))]
    seen: dict[str, list[tuple]] = {}
    hooks = []
    for name in {n.target for n in calls}:
        hooks.append(mods[name].register_forward_hook(
            lambda m, inp, out, name=name: seen.setdefault(name, []).append(tuple(inp[0].shape[1:]))))
    try:
        with torch.no_grad():
            with kept_modes(gm, training=False):
                gm(*example_args)
    finally:
        for h in hooks:
            h.remove()
    layers, used = [], {}
    for n in calls:
        m = mods[n.target]
        k = used.get(n.target, 0)
        used[n.target] = k + 1
        shape = seen[n.target][k]
        if isinstance(m, nn.Linear):
            layers.append(Layer(n.name, n.target, f"{n.target}.weight", "linear", m.in_features, m.out_features,
                                1, (), m.bias is not None, shape))
            continue
        kind = ("dwconv" if m.groups == m.in_channels and m.groups > 1 and m.out_channels == m.in_channels
                else "gconv" if m.groups > 1 else "conv")
        pad = m.padding if isinstance(m.padding, str) else tuple(m.padding)
        layers.append(Layer(n.name, n.target, f"{n.target}.weight", kind, m.in_channels, m.out_channels, m.groups,
                            (tuple(m.kernel_size), tuple(m.stride), pad, tuple(m.dilation), m.padding_mode),
                            m.bias is not None, shape))
    return layers


def time_module(module: nn.Module, x: torch.Tensor, backend: str, threads: int, repeats: int = 15,
                warmup: int = 3) -> float:
    """Median milliseconds of ``module(x)`` in the backend (eval, no grad)."""
    module.eval()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory() if backend != "pytorch" else None
    try:
        if backend == "pytorch":
            def run():
                module(x)
        else:
            from .latency import ort_session

            sess = ort_session(module, x, Path(tmp.name), "layer", threads, dynamo=False)
            feed = {sess.get_inputs()[0].name: x.numpy()}

            def run():
                sess.run(None, feed)
        times = []
        with torch.no_grad():
            for _ in range(warmup):
                run()
            for _ in range(repeats):
                t = time.perf_counter()
                run()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    finally:
        torch.set_num_threads(old)
        if tmp is not None:
            tmp.cleanup()


def _grid(n: int, multiple: int) -> list[int]:
    """About 9 widths from the narrowest a rounded group can keep (its multiple) to the original ``n``."""
    pts = {n, min(n, multiple)}
    for f in GRID:
        w = int(round(n * f / multiple)) * multiple if multiple > 1 else int(round(n * f))
        pts.add(min(n, max(multiple if multiple <= n else 1, w)))
    return sorted(pts)


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    """Linear interpolation of a table made monotone: a narrower layer never costs more than a wider one
    (a running minimum from the widest width down, which also drops timings that noise pushed up)."""
    mono = np.minimum.accumulate(np.asarray(ys, dtype=float)[::-1])[::-1]
    return float(np.interp(x, xs, mono))


class LatencyModel:
    """The per-layer table of one traced graph, and predictions of its latency after a removal."""

    def __init__(self, graph, backend: str, batch: int, threads: int, multiples: dict[int, int],
                 whole_ms: float, progress: bool = True, repeats: int = 15):
        self.backend, self.batch, self.threads, self.repeats = backend, batch, threads, repeats
        self.layers = find_layers(graph.gm, graph.example_inputs)
        self.path = cache_dir() / f"{_machine_key(backend, threads)}.json"
        self._cache = self._load()
        self.touch = layer_members(graph, self.layers)
        self.groups_of = {L.node: {gid for d in (0, 1) for gid, _ in self.touch[(L.weight, d)]}
                          for L in self.layers}
        self.layers_of: dict[int, list[Layer]] = {}
        for L in self.layers:
            for gid in self.groups_of[L.node]:
                self.layers_of.setdefault(gid, []).append(L)
        # the multiple each layer's widths move by: that of the group(s) on each axis (1 when untouched)
        axis_mult = {}
        for L in self.layers:
            for d in (0, 1):
                gids = [gid for gid, _ in self.touch[(L.weight, d)]]
                axis_mult[(L.node, d)] = min((multiples.get(g, 1) for g in gids), default=1)
        self.tables = {}
        todo = []
        for L in self.layers:
            out_pts = (_grid(L.c_out, axis_mult[(L.node, 0)]) if self.touch[(L.weight, 0)] and L.kind != "gconv"
                       else [L.c_out])
            in_pts = (_grid(L.c_in, axis_mult[(L.node, 1)])
                      if self.touch[(L.weight, 1)] and L.kind in ("conv", "linear") else [L.c_in])
            self.tables[L.node] = (out_pts, in_pts)
            todo += [(L, L.c_in, c) for c in out_pts] + [(L, c, L.c_out) for c in in_pts]
        missing = list({L.key(ci, co, batch): (L, ci, co) for L, ci, co in todo
                        if L.key(ci, co, batch) not in self._cache}.values())
        if missing:
            it = missing
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(missing, desc=f"latency table ({backend}, batch {batch})", leave=False)
            for L, ci, co in it:
                self._cache[L.key(ci, co, batch)] = self._time(L, ci, co)
            self._save()
        self.base_ms = {L.node: self._table(L, L.c_in, L.c_out) for L in self.layers}
        self.whole_ms = whole_ms
        # layers timed alone pay a call overhead each; when their sum exceeds the whole model's time, they are
        # scaled down to it (and nothing is left for the rest)
        total = sum(self.base_ms.values())
        self.scale = min(1.0, whole_ms / total) if total > 0 else 1.0
        self.rest_ms = whole_ms - self.scale * total
        self.calibration: list[dict] = []

    # ---- table
    def _time(self, L: Layer, c_in: int, c_out: int) -> float:
        torch.manual_seed(0)
        mod, shape = L.build(c_in, c_out)
        return time_module(mod, torch.randn(self.batch, *shape), self.backend, self.threads, self.repeats)

    def _load(self) -> dict:
        try:
            return json.loads(self.path.read_text())["ms"]
        except (OSError, ValueError, KeyError):
            return {}

    def _save(self) -> None:
        write_json(self.path, {"backend": self.backend, "threads": self.threads, "ms": self._cache})

    def _table(self, L: Layer, c_in: float, c_out: float) -> float:
        out_pts, in_pts = self.tables[L.node]
        b = self.batch
        t_full = _interp(out_pts, [self._cache[L.key(L.c_in, c, b)] for c in out_pts], L.c_out)
        if L.kind == "gconv":
            # a grouped conv loses whole conv groups: its time scales with the groups it keeps
            return t_full * c_out / L.c_out
        t_out = _interp(out_pts, [self._cache[L.key(L.c_in, c, b)] for c in out_pts], c_out)
        if L.kind == "dwconv":
            # depthwise: in and out move together; the output axis was measured with groups = width
            return t_out
        t_in = _interp(in_pts, [self._cache[L.key(c, L.c_out, b)] for c in in_pts], c_in)
        return t_out * t_in / t_full if t_full > 0 else 0.0

    # ---- predictions
    def widths(self, removal: dict[int, list[int]], layers=None) -> dict[str, tuple[int, int]]:
        """Kept (in, out) widths of every layer (or of ``layers``) after ``removal`` ({group id: removed
        channels})."""
        rm = {gid: torch.as_tensor(sorted(ch), dtype=torch.long) for gid, ch in removal.items() if len(ch)}
        out = {}
        for L in self.layers if layers is None else layers:
            gone = []
            for d in (0, 1):
                n = 0
                for gid, m in self.touch[(L.weight, d)]:
                    if gid in rm:
                        n += int(torch.isin(m.channel, rm[gid]).sum())
                gone.append(n)
            c_out = L.c_out - gone[0]
            if L.kind == "dwconv":
                c_in = c_out
            elif L.kind == "gconv":
                c_in = L.c_in * c_out // L.c_out
            else:
                c_in = L.c_in - gone[1]
            out[L.node] = (max(c_in, 1), max(c_out, 1))
        return out

    def table_sum(self, removal: dict[int, list[int]]) -> float:
        """The table's milliseconds summed over the layers, at the widths ``removal`` leaves."""
        w = self.widths(removal)
        return sum(self._table(L, *w[L.node]) for L in self.layers)

    def predict(self, removal: dict[int, list[int]]) -> float:
        """Predicted milliseconds of the model after ``removal``: ``rest + scale x table sum``."""
        return self.rest_ms + self.scale * self.table_sum(removal)

    def calibrate(self, points: list[tuple[dict, float]]) -> None:
        """Fit ``rest`` and ``scale`` by least squares to measured (removal, whole-model ms) points, with the
        unpruned model's. Layers timed alone miss what the whole model fuses and add their call overheads;
        a few whole-model measurements of uniformly slimmed copies map the table onto the model's real
        latency. The fit is kept only when it is sane (positive scale)."""
        xs = [sum(self.base_ms.values())] + [self.table_sum(r) for r, _ in points]
        ys = [self.whole_ms] + [ms for _, ms in points]
        self.calibration = [{"table_ms": x, "measured_ms": y} for x, y in zip(xs, ys)]
        if len(xs) < 2 or max(xs) - min(xs) <= 1e-9:
            return
        b, a = np.polyfit(np.asarray(xs), np.asarray(ys), 1)
        if b > 0:
            self.scale, self.rest_ms = float(b), float(a)

    def marginal(self, groups, multiples: dict[int, int]) -> dict[int, float]:
        """Per group: predicted ms saved per unit when it loses one rounding multiple of units (only the
        layers the group touches are evaluated)."""
        out = {}
        for g in groups:
            m = max(1, min(multiples.get(g.id, 1), g.size - 1))
            layers = self.layers_of.get(g.id, [])
            drop = self.widths({g.id: list(range(m))}, layers)
            saved = self.scale * sum(self.base_ms[L.node] - self._table(L, *drop[L.node]) for L in layers)
            out[g.id] = max(saved, 0.0) / m
        return out


def layer_members(graph, layers: list[Layer]) -> dict[tuple[str, int], list]:
    """Per (layer weight, dim 0 or 1): the (group id, member) pairs of ``graph``'s prunable groups on it."""
    by_weight: dict[tuple[str, int], list] = {}
    for g in graph.prunable_groups:
        for m in g.members:
            if m.dim in (0, 1):
                by_weight.setdefault((m.name, m.dim), []).append((g.id, m))
    return {(L.weight, d): by_weight.get((L.weight, d), []) for L in layers for d in (0, 1)}


#: the re-measured latency counts as on target within this fraction (half the issue's +-10%)
LATENCY_TOLERANCE = 0.05
#: at most this many goal corrections after the first selection
MAX_CORRECTIONS = 3


class LatencyTarget:
    """What ``compress(target_latency=...)`` measures: the original once, then candidates against it."""

    def __init__(self, model: nn.Module, args: tuple, backend: str, batch: int, threads: int | None,
                 repeats: int, progress: bool):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise UsageError("target_latency needs a model with one tensor input (it is timed on random inputs "
                             "of example_inputs' shape); use target_flops= for models with several inputs")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise UsageError(f"latency_batch must be a positive int, got {batch!r}")
        self.shape = tuple(args[0].shape[1:])
        self.backend, self.batch, self.repeats, self.progress = backend, batch, repeats, progress
        self.threads = threads or torch.get_num_threads()
        self.original = model
        self.original_ms = self.measure(model)

    def _lat(self, models: dict) -> dict:
        from .latency import measure_latency

        res = measure_latency(models, self.shape, batch_sizes=(self.batch,), repeats=self.repeats, warmup=2,
                              onnx=self.backend == "onnxruntime", pytorch=self.backend == "pytorch",
                              threads=self.threads, progress=False)
        return {r["model"]: r["median_ms"] for r in res["rows"]}

    def measure(self, model: nn.Module) -> float:
        return self._lat({"m": model})["m"]

    def measure_pair(self, slim: nn.Module) -> tuple[float, float]:
        """(original ms, slim ms), timed interleaved in one run."""
        ms = self._lat({"original": self.original, "slim": slim})
        return ms["original"], ms["slim"]

    def model_for(self, graph, multiples: dict[int, int], whole_ms: float, probes=()) -> LatencyModel:
        """The step's latency model, calibrated on ``probes`` (removals, e.g. uniformly slimmed copies)
        each rewritten and timed against the original."""
        lm = LatencyModel(graph, self.backend, self.batch, self.threads, multiples, whole_ms,
                          progress=self.progress)
        points = []
        for removal in probes:
            o_ms, s_ms = self.measure_pair(graph.prune(removal))
            points.append((removal, s_ms / o_ms * self.original_ms))
        lm.calibrate(points)
        return lm
