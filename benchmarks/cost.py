"""Cost of each scoring criterion per calibration batch, relative to one forward+backward.

Each (model, criterion) runs in a fresh subprocess so its peak RSS is its own.
Writes benchmarks/results/scoring_cost.json; BENCHMARKS.md is generated from it
by ``python benchmarks/report.py``.

    python benchmarks/cost.py [--batches 3] [--models resnet32 vit_small resnet50 vit_b_16] [--smoke]
"""
from __future__ import annotations

import argparse
import json
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


def worker(model_name: str, criterion: str, batches: int) -> dict:
    import models_zoo
    import oba_fx
    from passes.curvature import curvature

    spec = {**MODELS, **SMOKE}[model_name]
    torch.manual_seed(0)
    if spec.get("torchvision"):
        import torchvision
        model = getattr(torchvision.models, model_name)(**spec["kw"]).eval()
    else:
        model = models_zoo.create(model_name, **spec["kw"]).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(spec["batch"], *spec["shape"], generator=gen), torch.randint(0, spec.get("classes", 10), (spec["batch"],),
                                                                                        generator=gen))
            for _ in range(batches + 1)]
    graph = oba_fx.trace(model, data[0][0][:2]) if criterion.startswith("group-exact") else None
    base_rss = _rss_mb()

    def run(batch_list):
        if criterion == "fwd+bwd":
            for x, y in batch_list:
                model.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(model(x), y).backward()
        elif criterion == "obd (1 probe)":
            oba_fx.parameter_scores(model, batch_list, "obd", probes=1, progress=False)
        elif criterion == "group-exact (1 probe)":
            oba_fx.group_exact_scores(graph, batch_list, method="probes", probes=1, progress=False)
        elif "(" in criterion:  # memory controls: "oba (checkpoint, micro_batch 4)"
            base, opts = criterion.rstrip(")").split(" (", 1)
            kw = {}
            for opt in (o.strip() for o in opts.split(",")):
                if opt == "checkpoint":
                    kw["checkpoint"] = True
                elif opt == "no shortcut":  # the ordinary forward-AD products, without the δ = −θ shortcut
                    import passes.curvature as _c

                    _c.FAST_NEG_THETA = False
                elif opt.startswith("micro_batch "):
                    kw["micro_batch"] = int(opt.split()[1])
                else:
                    raise SystemExit(f"unknown option {opt!r} in {criterion!r}")
            oba_fx.parameter_scores(model, batch_list, base, progress=False, **kw)
        elif criterion == "taylor":
            curvature(model, batch_list, want=("g",), progress=False)
        else:
            oba_fx.parameter_scores(model, batch_list, criterion, progress=False)

    run(data[:1])  # warm-up
    t = time.perf_counter()
    run(data[1:])
    seconds = (time.perf_counter() - t) / batches
    return {"seconds_per_batch": seconds, "peak_rss_mb": _rss_mb(), "rss_after_setup_mb": base_rss}


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
    ap.add_argument("--smoke", action="store_true", help="seconds-long run on a tiny model (CI); writes nothing")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "CRITERION"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.batches)))
        return
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


if __name__ == "__main__":
    main()
