"""Datasets, training/resume and every oba-fx subcommand, end to end on a tiny synthetic Fashion-MNIST."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import oba_fx
from oba_fx.cli import main
from oba_fx.data import DatasetNotFound, TensorLoader, find_fashion_mnist, get_dataset, read_idx

ROOT = Path(__file__).resolve().parents[1]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    """A synthetic Fashion-MNIST in the real idx.gz layout: class k is a bright bar at row 2k (learnable)."""
    d = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 10, n)
        x = rng.integers(0, 60, (n, 28, 28))
        for i, k in enumerate(y):
            x[i, 2 * k + 4: 2 * k + 6, 4:24] = 250
        return x.astype(np.uint8), y.astype(np.uint8)

    xtr, ytr = make(384)
    xte, yte = make(128)
    _write_idx(d / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(d / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(d / "t10k-images-idx3-ubyte.gz", xte)
    _write_idx(d / "t10k-labels-idx1-ubyte.gz", yte)
    return d


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- datasets

def test_idx_reader_and_spec(fmnist_dir):
    x = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz")
    assert x.shape == (384, 28, 28) and x.dtype == np.uint8
    spec = get_dataset("fashion-mnist", fmnist_dir)
    assert (spec.num_classes, spec.input_shape, spec.train_size, spec.test_size) == (10, (1, 28, 28), 384, 128)
    xb, yb = next(iter(spec.test(64)))
    assert xb.shape == (64, 1, 28, 28) and yb.dtype == torch.int64
    # normalised with the Fashion-MNIST mean/std
    raw = torch.from_numpy(read_idx(fmnist_dir / "t10k-images-idx3-ubyte.gz")[:64]).float() / 255
    torch.testing.assert_close(xb[:, 0], (raw - 0.2860) / 0.3530)


def test_env_var_and_missing_dataset_message(fmnist_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("OBA_FX_DATA", str(fmnist_dir))
    assert find_fashion_mnist()["train_x"].parent == fmnist_dir
    monkeypatch.delenv("OBA_FX_DATA")
    with pytest.raises(DatasetNotFound) as e:
        find_fashion_mnist(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_loader_is_seeded_per_epoch_and_augments(fmnist_dir):
    spec = get_dataset("fashion-mnist", fmnist_dir)
    a, b = spec.train(32, seed=3), spec.train(32, seed=3)
    a.set_epoch(1), b.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    b.set_epoch(2)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])
    plain = TensorLoader(torch.full((4, 1, 6, 6), 255, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), 4,
                         (0.0,), (1.0,), augment=True, pad=2, flip=False, seed=0)
    x, _ = next(iter(plain))
    assert x.shape == (4, 1, 6, 6) and (x == 0).any() and (x == 1).any()  # zero padding shows at shifted crops
    c1, c2 = spec.calibration(2, 16, seed=5), spec.calibration(2, 16, seed=5)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(c1, c2)) and len(c1) == 2


def test_cifar_python_batches(tmp_path):
    import pickle

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 10, 20).tolist()}, f)
    spec = get_dataset("cifar10", tmp_path)
    assert (spec.train_size, spec.test_size, spec.input_shape) == (100, 20, (3, 32, 32))
    x, _ = next(iter(spec.train(8)))
    assert x.shape == (8, 3, 32, 32)
    with pytest.raises(DatasetNotFound, match="cifar100"):
        get_dataset("cifar100", tmp_path)


# --------------------------------------------------------------------------- training

class _Interrupt(Exception):
    pass


class _StopAt:
    """A loader that raises at the start of a given epoch (simulates a killed run)."""

    def __init__(self, loader, epoch):
        self.loader, self.stop, self.epoch = loader, epoch, 0

    def set_epoch(self, e):
        self.epoch = e
        self.loader.set_epoch(e)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.epoch == self.stop:
            raise _Interrupt
        return iter(self.loader)


def test_resume_reaches_the_same_weights(fmnist_dir, tmp_path):
    import models_zoo

    spec = get_dataset("fashion-mnist", fmnist_dir, limit_train=128)

    def fresh():
        torch.manual_seed(0)
        return models_zoo.create("resnet20", in_channels=1)

    kw = dict(lr=0.05, progress=False, log=lambda m: None, model_spec={"name": "resnet20",
                                                                       "kwargs": {"in_channels": 1}})
    straight = fresh()
    oba_fx.train(straight, spec.train(32, seed=1), 2, checkpoint=tmp_path / "a.pt", **kw)
    interrupted = fresh()
    with pytest.raises(_Interrupt):
        oba_fx.train(interrupted, _StopAt(spec.train(32, seed=1), 1), 2, checkpoint=tmp_path / "b.pt", **kw)
    resumed = fresh()
    oba_fx.train(resumed, spec.train(32, seed=1), 2, checkpoint=tmp_path / "b.pt", resume=True, **kw)
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k
    model, ck = oba_fx.load_checkpoint(tmp_path / "b.pt")
    assert ck["epoch"] == 2 and all(torch.equal(v, w) for v, w in zip(model.state_dict().values(),
                                                                       resumed.state_dict().values()))


# --------------------------------------------------------------------------- CLI end to end

@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert run_cli("train", "--model", "resnet20", "--data", fmnist_dir, "--epochs", 1, "--batch-size", 64,
                   "--out", out) == 0
    return out / "checkpoint.pt"


def test_train_writes_checkpoint_and_history(trained):
    hist = json.loads((trained.parent / "train_history.json").read_text())
    assert len(hist["history"]) == 1 and "test_accuracy" in hist["history"][0]


def test_inspect_and_blocks(trained, tmp_path, capsys):
    assert run_cli("inspect", "resnet20", "--out", tmp_path / "a") == 0
    assert "prunable" in capsys.readouterr().out
    assert (tmp_path / "a" / "groups.json").exists() and (tmp_path / "a" / "ir.graphml").exists()
    assert run_cli("inspect", trained, "--hessian-blocks", "--out", tmp_path / "b", "--rows", 5) == 0
    out = capsys.readouterr().out
    assert "frozen" in out.lower() or "group" in out.lower()
    for f in ("hessian_blocks.png", "hessian_blocks.graphml", "hessian_blocks.dot", "hessian_blocks.json"):
        assert (tmp_path / "b" / f).stat().st_size > 0, f
    blocks = json.loads((tmp_path / "b" / "hessian_blocks.json").read_text())
    assert blocks  # classification was written


@pytest.mark.slow
@pytest.mark.onnx
def test_compress_eval_export_bench(trained, fmnist_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert run_cli("compress", trained, "--data", fmnist_dir, "--target-flops", 0.5, "--criterion", "oba",
                   "--steps", 2, "--finetune-epochs", 1, "--calib-batches", 2, "--calib-batch-size", 16,
                   "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())
    assert abs(rep["compress"]["flops"]["ratio"] - 0.5) <= 0.02
    assert [s["step"] for s in rep["steps"]] == [0, 1, 2]
    for f in ("model.pt", "model.onnx", "widths.png", "steps.png"):
        assert (out / f).stat().st_size > 0, f
    slim, meta = oba_fx.load(out / "model.pt", with_meta=True)
    assert meta["dataset"] == "fashion-mnist" and meta["input_shape"] == [1, 28, 28]
    capsys.readouterr()
    assert run_cli("eval", out / "model.pt", "--data", fmnist_dir, "--json", tmp_path / "e.json") == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["samples"] == 128 and abs(ev["accuracy"] - rep["after"]["accuracy"]) < 1e-12
    assert run_cli("export", out / "model.pt", "--out", tmp_path / "m.onnx") == 0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = slim(x).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert run_cli("bench", out / "model.pt", "--baseline", trained, "--repeats", 3, "--json",
                   tmp_path / "b.json") == 0
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {(r["model"], r["backend"], r["batch"]) for r in rows} == {
        (m, b, n) for m in ("original", "slimmed") for b in ("pytorch", "onnxruntime") for n in (1, 32)}
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 for r in rows)
    capsys.readouterr()
    assert run_cli("bench", out / "model.pt", "--no-onnx", "--channels-last", "--compile", "--batch-sizes", 2,
                   "--repeats", 2, "--json", tmp_path / "m.json") == 0
    res = json.loads((tmp_path / "m.json").read_text())
    assert {r["backend"] for r in res["rows"]} == {"pytorch", "pytorch-channels_last", "pytorch-compiled"}
    (g,) = res["pytorch_guidance"]
    assert g["model"] == "model" and g["batch"] == 2 and g["best"] in g["modes"]
    assert "PyTorch guidance, model at batch 2: " in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.onnx
def test_compress_compensate_and_reestimate_bn_flags(trained, fmnist_dir, tmp_path):
    out = tmp_path / "c"
    # both on by default
    assert run_cli("compress", trained, "--data", fmnist_dir, "--target-flops", 0.6, "--criterion", "magnitude",
                   "--calib-batches", 2, "--calib-batch-size", 16, "--out", out) == 0
    rep = json.loads((out / "report.json").read_text())["compress"]
    assert rep["post_rewrite"] == {"compensate": True, "damping": 0.01, "reestimate_bn": "calibration batches"}
    post = rep["step_reports"][0]["post_rewrite"]
    assert post["compensation"]["layers"] and post["batchnorm"]["layers"] > 0
    off = tmp_path / "off"
    assert run_cli("compress", trained, "--data", fmnist_dir, "--target-flops", 0.6, "--criterion", "magnitude",
                   "--calib-batches", 2, "--calib-batch-size", 16, "--no-compensate", "--no-reestimate-bn",
                   "--out", off) == 0
    rep = json.loads((off / "report.json").read_text())["compress"]
    assert rep["post_rewrite"] == {"compensate": False, "damping": None, "reestimate_bn": False}
    assert set(rep["step_reports"][0]["post_rewrite"]) == {"loss_after_rewrite"}


@pytest.mark.slow
@pytest.mark.onnx
def test_demo_smoke(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_cli("demo", "--smoke", "--data", fmnist_dir, "--out", out, "--epochs", 1, "--finetune-epochs", 1,
                   "--calib-batches", 2, "--repeats", 2, "--batch-size", 64) == 0
    s = json.loads((out / "summary.json").read_text())
    assert abs(s["flops_after"] / s["flops_before"] - 0.4) <= 0.02
    assert set(s["speedup"]) == {"onnxruntime batch 1", "onnxruntime batch 32", "pytorch batch 1",
                                 "pytorch batch 32"}
    text = capsys.readouterr().out
    assert "test accuracy" in text and "speed-up, pytorch batch 32" in text
    for f in ("train/checkpoint.pt", "compressed/model.pt", "compressed/model.onnx", "compressed/report.json",
              "bench.json", "summary.md"):
        assert (out / f).exists(), f


@pytest.mark.slow
@pytest.mark.onnx
def test_demo_smoke_latency_goal(fmnist_dir, tmp_path, capsys, monkeypatch):
    """The demo's default kind of goal, a fraction of the PyTorch latency (--smoke alone prunes to 40% FLOPs):
    the latency table is measured for real (here at batch 16, into a fresh cache), the result is re-measured, and
    the summary and title carry the goal and the measurement."""
    monkeypatch.setenv("OBA_FX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert run_cli("demo", "--smoke", "--data", fmnist_dir, "--out", out, "--epochs", 1, "--finetune-epochs", 0,
                   "--calib-batches", 2, "--repeats", 2, "--batch-size", 64, "--target-latency", 0.9,
                   "--latency-batch", 16) == 0
    s = json.loads((out / "summary.json").read_text())
    assert (s["target_latency"], s["backend"], s["latency_batch"], s["target_flops"]) == (0.9, "pytorch", 16, None)
    lat = s["latency"]
    assert lat["backend"] == "pytorch" and lat["batch"] == 16 and lat["target_fraction"] == 0.9
    assert 0 < lat["measured_fraction"] <= 1.5 and s["flops_after"] < s["flops_before"]
    assert any((tmp_path / "cache" / "latency").iterdir()), "the per-layer table was not cached"
    assert "90% of its pytorch latency at batch 16" in (out / "summary.md").read_text()


def test_demo_rejects_two_goals(tmp_path, capsys):
    """Checked before any training starts (nothing is written)."""
    assert main(["demo", "--out", str(tmp_path / "d"), "--target-flops", "0.4", "--target-latency", "0.5"]) == 2
    assert "give one of --target-flops and --target-latency" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- user errors: one line, exit 2

def _cli_subprocess(*argv, env=None):
    e = dict(os.environ, **(env or {}))
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "oba_fx", *map(str, argv)], capture_output=True, text=True, env=e,
                          cwd=ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing-dataset", "unknown-model", "corrupt-checkpoint", "target-out-of-range",
                                  "missing-checkpoint", "bad-micro-batch"])
def test_user_errors_are_one_line(case, trained, fmnist_dir, tmp_path):
    if case == "missing-dataset":
        argv = ["train", "--model", "resnet20", "--epochs", "1", "--out", tmp_path / "r", "--data", tmp_path / "no"]
        expect = "Fashion-MNIST not found"
    elif case == "unknown-model":
        argv = ["inspect", "resnet21"]
        expect = "did you mean"
    elif case == "corrupt-checkpoint":
        bad = tmp_path / "bad.pt"
        bad.write_bytes(trained.read_bytes()[:2000])
        argv = ["eval", bad, "--data", fmnist_dir]
        expect = "truncated or corrupt"
    elif case == "bad-micro-batch":
        argv = ["compress", trained, "--data", fmnist_dir, "--micro-batch", "0", "--out", tmp_path / "o"]
        expect = "--micro-batch must be >= 1"
    elif case == "missing-checkpoint":
        argv = ["compress", tmp_path / "none.pt", "--out", tmp_path / "o"]
        expect = "does not exist"
    else:
        argv = ["compress", trained, "--data", fmnist_dir, "--target-flops", "1.5", "--out", tmp_path / "o"]
        expect = "(0, 1]"
    r = _cli_subprocess(*argv, env={"OBA_FX_DATA": ""})
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("oba-fx: error:") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
@pytest.mark.onnx
def test_torchrun_compress_matches_single_process(trained, fmnist_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m oba_fx compress ...` (gloo): same pruning decision, rank 0 writes."""
    common = ["compress", trained, "--data", fmnist_dir, "--target-flops", "0.5", "--criterion", "oba",
              "--calib-batches", "4", "--calib-batch-size", "16", "--finetune-epochs", "1"]
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                        "29533", "-m", "oba_fx", *map(str, common), "--out", str(tmp_path / "dist")],
                       capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # the single process also exercises the memory controls, which must not change the decision
    assert run_cli(*common, "--micro-batch", "8", "--activation-checkpoint", "--out", tmp_path / "single") == 0
    dist_rep = json.loads((tmp_path / "dist" / "report.json").read_text())
    single_rep = json.loads((tmp_path / "single" / "report.json").read_text())
    assert (dist_rep["compress"]["step_reports"][0]["removed_channels"]
            == single_rep["compress"]["step_reports"][0]["removed_channels"])
    assert (tmp_path / "dist" / "model.onnx").exists()


