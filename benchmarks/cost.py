"""Cost of each scoring criterion per calibration batch, relative to one forward+backward.

Two measurements:

- **Per criterion** (the table): each (model, criterion) runs in a fresh subprocess so its peak RSS is its
  own; one warm-up batch, then ``--batches`` timed.
- **End to end, interleaved** (``--interleaved``, the figure the targets judge): in one process per model,
  ``oba_fx.group_scores(graph, batches, criterion)`` (rows "criterion (groups)": what ``compress`` scores)
  and ``oba_fx.parameter_scores(model, batches, criterion)`` through the public API and a plain
  forward+backward over the same batches (``loss.backward()``, what a user's training step costs) take
  turns, ``--repeats`` times; the ratio is min over repeats of each. Every row keeps all the repeats.

Writes benchmarks/results/scoring_cost.json; BENCHMARKS.md is generated from it
by ``python benchmarks/report.py``.

    python benchmarks/cost.py [--batches 3] [--models resnet32 vit_small resnet50 vit_b_16] [--smoke]
    python benchmarks/cost.py --interleaved [--models ...] [--batches 2] [--repeats 3] --merge
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from common import command_line, save

CRITERIA = ["fwd+bwd", "taylor", "oba", "oba (no shortcut)", "oba-network", "oba-gn", "oba-k3", "obd (1 probe)",
            "obd-fisher", "group-exact (1 probe)"]
MODELS = {
    "resnet32": dict(kw={"in_channels": 3}, shape=(3, 32, 32), batch=128),
    "vit_small": dict(kw={"in_channels": 3, "img_size": 32}, shape=(3, 32, 32), batch=128),
    "resnet50": dict(kw={}, shape=(3, 224, 224), batch=16, torchvision=True, classes=1000,
                     criteria=["fwd+bwd", "taylor", "oba", "oba-network", "obd-fisher"]),
    "vit_b_16": dict(kw={}, shape=(3, 224, 224), batch=16, torchvision=True, classes=1000,
                     criteria=["fwd+bwd", "taylor", "oba", "oba-network", "obd-fisher", "oba (micro_batch 4)",
                               "oba (checkpoint)", "oba (checkpoint, micro_batch 4)"]),
}
SMOKE = {"resnet20": dict(kw={"in_channels": 1}, shape=(1, 28, 28), batch=4)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _setup(model_name: str, batches: int, batch: int | None = None):
    import models_zoo

    spec = {**MODELS, **SMOKE}[model_name]
    torch.manual_seed(0)
    if spec.get("torchvision"):
        import torchvision
        model = getattr(torchvision.models, model_name)(**spec["kw"]).eval()
    else:
        model = models_zoo.create(model_name, **spec["kw"]).eval()
    gen = torch.Generator().manual_seed(0)
    b = batch or spec["batch"]
    data = [(torch.randn(b, *spec["shape"], generator=gen), torch.randint(0, spec.get("classes", 10), (b,),
                                                                          generator=gen))
            for _ in range(batches + 1)]
    return model, data


def _runner(model, criterion: str, data):
    """``run(batch_list)`` for one criterion, through the public API."""
    import oba_fx
    from oba_fx.passes.curvature import curvature

    groups = criterion.endswith(" (groups)")
    graph = oba_fx.trace(model, data[0][0][:2]) if criterion.startswith("group-exact") or groups else None

    def run(batch_list):
        if criterion == "fwd+bwd":
            for x, y in batch_list:
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)
        elif criterion == "obd (1 probe)":
            oba_fx.parameter_scores(model, batch_list, "obd", probes=1, progress=False)
        elif criterion == "group-exact (1 probe)":
            oba_fx.group_exact_scores(graph, batch_list, method="probes", probes=1, progress=False)
        elif groups:  # what compress scores: coupled-group scores (row / column marginals where they suffice)
            oba_fx.group_scores(graph, batch_list, criterion.removesuffix(" (groups)"), progress=False)
        elif "(" in criterion:  # memory controls: "oba (checkpoint, micro_batch 4)"
            base, opts = criterion.rstrip(")").split(" (", 1)
            kw = {}
            for opt in (o.strip() for o in opts.split(",")):
                if opt == "checkpoint":
                    kw["checkpoint"] = True
                elif opt == "no shortcut":  # the ordinary forward-AD products, without the δ = −θ shortcut
                    kw["shortcuts"] = False
                elif opt.startswith("micro_batch "):
                    kw["micro_batch"] = int(opt.split()[1])
                else:
                    raise SystemExit(f"unknown option {opt!r} in {criterion!r}")
            oba_fx.parameter_scores(model, batch_list, base, progress=False, **kw)
        elif criterion == "taylor":
            curvature(model, batch_list, want=("g",), progress=False)
        else:
            oba_fx.parameter_scores(model, batch_list, criterion, progress=False)

    return run


def worker(model_name: str, criterion: str, batches: int) -> dict:
    model, data = _setup(model_name, batches)
    base_rss = _rss_mb()
    run = _runner(model, criterion, data)

    run(data[:1])  # warm-up
    t = time.perf_counter()
    run(data[1:])
    seconds = (time.perf_counter() - t) / batches
    return {"seconds_per_batch": seconds, "peak_rss_mb": _rss_mb(), "rss_after_setup_mb": base_rss}


#: glibc malloc settings for ``--interleaved``: "no-mmap" keeps freed large blocks in the heap instead of
#: returning them to the kernel, so the next batch's tensors do not page-fault in again
ALLOCATORS = {"default": {}, "no-mmap": {"MALLOC_MMAP_THRESHOLD_": "4294967296",
                                        "MALLOC_TRIM_THRESHOLD_": "68719476736"}}

#: criteria timed end to end against the forward+backward (``--interleaved``)
INTERLEAVED = ["oba (groups)", "oba", "oba-network (groups)", "oba-network"]


def interleaved(model_name: str, criteria: list[str], batches: int, repeats: int, batch: int | None = None) -> dict:
    """In one process: each criterion's public call over ``batches`` batches and the forward+backward over the
    same batches take turns ``repeats`` times (after one warm-up round); ratio of the minimum times."""
    model, data = _setup(model_name, batches, batch)
    timed = data[1:]
    names = ["fwd+bwd", *criteria]
    runs = {c: _runner(model, c, data) for c in names}
    for c in names:  # warm-up: one batch each
        runs[c](data[:1])
    seconds = {c: [] for c in names}
    for _ in range(repeats):
        for c in names:
            t = time.perf_counter()
            runs[c](timed)
            seconds[c].append(time.perf_counter() - t)
    base = min(seconds["fwd+bwd"])
    return {"model": model_name, "batch_size": len(timed[0][1]), "batches": batches, "repeats": repeats,
            "threads": torch.get_num_threads(), "seconds": seconds,
            "vs_fwd_bwd": {c: min(seconds[c]) / base for c in criteria}}


def select_jobs(models: list[str], criteria: list[str] | None) -> list[tuple[str, str]]:
    """(model, criterion) pairs to measure: each model's own criteria (the ImageNet-size models run the main
    ones and their memory controls; each of the others costs minutes per batch on a CPU), narrowed to
    ``criteria`` when given."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    known = set(CRITERIA).union(*(s.get("criteria", []) for s in MODELS.values()))
    if criteria and set(criteria) - known:
        raise SystemExit(f"unknown criteria {sorted(set(criteria) - known)}; choose from {sorted(known)}")
    return [(m, c) for m in models for c in MODELS[m].get("criteria", CRITERIA) if criteria is None or c in criteria]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--criteria", nargs="+",
                    help="criteria to measure (default: each model's own list; the small models run every criterion)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of results/scoring_cost.json that this run does not measure")
    ap.add_argument("--note", help="a note stored on every row this run measures (e.g. that other work shared the CPU)")
    ap.add_argument("--interleaved", action="store_true",
                    help="the end-to-end figure: parameter_scores and a forward+backward interleaved in one "
                         "process per model (criteria: --criteria, default oba and oba-network)")
    ap.add_argument("--repeats", type=int, default=3, help="--interleaved: rounds of each (min is reported)")
    ap.add_argument("--batch-size", type=int, help="--interleaved: batch size (default: the model's own)")
    ap.add_argument("--allocators", nargs="+", default=["default"], choices=sorted(ALLOCATORS),
                    help="--interleaved: glibc malloc settings to run each model under (default: the default)")
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on a tiny model (CI); writes nothing")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "CRITERION"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-interleaved", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.batches)))
        return
    if args.worker_interleaved:
        print(json.dumps(interleaved(args.worker_interleaved, args.criteria or INTERLEAVED, args.batches,
                                     args.repeats, args.batch_size)))
        return
    if args.interleaved:
        return main_interleaved(args)
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    if args.smoke:
        args.models, args.batches, args.criteria = list(SMOKE), 1, ["fwd+bwd", "oba", "oba-network",
                                                                    "oba (checkpoint, micro_batch 2)"]
    rows = []
    jobs = [(m, c) for m in args.models for c in args.criteria] if args.smoke else select_jobs(args.models,
                                                                                                 args.criteria)
    for m, c in tqdm(jobs, desc="scoring cost"):
        out = subprocess.run([sys.executable, __file__, "--batches", str(args.batches), "--worker", m, c],
                             capture_output=True, text=True)
        if out.returncode != 0:
            lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip() and "warn" not in ln.lower()]
            why = "killed (out of memory?)" if out.returncode in (-9, 137) else (lines[-1] if lines else "")
            rows.append({"model": m, "criterion": c, "error": f"exit {out.returncode}: {why}"})
            continue
        rows.append({"model": m, "criterion": c, **json.loads(out.stdout.strip().splitlines()[-1]),
                     **({"note": args.note} if args.note else {})})
    commands = []
    if args.merge:
        from common import RESULTS

        old = json.loads((RESULTS / "scoring_cost.json").read_text())
        commands = [c for c in old.get("commands", [old.get("command")]) if c]
        done = {(r["model"], r["criterion"]) for r in rows}
        rows = [r for r in old["rows"] if (r["model"], r["criterion"]) not in done] + rows
        args.models = list(dict.fromkeys([r["model"] for r in rows]))
    for m in args.models:
        base = next((r for r in rows if r["model"] == m and r["criterion"] == "fwd+bwd" and "error" not in r), None)
        for r in rows:
            if r["model"] == m and base and "error" not in r:
                r["time_vs_fwd_bwd"] = r["seconds_per_batch"] / base["seconds_per_batch"]
                r["extra_peak_mb"] = r["peak_rss_mb"] - r["rss_after_setup_mb"]
                r["extra_peak_vs_fwd_bwd"] = r["extra_peak_mb"] / max(base["peak_rss_mb"] - base["rss_after_setup_mb"], 1e-9)
    if args.smoke:
        bad = [r for r in rows if "error" in r]
        if bad:
            raise SystemExit(f"smoke run failed: {bad}")
        print(f"smoke ok: {len(rows)} rows")
        return
    path = save("scoring_cost", {
        "description": "seconds and peak RSS per calibration batch (float32, CPU) relative to one "
                       "forward+backward of the same batch; each row is a separate process",
        "batch_size": {m: MODELS[m]["batch"] for m in args.models},
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "batches_timed": args.batches,
        "rows": rows,
        # with --merge the file holds rows of several runs: keep every command that produced one
        "commands": commands + [command_line()],
    })
    for r in rows:
        print(r)
    print("wrote", path)


