"""Two gloo processes on CPU reproduce single-process scores, decisions and slimmed models."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import oba_fx
import tiny_models

CRITERIA = ["oba", "oba-network", "oba-gn", "oba-k3", "taylor", "obd", "obd-fisher"]


def _setup():
    model, cal = tiny_models.make("residual_cnn", seed=3)
    gen = torch.Generator().manual_seed(11)
    cal = cal + [(torch.randn(b, 2, 5, 5, generator=gen, dtype=torch.float64),
                  torch.randint(0, 3, (b,), generator=gen)) for b in (6, 2, 4)]  # 6 uneven batches
    return model, cal


def _compute(process_group):
    model, cal = _setup()
    out = {c: oba_fx.parameter_scores(model, cal, c, process_group=process_group, progress=False, probes=3)
           for c in CRITERIA}
    graph = oba_fx.trace(model, cal[0][0][:2])
    out["group-exact"] = oba_fx.group_scores(graph, cal, "group-exact", method="vmap", process_group=process_group,
                                             progress=False)
    out["group-exact-probes"] = oba_fx.group_scores(graph, cal, "group-exact", method="probes", probes=3,
                                                    process_group=process_group, progress=False)
    # free widths: both steps remove channels (rounded, step 1 can land below step 2's goal)
    res = oba_fx.compress(model, cal[0][0][:2], cal, target_flops=0.6, steps=2, criterion="oba", round_to=None,
                          process_group=process_group, progress=False)
    out["removed"] = [s["removed_channels"] for s in res.report["step_reports"]]
    out["loss_before"] = [s["loss_before"] for s in res.report["step_reports"]]
    out["slim"] = {k: v.clone() for k, v in res.model.state_dict().items()}
    u = oba_fx.compress_unstructured(model, cal, sparsity=0.5, criterion="oba", steps=2,
                                     process_group=process_group, progress=False)
    out["masks"] = {k: v.clone() for k, v in u.model.state_dict().items() if k.endswith("_mask")}
    slim = res.model
    oba_fx.finetune(slim, cal, epochs=1, lr=0.01, process_group=process_group, progress=False)
    out["finetuned"] = {k: v.clone() for k, v in slim.state_dict().items()}
    return out


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_compute(True), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _close(a, b, what):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _close(a[k], b[k], f"{what}/{k}")
        return
    scale = max(float(b.abs().max()), 1e-300)
    err = float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) / scale
    assert err <= 1e-10, f"{what}: relative difference {err:.2e}"


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_ranks_reproduce_single_process(tmp_path):
    world = 2
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / "init"), str(tmp_path))) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    single = _compute(None)
    for crit in CRITERIA + ["group-exact", "group-exact-probes"]:
        for r in ranks:
            _close(r[crit], single[crit], crit)
    for r in ranks:
        assert r["removed"] == single["removed"]  # the same groups, in both steps
        assert r["loss_before"] == pytest.approx(single["loss_before"], rel=1e-12)
        _close(r["slim"], single["slim"], "slimmed model")
        assert r["masks"].keys() == single["masks"].keys() and r["masks"]
        assert all(torch.equal(r["masks"][k], single["masks"][k]) for k in r["masks"])  # unstructured: same masks
    # DDP keeps the ranks' fine-tuned weights identical
    _close(ranks[0]["finetuned"], ranks[1]["finetuned"], "fine-tuned (rank 0 vs 1)")


def test_process_group_without_init_is_a_clear_error():
    model, cal = _setup()
    with pytest.raises(RuntimeError, match="init_process_group"):
        oba_fx.parameter_scores(model, cal, "oba", process_group=True, progress=False)


# --------------------------------------------------------------------------- memory controls

def test_micro_batching_gives_the_same_scores():
    model, cal = _setup()
    for crit in ("oba", "oba-network", "oba-gn", "taylor"):
        full = oba_fx.parameter_scores(model, cal, crit, progress=False)
        micro = oba_fx.parameter_scores(model, cal, crit, progress=False, micro_batch=2)
        _close(micro, full, f"micro-batched {crit}")
    graph = oba_fx.trace(model, cal[0][0][:2])
    _close(oba_fx.group_scores(graph, cal, "oba", progress=False, micro_batch=3),
           oba_fx.group_scores(graph, cal, "oba", progress=False), "micro-batched group scores")


def test_scoring_a_subset_of_layers():
    model, cal = _setup()
    names = [n for n, _ in model.named_parameters()][:2]
    sub = oba_fx.parameter_scores(model, cal, "oba", params=names, progress=False)
    assert list(sub) == names


def test_out_of_memory_names_the_fixes(monkeypatch):
    import oba_fx.passes.curvature as cv

    def boom(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 123456789 bytes")

    monkeypatch.setattr(cv, "_batch_fwad", boom)
    model, cal = _setup()
    with pytest.raises(MemoryError, match="micro_batch=K.*params="):
        oba_fx.parameter_scores(model, cal, "oba", progress=False)