def test_only_usage_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    """A caller's mistake (UsageError, a ValueError) prints one line and exits 2; a plain ValueError from
    inside the library is a bug: it propagates with its traceback instead of posing as a user error."""
    import oba_fx.cli as cli

    def usage(*a, **k):
        raise oba_fx.UsageError("--epochs must be >= 1, got 0")

    monkeypatch.setattr(cli, "run_train", usage)
    argv = ["train", "--model", "resnet20", "--epochs", "1", "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "oba-fx: error: --epochs must be >= 1, got 0"

    def bug(*a, **k):
        raise ValueError("too many values to unpack (expected 2)")

    monkeypatch.setattr(cli, "run_train", bug)
    with pytest.raises(ValueError, match="too many values"):
        main(argv)
    assert issubclass(oba_fx.CalibrationError, oba_fx.UsageError) and issubclass(oba_fx.UsageError, ValueError)
    assert issubclass(oba_fx.CheckpointError, oba_fx.UsageError)


def test_run_compress_keyword_form_still_works_with_a_deprecation_warning(tmp_path):
    """0.1's run_compress(checkpoint, out, target_flops=..., ...) maps onto CompressSettings (deprecated)."""
    from oba_fx.workflows import CompressSettings, run_compress

    with pytest.warns(DeprecationWarning, match="settings=CompressSettings"):
        with pytest.raises(oba_fx.UsageError, match="does not exist"):
            run_compress(str(tmp_path / "missing.pt"), tmp_path / "out", target_flops=0.4, steps=2, args=None)
    with pytest.raises(TypeError, match="target_flop"):
        run_compress(str(tmp_path / "missing.pt"), tmp_path / "out", target_flop=0.4)
    assert CompressSettings(target_flops=0.4).goal() == "40% FLOPs"
