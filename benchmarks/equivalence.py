"""Behaviour fingerprint: the numbers a refactor must not change, recorded at one commit, compared at another.

For each model (the zoo, small torchvision and timm models, hand-written test nets) in float64 with seeded
random weights and calibration data, it records:

    groups        every coupled group: id, size, prunable, members (module, kind, slice) and its label;
    blocks        the Hessian-block analysis as text (which inter-layer blocks are zero and why);
    scores        ``oba_fx.group_scores`` for every criterion in CRITERIA (the marginal route and, for the
                  oba family, the per-parameter route too) and ``parameter_scores`` summed per parameter;
    compress      ``oba_fx.compress`` at 50% FLOPs with criterion oba (2 steps) and magnitude: the report's
                  FLOPs / params, the kept widths, and the slim model's output on a fixed input;
    unstructured  ``compress_unstructured`` at 50% sparsity: kept-weight counts per parameter.

    python benchmarks/equivalence.py --out FILE [--models NAME ...]       # record
    python benchmarks/equivalence.py --compare OLD NEW [--rtol 1e-12] [--subset]  # exit 1 on any difference
    python benchmarks/equivalence.py --smoke      # resnet20 twice into a temporary folder: must compare equal

Scores compare by max |a - b| / max |a| per array (``--rtol``, default 1e-12); groups, block texts, widths and
FLOPs compare exactly. A key present in one file and missing in the other is a difference.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from common import machine

import oba_fx  # noqa: E402
from oba_fx.io import write_json  # noqa: E402

SCORED = ["oba", "oba-network", "oba-gn", "oba-k3", "group-exact", "magnitude", "taylor", "obd", "obd-fisher",
          "random"]


def _zoo(name, **kw):
    def build():
        import models_zoo

        return models_zoo.create(name, in_channels=1, num_classes=10, **kw), (1, 28, 28)

    return build


def _tv(name, size=32):
    def build():
        import torchvision.models as tvm

        return getattr(tvm, name)(num_classes=10), (3, size, size)

    return build


def _timm(name, size=32, **kw):
    def build():  # timm comes with the bench extra; imported only when a timm model is recorded
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kw), (3, size, size)

    return build


MODELS = {
    "resnet20": _zoo("resnet20"),
    "vgg_small": _zoo("vgg_small"),
    "vit_small": _zoo("vit_small", img_size=28, depth=2),
    "tv_resnet18": _tv("resnet18"),
    "tv_mobilenet_v2": _tv("mobilenet_v2"),
    "tv_swin_t": _tv("swin_t", 64),
    "tv_vit": lambda: (__import__("torchvision").models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=10),
        (3, 32, 32)),
    "timm_convnext_atto": _timm("convnext_atto"),
    "timm_deit_tiny": _timm("deit_tiny_patch16_224", 32, img_size=32, patch_size=8, depth=2),
    "timm_efficientnet_b0": _timm("efficientnet_b0"),
}


def _groups(graph) -> list:
    out = []
    for g in graph.groups:
        out.append({"id": g.id, "size": g.size, "prunable": g.prunable, "label": str(g),
                    "members": sorted(repr(m) for m in g.members)})
    return out


def _arr(t: torch.Tensor) -> list:
    return [float(v) for v in t.detach().double().flatten().tolist()]


def _fingerprint(name: str, build) -> dict:
    torch.manual_seed(0)
    model, shape = build()
    model = model.double().eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, *shape, generator=g, dtype=torch.float64),
              torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    example = calib[0][0][:2]
    probe = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    row: dict = {}
    graph = oba_fx.trace(model, example)
    row["groups"] = _groups(graph)
    row["blocks"] = oba_fx.hessian_blocks(graph).to_text()
    scores = {}
    for crit in SCORED:
        kw = {"method": "probes", "probes": 4} if crit == "group-exact" else {}
        s = oba_fx.group_scores(graph, calib, crit, progress=False, **kw)
        scores[crit] = {str(k): _arr(v) for k, v in s.items()}
    from oba_fx import scoring

    if getattr(scoring, "GROUP_MARGINALS", None) is not None:  # the per-parameter route of the oba family
        scoring.GROUP_MARGINALS = False
        try:
            for crit in ("oba", "oba-network", "oba-gn"):
                s = oba_fx.group_scores(graph, calib, crit, progress=False)
                scores[crit + "/per-parameter"] = {str(k): _arr(v) for k, v in s.items()}
        finally:
            scoring.GROUP_MARGINALS = True
    else:
        for crit in ("oba", "oba-network", "oba-gn"):
            s = oba_fx.group_scores(graph, calib, crit, progress=False, marginals=False)
            scores[crit + "/per-parameter"] = {str(k): _arr(v) for k, v in s.items()}
    ps = oba_fx.parameter_scores(model, calib, "oba", progress=False)
    scores["parameter_scores/oba"] = {k: [float(v.sum())] for k, v in ps.items()}
    row["scores"] = scores
    comp = {}
    for crit, steps in (("oba", 2), ("magnitude", 1)):
        res = oba_fx.compress(model, example, calib, target_flops=0.5, criterion=crit, steps=steps,
                              progress=False, reestimate_bn=False)
        rep = res.report
        with torch.no_grad():
            out = res.model(probe)
        comp[crit] = {"flops": [rep["flops"]["before"], rep["flops"]["after"]],
                      "params": [rep["params"]["before"], rep["params"]["after"]],
                      "widths": rep["widths"], "removed": [s.get("removed") for s in rep["step_reports"]],
                      "output": _arr(out if torch.is_tensor(out) else out[0])}
    row["compress"] = comp
    res = oba_fx.compress_unstructured(model, calib, sparsity=0.5, criterion="oba", progress=False)
    row["unstructured"] = {k: int((v != 0).sum()) for k, v in res.model.state_dict().items()
                           if v.is_floating_point()}
    return row


def record(names, out):
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    rows = {}
    for name in names:
        print(f"[equivalence] {name}", flush=True)
        rows[name] = _fingerprint(name, MODELS[name])
    write_json(out, {"benchmark": "equivalence", "machine": machine(), "torch": torch.__version__,
                     "models": rows})


def _cmp(a, b, path, rtol, diffs):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'new' if k not in a else 'old'}")
            else:
                _cmp(a[k], b[k], f"{path}/{k}", rtol, diffs)
    elif (isinstance(a, list) and a and isinstance(a[0], float) and isinstance(b, list)
          and len(a) == len(b) and "/scores/" in path):
        scale = max(abs(v) for v in a) or 1.0
        err = max(abs(x - y) for x, y in zip(a, b)) / scale
        if err > rtol:
            diffs.append(f"{path}: relative difference {err:.3g} > {rtol:g}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and "/output" in path:
        scale = max(abs(v) for v in a) or 1.0
        err = max((abs(x - y) for x, y in zip(a, b)), default=0.0) / scale
        if err > rtol:
            diffs.append(f"{path}: relative difference {err:.3g} > {rtol:g}")
    elif a != b:
        diffs.append(f"{path}: {str(a)[:120]} != {str(b)[:120]}")


def compare(old, new, rtol, subset=False) -> int:
    a, b = (json.load(open(p))["models"] for p in (old, new))
    if subset:  # compare only the models NEW recorded
        a = {k: v for k, v in a.items() if k in b}
    diffs: list[str] = []
    _cmp(a, b, "", rtol, diffs)
    n = sum(len(v) for r in a.values() for v in r.get("scores", {}).values())
    print(f"[equivalence] {len(a)} models, {n} score arrays compared; {len(diffs)} differences")
    for d in diffs[:50]:
        print("  " + d)
    return 1 if diffs else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    p.add_argument("--rtol", type=float, default=1e-12)
    p.add_argument("--subset", action="store_true", help="compare only the models NEW recorded")
    p.add_argument("--smoke", action="store_true", help="record resnet20 twice (temporary files) and compare")
    a = p.parse_args(argv)
    if a.smoke:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            record(["resnet20"], f"{tmp}/a.json")
            record(["resnet20"], f"{tmp}/b.json")
            rc = compare(f"{tmp}/a.json", f"{tmp}/b.json", a.rtol)
        if rc == 0:
            print("smoke ok: resnet20 recorded twice, identical")
        return rc
    if a.compare:
        return compare(*a.compare, a.rtol, a.subset)
    if not a.out:
        p.error("--out FILE (record) or --compare OLD NEW")
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    record(a.models, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
