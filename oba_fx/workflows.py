"""The command line's workflows as functions with explicit arguments: train, compress, bench, the demo.

``oba_fx.cli`` parses flags into these calls and prints their errors; a script can call them directly::

    from oba_fx.workflows import CompressSettings, run_compress
    run_compress("runs/r20/checkpoint.pt", Path("runs/r20-slim"), CompressSettings(target_flops=0.4))

``UserError`` (``oba_fx.UsageError``) marks a problem with the caller's input: the command line prints it as one
line and exits with status 2.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .io import write_json, write_text
from .passes.distributed import is_rank0
from .passes.errors import UsageError

__all__ = ["UserError", "Limits", "CompressSettings", "DemoSettings", "DEMO_LATENCY", "load_model", "run_train",
           "run_compress", "run_bench", "run_demo", "demo_target", "demo_table", "parse_input_shape",
           "input_shape_of", "trace_quiet", "check_fraction", "open_dataset", "log"]

#: a problem with the command's input; printed as one line, no traceback
UserError = UsageError


@dataclass(frozen=True)
class Limits:
    """Seeded subsets of a data set: at most ``train`` training and ``test`` test samples (None: all)."""

    train: int | None = None
    test: int | None = None


# --------------------------------------------------------------------------- shared steps

def log(msg: str) -> None:
    if is_rank0():
        print(msg, flush=True)


def init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPU, else gloo); returns True, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def check_fraction(value: float, what: str) -> float:
    if not (0 < value <= 1):
        raise UserError(f"{what} must be a fraction of the original in (0, 1], e.g. 0.4; got {value}")
    return value


def open_dataset(name: str, data: str | None, limits: Limits | None = None):
    """A data set by name (``oba_fx.get_dataset``), optionally cut to seeded subsets."""
    from .data import get_dataset

    limits = limits or Limits()
    return get_dataset(name, data, limit_train=limits.train, limit_test=limits.test)


def zoo_kwargs(name: str, shape: tuple[int, ...], num_classes: int | None = None) -> dict:
    import models_zoo

    kw: dict = {}
    if name in models_zoo.ZOO:
        kw["in_channels"] = shape[0]
        if name.startswith("vit"):
            kw["img_size"] = shape[-1]
    if num_classes is not None:
        kw["num_classes"] = num_classes
    return kw


def unknown_model(text: str) -> UserError:
    import difflib

    import models_zoo

    close = difflib.get_close_matches(text, models_zoo.names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return UserError(f"'{text}' is neither a file nor a known model name{hint}; zoo models: "
                     f"{', '.join(models_zoo.ZOO)}, or any torchvision classification model name")


def load_model(text: str, input_shape: tuple[int, ...] | None = None) -> tuple[torch.nn.Module, dict]:
    """A model from a training checkpoint, an ``oba_fx.save`` file, or a model name.

    Returns ``(model in eval mode, info)`` where info has ``kind``, ``name``,
    ``input_shape`` (one sample), ``dataset`` and ``num_classes`` where known.
    """
    import models_zoo

    from .export import FORMAT, load
    from .train import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint

    path = Path(text)
    if path.is_file():
        try:
            head = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - truncated/corrupt archives raise many types
            raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); it is truncated or corrupt, "
                            "re-create it with 'oba-fx train' or 'oba-fx compress'") from None
        fmt = head.get("format") if isinstance(head, dict) else None
        if fmt == CHECKPOINT_FORMAT:
            try:
                model, ck = load_checkpoint(path)
            except CheckpointError as e:
                raise UserError(str(e)) from None
            meta = ck.get("meta", {})
            info = {"kind": "checkpoint", "name": ck["model"]["name"], **meta}
        elif fmt == FORMAT:
            model, meta = load(path, with_meta=True)
            info = {"kind": "module", **meta}
        else:
            raise UserError(f"{path} is neither an oba_fx training checkpoint ({CHECKPOINT_FORMAT}) nor an "
                            f"oba_fx module file ({FORMAT})")
        if input_shape:
            info["input_shape"] = list(input_shape)
        return model.eval(), info
    if text not in models_zoo.names():
        if path.suffix in (".pt", ".pth", ".ckpt") or os.sep in text:
            raise UserError(f"checkpoint {path} does not exist")
        raise unknown_model(text)
    shape = tuple(input_shape) if input_shape else ((1, 28, 28) if text in models_zoo.ZOO else (3, 224, 224))
    model = models_zoo.create(text, **zoo_kwargs(text, shape))
    return model.eval(), {"kind": "name", "name": text, "input_shape": list(shape)}


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape``: one sample's shape C,H,W (a leading batch dim of 1 is accepted)."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--input-shape must be comma-separated ints like 3,32,32, got '{text}'") from None
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    return shape


def input_shape_of(info: dict, spec=None) -> tuple[int, ...]:
    if spec is not None:
        shape = tuple(spec.input_shape)
        if info.get("input_shape") and tuple(info["input_shape"]) != shape:
            raise UserError(f"the model takes inputs of shape {tuple(info['input_shape'])} but dataset "
                            f"{spec.name} has {shape}; use the dataset it was trained on")
        return shape
    if not info.get("input_shape"):
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W")
    return tuple(info["input_shape"])


def trace_quiet(model, x):
    import oba_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", oba_fx.UnknownOpWarning)  # listed by the caller
        return oba_fx.trace(model, x)


# --------------------------------------------------------------------------- train

def run_train(model_name: str, dataset: str, epochs: int, out: Path, *, data=None, resume=False, lr=0.1,
              batch_size=128, schedule="onecycle", seed=0, limits: Limits | None = None) -> dict:
    import models_zoo

    from .train import train

    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if model_name not in models_zoo.names():
        raise unknown_model(model_name)
    spec = open_dataset(dataset, data, limits)
    kw = zoo_kwargs(model_name, spec.input_shape, spec.num_classes)
    torch.manual_seed(seed)
    model = models_zoo.create(model_name, **kw)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint.pt"
    if ck.exists() and not resume:
        raise UserError(f"{ck} exists; pass --resume to continue that run or choose another --out")
    if resume and not ck.exists():
        raise UserError(f"--resume: {ck} does not exist (nothing to resume)")
    meta = {"dataset": spec.name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes}
    log(f"training {model_name} on {spec.name} ({spec.train_size} train / {spec.test_size} test samples from "
         f"{spec.root}) for {epochs} epochs, batch {batch_size}, {schedule} lr {lr}")
    res = train(model, spec.train(batch_size, seed=seed), epochs, lr=lr, schedule=schedule, checkpoint=ck,
                resume=resume, model_spec={"name": model_name, "kwargs": kw}, eval_data=spec.test(512),
                meta=meta, seed=seed, log=log)
    write_json(out / "train_history.json", {"model": model_name, "dataset": spec.describe(), "history": res["history"]})
    log(f"wrote {ck}")
    return {"checkpoint": str(ck), "history": res["history"], "model": model}


# --------------------------------------------------------------------------- compress

@dataclass
class CompressSettings:
    """What ``oba-fx compress`` (and the demo's compress stage) does: the flags, with the CLI's defaults."""

    target_flops: float | None = 0.5
    target_latency: float | None = None
    latency_batch: int = 1
    criterion: str | None = None  # None: oba_fx.DEFAULT_CRITERION
    steps: int = 1
    scope: str = "global"
    finetune_epochs: int = 0
    lr: float = 0.01
    batch_size: int = 128
    calib_batches: int = 8
    calib_batch_size: int = 64
    kd: bool = False
    round_to: int | str | None = "auto"
    backend: str = "onnxruntime"
    seed: int = 0
    micro_batch: int | None = None
    activation_checkpoint: bool | int = False
    compensate: bool = True
    reestimate_bn: bool = True

    def check(self) -> None:
        """Bad values raise ``UserError`` naming the flag, before any work starts."""
        import oba_fx

        if self.target_flops is not None or self.target_latency is None:
            check_fraction(self.target_flops, "--target-flops")
        if self.target_latency is not None:
            check_fraction(self.target_latency, "--target-latency")
        if self.latency_batch < 1:
            raise UserError(f"--latency-batch must be >= 1, got {self.latency_batch}")
        from .compress_plan import compress_criteria

        self.criterion = self.criterion or oba_fx.DEFAULT_CRITERION
        if self.criterion not in compress_criteria():
            raise UserError(f"unknown criterion '{self.criterion}'; choose from {', '.join(compress_criteria())}")
        if self.steps < 1:
            raise UserError(f"--steps must be >= 1, got {self.steps}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UserError(f"--micro-batch must be >= 1, got {self.micro_batch}")
        ac = self.activation_checkpoint
        if ac is not True and ac is not False and ac < 1:
            raise UserError(f"--activation-checkpoint takes a number of segments >= 1, got {ac}")
        if self.finetune_epochs < 0:
            raise UserError(f"--finetune-epochs must be >= 0, got {self.finetune_epochs}")

    def goal(self) -> str:
        if self.target_latency is not None:
            return f"{self.target_latency:.0%} of its {self.backend} latency at batch {self.latency_batch}"
        return f"{self.target_flops:.0%} FLOPs"

    def to_report(self, round_multiple) -> dict:
        return {"target_flops": self.target_flops, "criterion": self.criterion, "steps": self.steps,
                "scope": self.scope, "finetune_epochs_per_step": self.finetune_epochs, "lr": self.lr, "kd": self.kd,
                "round_to": self.round_to, "backend": self.backend, "round_multiple": round_multiple,
                "target_latency": self.target_latency, "latency_batch": self.latency_batch,
                "calibration": {"batches_per_step": self.calib_batches, "batch_size": self.calib_batch_size},
                "seed": self.seed}


def run_compress(checkpoint: str, out: Path, settings: CompressSettings | None = None, *, dataset: str | None = None,
                 data: str | None = None, limits: Limits | None = None, **flags) -> dict:
    """Compress a checkpoint on its data set: evaluate, prune (and fine-tune) to the goal, save, export, plot.

    Writes ``model.pt``, ``model.onnx``, ``report.json``, ``widths.png`` and ``steps.png`` into ``out``
    (rank 0 only under torchrun). Returns ``{"report", "model", "original", "input_shape"}``.
    ``flags``: the settings as keywords (``target_flops=0.4``), the 0.1 form (deprecated; pass ``settings``).
    """
    import oba_fx

    from .train import evaluate

    s = settings or CompressSettings()
    if flags:
        s = _legacy_settings(s, flags)
    s.check()
    model, info = load_model(checkpoint)
    dataset = dataset or info.get("dataset")
    if not dataset:
        raise UserError(f"{checkpoint} does not record its dataset; pass --dataset")
    spec = open_dataset(dataset, data, limits)
    shape = input_shape_of(info, spec)
    pg = init_distributed()  # torchrun: every rank scores its shard; rank 0 writes
    out.mkdir(parents=True, exist_ok=True)
    test = spec.test(512)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(s.seed))
    flops0, params0 = oba_fx.count(model, example[:1])
    log(f"evaluating the original model on {spec.test_size} test samples")
    before = evaluate(model, test, progress=True)
    log(f"original: accuracy {before['accuracy']:.4f}, loss {before['loss']:.4f}, {flops0 / 1e6:.2f} MFLOPs")
    records = [{"step": 0, "accuracy": before["accuracy"], "loss": before["loss"], "flops": flops0,
                "params": params0, "flops_fraction": 1.0}]
    after_step = _after_step(s, spec, test, example, records, teacher=model if s.kd else None, process_group=pg)
    log(f"compressing to {s.goal()} with '{s.criterion}' in {s.steps} step(s), scope {s.scope}")
    res = oba_fx.compress(model, example, spec.calibration(s.calib_batches * s.steps, s.calib_batch_size, s.seed),
                          target_flops=s.target_flops, criterion=s.criterion, steps=s.steps,
                          target_latency=s.target_latency, latency_batch=s.latency_batch,
                          scope=s.scope, round_to=s.round_to, backend=s.backend, finetune=after_step,
                          batches_per_step=s.calib_batches,
                          seed=s.seed, process_group=pg, progress=is_rank0(), micro_batch=s.micro_batch,
                          checkpoint=s.activation_checkpoint, compensate=s.compensate, reestimate_bn=s.reestimate_bn)
    if not is_rank0():  # every rank holds the identical slimmed model; rank 0 writes the files
        return {"report": None, "model": res.model, "original": model, "input_shape": shape}
    report = _write_compressed(res, s, checkpoint, out, info, spec, shape, example, before, records)
    return {"report": report, "model": res.model, "original": model, "input_shape": shape}


def _legacy_settings(s: CompressSettings, flags: dict) -> CompressSettings:
    """``run_compress(..., target_flops=..., args=...)`` as in 0.1: the keywords become settings."""
    flags = dict(flags)
    flags.pop("args", None)  # 0.1 passed the argparse namespace for --limit-train/--limit-test
    names = {f.name for f in fields(CompressSettings)}
    unknown = sorted(set(flags) - names)
    if unknown:
        raise TypeError(f"run_compress() got unexpected keyword arguments {unknown}")
    warnings.warn("run_compress(checkpoint, out, target_flops=..., ...) is deprecated; pass "
                  "settings=CompressSettings(...) (the keyword form goes in 0.3)", DeprecationWarning, stacklevel=3)
    return replace(s, **flags)


def _after_step(s: CompressSettings, spec, test, example, records: list, teacher, process_group):
    """compress's per-step callback: fine-tune (if asked), evaluate, record the step."""
    import oba_fx

    from .train import evaluate

    train_data = spec.train(s.batch_size, seed=s.seed + 1)
    flops0 = records[0]["flops"]

    def after_step(m, step):
        if s.finetune_epochs:
            oba_fx.finetune(m, train_data, epochs=s.finetune_epochs, lr=s.lr, teacher=teacher,
                            process_group=process_group, progress=is_rank0())
        ev = evaluate(m, test, progress=True)
        f, p = oba_fx.count(m, example[:1])
        records.append({"step": step, "accuracy": ev["accuracy"], "loss": ev["loss"], "flops": f, "params": p,
                        "flops_fraction": f / flops0})
        log(f"step {step}/{s.steps}: {f / flops0:.1%} FLOPs, accuracy {ev['accuracy']:.4f}"
            + (f" after {s.finetune_epochs} fine-tuning epoch(s)" if s.finetune_epochs else " (no fine-tuning)"))

    return after_step


def _write_compressed(res, s: CompressSettings, checkpoint, out: Path, info, spec, shape, example, before,
                      records) -> dict:
    """Save, export, plot and report a compress run (rank 0); returns the report."""
    import oba_fx

    from .plots import plot_steps, plot_widths

    slim = res.model
    flops0, params0 = records[0]["flops"], records[0]["params"]
    flops1, params1 = oba_fx.count(slim, example[:1])
    after = {"accuracy": records[-1]["accuracy"], "loss": records[-1]["loss"], "flops": flops1, "params": params1}
    meta = {"dataset": spec.name, "input_shape": list(shape), "num_classes": spec.num_classes,
            "name": f"{info.get('name', 'model')}-slim", "source": str(checkpoint), "criterion": s.criterion,
            "target_flops": s.target_flops}
    oba_fx.save(slim, out / "model.pt", meta=meta)
    onnx_path = oba_fx.export_onnx(slim, example, out / "model.onnx")
    report = {
        "source": str(checkpoint), "dataset": spec.describe(),
        "settings": s.to_report(res.report["widths_rounding"]["multiple"]),
        "before": {**before, "flops": flops0, "params": params0},
        "after": after,
        "flops_counted_for": "one sample (batch 1)",
        "steps": records,
        "compress": res.report,
        "files": {"model": str(out / "model.pt"), "onnx": str(onnx_path)},
    }
    name = info.get("name", "model")
    plot_widths(res.report["widths"]["before"], res.report["widths"]["after"], out / "widths.png",
                title=f"{name}: per-layer width, {s.criterion} to {s.goal()}")
    plot_steps(records, out / "steps.png", title=f"{name}: accuracy and FLOPs across steps ({s.criterion})")
    report["files"].update(widths_plot=str(out / "widths.png"), steps_plot=str(out / "steps.png"))
    write_json(out / "report.json", report)
    log(f"slimmed: {res.report['flops']['ratio']:.1%} FLOPs, {res.report['params']['ratio']:.1%} params, "
        f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}")
    lat = res.report.get("latency")
    if lat and "measured_fraction" in lat:
        log(f"latency ({lat['backend']}, batch {lat['batch']}): {lat['measured_fraction']:.1%} of the original "
            f"measured ({lat['measured_ms']:.2f} ms vs {lat['original_ms']:.2f} ms), {lat['predicted_fraction']:.1%} "
            f"predicted; target {lat['target_fraction']:.0%}")
    log(f"wrote {out / 'model.pt'}, {onnx_path}, {out / 'report.json'}, widths.png, steps.png")
    return report


# --------------------------------------------------------------------------- bench

def run_bench(models: dict, shape, batch_sizes, repeats: int, json_path: Path | None, onnx: bool = True,
              channels_last: bool = False, compiled: bool = False) -> dict:
    from .latency import measure_latency, pytorch_guidance

    res = measure_latency(models, shape, batch_sizes=batch_sizes, repeats=repeats, onnx=onnx,
                          channels_last=channels_last, compiled=compiled)
    log(f"{'model':<10} {'backend':<21} {'batch':>5} {'median ms':>10} {'p10':>8} {'p90':>8} {'speed-up':>9}")
    for r in res["rows"]:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        log(f"{r['model']:<10} {r['backend']:<21} {r['batch']:>5} {r['median_ms']:>10.3f} {r['p10_ms']:>8.3f} "
             f"{r['p90_ms']:>8.3f} {sp:>9}")
    if channels_last or compiled:
        res["pytorch_guidance"] = pytorch_guidance(res["rows"])
        for g in res["pytorch_guidance"]:
            advice = ("eager in the default memory format is fastest (no other mode gains 5%)"
                      if g["best"] == "pytorch" else
                      f"run it as {g['best']}: {g['gain']:.2f}x eager ({g['best_ms']:.3f} ms vs {g['eager_ms']:.3f})")
            log(f"PyTorch guidance, {g['model']} at batch {g['batch']}: {advice}")
    if json_path:
        write_json(json_path, res)
        log(f"wrote {json_path}")
    return res


# --------------------------------------------------------------------------- demo

#: the demo's default goal: this fraction of the original's PyTorch eager latency at batch 32
DEMO_LATENCY = 0.55


@dataclass
class DemoSettings:
    """The demo's flags (``oba-fx demo``), with its defaults."""

    model: str = "resnet20"
    epochs: int = 6
    target_flops: float | None = None
    target_latency: float | None = None
    latency_batch: int = 32
    criterion: str = "oba"
    steps: int = 1
    finetune_epochs: int = 3
    lr: float = 0.1
    finetune_lr: float = 0.02
    batch_size: int = 128
    calib_batches: int = 8
    repeats: int = 30
    round_to: int | str | None = "auto"
    backend: str = "pytorch"
    seed: int = 0
    smoke: bool = False


def demo_target(s: DemoSettings) -> tuple[float | None, float | None]:
    """(target_flops, target_latency) of a demo run: the one given, else the latency goal (--smoke: 40% FLOPs,
    which needs no latency table)."""
    if s.target_flops is not None and s.target_latency is not None:
        raise UserError("give one of --target-flops and --target-latency, not both")
    if s.target_flops is not None:
        check_fraction(s.target_flops, "--target-flops")
        return s.target_flops, None
    if s.target_latency is not None:
        check_fraction(s.target_latency, "--target-latency")
        return None, s.target_latency
    return (0.4, None) if s.smoke else (None, DEMO_LATENCY)


def run_demo(out: Path, s: DemoSettings, *, data: str | None = None, limits: Limits | None = None) -> dict:
    """Train a zoo model on Fashion-MNIST (or reuse the trained checkpoint), compress and fine-tune it, time
    both models, and write ``summary.json`` / ``summary.md`` into ``out``. Returns the summary."""
    target_flops, target_latency = demo_target(s)  # bad goals fail before training starts
    t0 = time.perf_counter()
    if s.smoke:
        limits = Limits(train=(limits and limits.train) or 512, test=(limits and limits.test) or 256)
    ck = out / "train" / "checkpoint.pt"
    _demo_train(s, ck, data, limits)
    t_train = time.perf_counter() - t0
    cs = CompressSettings(target_flops=target_flops, target_latency=target_latency, latency_batch=s.latency_batch,
                          criterion=s.criterion, steps=s.steps, finetune_epochs=s.finetune_epochs, lr=s.finetune_lr,
                          batch_size=s.batch_size, calib_batches=s.calib_batches, kd=True, round_to=s.round_to,
                          backend=s.backend, seed=s.seed)
    log(f"[2/4] compressing to {cs.goal()} with '{s.criterion}', then {s.finetune_epochs} fine-tuning epoch(s)")
    c = run_compress(str(ck), out / "compressed", cs, data=data, limits=limits)
    t_compress = time.perf_counter() - t0 - t_train
    log("[3/4] measuring latency (PyTorch eager and onnxruntime, batch 1 and 32, interleaved medians)")
    bench = run_bench({"original": c["original"], "slimmed": c["model"]}, c["input_shape"], [1, 32],
                      s.repeats, out / "bench.json")
    rep = c["report"]
    sp = {(r["backend"], r["batch"]): r["speedup"] for r in bench["rows"] if r["model"] == "slimmed"}
    summary = {
        "model": s.model, "dataset": "fashion-mnist", "criterion": s.criterion,
        "target_flops": target_flops if target_latency is None else None, "target_latency": target_latency,
        "backend": s.backend, "latency_batch": s.latency_batch if target_latency is not None else None,
        "latency": rep["compress"].get("latency"),
        "train_epochs": s.epochs, "finetune_epochs": s.finetune_epochs,
        "accuracy_before": rep["before"]["accuracy"], "accuracy_after": rep["after"]["accuracy"],
        "flops_before": rep["before"]["flops"], "flops_after": rep["after"]["flops"],
        "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
        "speedup": {f"{b} batch {n}": v for (b, n), v in sorted(sp.items())},
        "seconds": {"train": t_train, "compress_finetune": t_compress, "total": time.perf_counter() - t0},
        "smoke": bool(s.smoke), "folder": str(out),
    }
    table = demo_table(summary)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", table + "\n")
    log("[4/4] done\n")
    log(table)
    log(f"\nartifacts in {out}/: train/checkpoint.pt, compressed/model.pt, compressed/model.onnx, "
        "compressed/report.json, compressed/widths.png, compressed/steps.png, bench.json, summary.json, summary.md")
    return summary


def _demo_train(s: DemoSettings, ck: Path, data: str | None, limits: Limits | None) -> None:
    """Stage 1: train, resume an interrupted run, or reuse a finished one."""
    from .train import read_checkpoint

    resume = ck.exists()
    if resume:
        done = read_checkpoint(ck)
        if done["epoch"] >= s.epochs and done["config"].get("epochs") == s.epochs:
            log(f"[1/4] {ck} already holds {s.epochs} trained epochs; reusing it")
            return
    log(f"[1/4] training {s.model} on Fashion-MNIST for {s.epochs} epochs")
    run_train(s.model, "fashion-mnist", s.epochs, ck.parent, data=data, resume=resume, lr=s.lr,
              batch_size=s.batch_size, seed=s.seed, limits=limits)


def demo_table(s: dict) -> str:
    rows = [("", "original", "slimmed"),
            ("test accuracy", f"{100 * s['accuracy_before']:.2f}%", f"{100 * s['accuracy_after']:.2f}%"),
            ("MFLOPs", f"{s['flops_before'] / 1e6:.2f}", f"{s['flops_after'] / 1e6:.2f} "
                                                         f"({s['flops_after'] / s['flops_before']:.1%})"),
            ("params (M)", f"{s['params_before'] / 1e6:.3f}", f"{s['params_after'] / 1e6:.3f} "
                                                             f"({s['params_after'] / s['params_before']:.1%})")]
    for k, v in s["speedup"].items():
        rows.append((f"speed-up, {k}", "1.00x", f"{v:.2f}x"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"| {r[0]:<{w0}} | {r[1]:>{w1}} | {r[2]:>{w2}} |" for r in rows]
    lines.insert(1, f"|{'-' * (w0 + 2)}|{'-' * (w1 + 1)}:|{'-' * (w2 + 1)}:|")
    goal = (f"{s['target_latency']:.0%} of its {s['backend']} latency at batch {s['latency_batch']}"
            if s.get("target_latency") is not None else f"{s['target_flops']:.0%} FLOPs")
    title = (f"{s['model']} on Fashion-MNIST, '{s['criterion']}' to {goal}, "
             f"{s['train_epochs']} training + {s['finetune_epochs']} fine-tuning epochs"
             + (" (SMOKE RUN: tiny data subset)" if s["smoke"] else ""))
    return title + "\n\n" + "\n".join(lines)