def main_interleaved(args):
    """One subprocess per model (a model's run does not warm the next one's caches); merges into
    results/scoring_cost.json under "interleaved" (rows of other models/batch sizes are kept)."""
    if args.smoke:
        args.models, args.batches, args.repeats = list(SMOKE), 1, 1
    rows = []
    for m in args.models:
        if m not in {**MODELS, **SMOKE}:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(MODELS)}")
        for alloc in args.allocators:
            cmd = [sys.executable, __file__, "--worker-interleaved", m, "--batches", str(args.batches), "--repeats",
                   str(args.repeats), *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
                   *(["--criteria", *args.criteria] if args.criteria else [])]
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            out = subprocess.run(cmd, capture_output=True, text=True, env={**env, **ALLOCATORS[alloc]})
            if out.returncode != 0:
                raise SystemExit(f"{m}: exit {out.returncode}: {out.stderr.strip()[-800:]}")
            row = {**json.loads(out.stdout.strip().splitlines()[-1]), "allocator": alloc,
                   "allocator_env": ALLOCATORS[alloc]}
            if args.note:
                row["note"] = args.note
            print(f"{m} (batch {row['batch_size']} x {row['batches']}, min of {row['repeats']}, malloc {alloc}): "
                  + ", ".join(f"{c} {v:.2f}x" for c, v in row["vs_fwd_bwd"].items()) + " a forward+backward",
                  flush=True)
            rows.append(row)
    if args.smoke:
        assert rows and all(v > 0 for r in rows for v in r["vs_fwd_bwd"].values())
        print(f"smoke ok: {len(rows)} interleaved rows")
        return
    from common import RESULTS, machine
    from oba_fx.io import write_json

    path = RESULTS / "scoring_cost.json"
    d = json.loads(path.read_text())
    old = d.get("interleaved", {})
    key = lambda r: (r["model"], r["batch_size"], r.get("allocator", "default"))  # noqa: E731
    done = {key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if key(r) not in done]
    d["interleaved"] = {
        "description": "oba_fx.group_scores(oba_fx.trace(model), batches, criterion) (\"criterion (groups)\", "
                       "what compress scores) and oba_fx.parameter_scores(model, batches, criterion) through the "
                       "public API against a plain forward+backward (loss.backward()) over the same batches, "
                       "interleaved in one process per model; min over repeats of each, float32 CPU",
        "machine": machine(), "commands": old.get("commands", []) + [command_line()] if kept else [command_line()],
        "rows": kept + rows,
    }
    write_json(path, d)
    print("wrote", path)


if __name__ == "__main__":
    main()
