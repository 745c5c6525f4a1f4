"""Command line: ``oba-fx {demo,train,compress,eval,export,bench,inspect,blocks}`` (also ``python -m oba_fx``).

User errors (missing data, unknown model, unreadable checkpoint, bad option
values) print one line ``oba-fx: error: ...`` and exit with status 2; ``--debug``
shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .io import atomic_write, write_json, write_text

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the command's input; printed as one line, no traceback."""


# --------------------------------------------------------------------------- helpers

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _log(msg: str) -> None:
    if _rank() == 0:
        print(msg, flush=True)


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPU, else gloo); returns True, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def _fraction(value: float, what: str) -> float:
    if not (0 < value <= 1):
        raise UserError(f"{what} must be a fraction of the original in (0, 1], e.g. 0.4; got {value}")
    return value


def _dataset(name: str, data: str | None, args=None):
    from .data import get_dataset

    return get_dataset(name, data, limit_train=getattr(args, "limit_train", None),
                       limit_test=getattr(args, "limit_test", None))


def _zoo_kwargs(name: str, shape: tuple[int, ...], num_classes: int | None = None) -> dict:
    import models_zoo

    kw: dict = {}
    if name in models_zoo.ZOO:
        kw["in_channels"] = shape[0]
        if name.startswith("vit"):
            kw["img_size"] = shape[-1]
    if num_classes is not None:
        kw["num_classes"] = num_classes
    return kw


def _unknown_model(text: str) -> UserError:
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
        raise _unknown_model(text)
    shape = tuple(input_shape) if input_shape else ((1, 28, 28) if text in models_zoo.ZOO else (3, 224, 224))
    model = models_zoo.create(text, **_zoo_kwargs(text, shape))
    return model.eval(), {"kind": "name", "name": text, "input_shape": list(shape)}


def _input_shape(text: str | None) -> tuple[int, ...] | None:
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


def _shape_of(info: dict, spec=None) -> tuple[int, ...]:
    if spec is not None:
        shape = tuple(spec.input_shape)
        if info.get("input_shape") and tuple(info["input_shape"]) != shape:
            raise UserError(f"the model takes inputs of shape {tuple(info['input_shape'])} but dataset "
                            f"{spec.name} has {shape}; use the dataset it was trained on")
        return shape
    if not info.get("input_shape"):
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W")
    return tuple(info["input_shape"])


def _trace_quiet(model, x):
    import oba_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", oba_fx.UnknownOpWarning)  # listed by the caller
        return oba_fx.trace(model, x)


# --------------------------------------------------------------------------- inspect / blocks

def cmd_inspect(args) -> int:
    import networkx as nx

    import oba_fx

    model, info = load_model(args.model, _input_shape(args.input_shape))
    shape = _shape_of(info)
    x = torch.randn(1, *shape)
    g = _trace_quiet(model, x)
    flops, params = oba_fx.count(model, x)
    _log(f"{info.get('name', args.model)}: input {(1, *shape)}, {flops / 1e6:.2f} MFLOPs, {params / 1e6:.3f} M params")
    _log(f"{g.ir.number_of_nodes()} graph nodes, {len(g.groups)} groups, {len(g.prunable_groups)} prunable\n")
    _log(g.summary(max_rows=args.rows))
    for w in g.warnings:
        _log(f"warning: {w}")
    out = Path(args.out) if args.out else None
    json_path = args.json or (out / "groups.json" if out else None)
    graphml = args.graphml or (out / "ir.graphml" if out else None)
    if json_path:
        d = g.to_dict()
        d.update(model=info.get("name", args.model), input_shape=list(shape), flops=flops, params=params)
        write_json(json_path, d)
        _log(f"wrote {json_path}")
    if graphml:
        ir = nx.DiGraph()
        for n, a in g.ir.nodes(data=True):
            ir.add_node(n, **{k: str(v) for k, v in a.items() if v is not None})
        ir.add_edges_from(g.ir.edges())
        atomic_write(graphml, lambda p: nx.write_graphml(ir, p))
        _log(f"wrote {graphml}")
    if args.hessian_blocks:
        _log("")
        _blocks(g, args, out)
    return 0


def _blocks(g, args, out: Path | None) -> None:
    import oba_fx

    blocks = oba_fx.hessian_blocks(g)
    _log(blocks.to_text(max_rows=args.block_rows))
    png = args.png or (out / "hessian_blocks.png" if out else None)
    if png is None and args.hessian_blocks:
        png = Path("hessian_blocks.png")
    targets = ((png, blocks.plot), (getattr(args, "blocks_graphml", None) or (out / "hessian_blocks.graphml" if out
                                                                               else None), blocks.write_graphml),
               (args.dot or (out / "hessian_blocks.dot" if out else None), blocks.write_dot))
    for path, fn in targets:
        if path:
            fn(path)
            _log(f"wrote {path}")
    bj = getattr(args, "blocks_json", None) or (out / "hessian_blocks.json" if out else None)
    if bj:
        write_json(bj, blocks.to_dict())
        _log(f"wrote {bj}")


def cmd_blocks(args) -> int:
    model, info = load_model(args.model, _input_shape(args.input_shape))
    g = _trace_quiet(model, torch.randn(1, *_shape_of(info)))
    args.hessian_blocks = False
    args.blocks_json, args.blocks_graphml, args.block_rows = args.json, args.graphml, args.rows
    _blocks(g, args, None)
    return 0


# --------------------------------------------------------------------------- train

def run_train(model_name: str, dataset: str, epochs: int, out: Path, *, data=None, resume=False, lr=0.1,
              batch_size=128, schedule="onecycle", seed=0, args=None) -> dict:
    import models_zoo

    from .train import train

    if epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if model_name not in models_zoo.names():
        raise _unknown_model(model_name)
    spec = _dataset(dataset, data, args)
    kw = _zoo_kwargs(model_name, spec.input_shape, spec.num_classes)
    torch.manual_seed(seed)
    model = models_zoo.create(model_name, **kw)
    out.mkdir(parents=True, exist_ok=True)
    ck = out / "checkpoint.pt"
    if ck.exists() and not resume:
        raise UserError(f"{ck} exists; pass --resume to continue that run or choose another --out")
    if resume and not ck.exists():
        raise UserError(f"--resume: {ck} does not exist (nothing to resume)")
    meta = {"dataset": spec.name, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes}
    _log(f"training {model_name} on {spec.name} ({spec.train_size} train / {spec.test_size} test samples from "
         f"{spec.root}) for {epochs} epochs, batch {batch_size}, {schedule} lr {lr}")
    res = train(model, spec.train(batch_size, seed=seed), epochs, lr=lr, schedule=schedule, checkpoint=ck,
                resume=resume, model_spec={"name": model_name, "kwargs": kw}, eval_data=spec.test(512),
                meta=meta, seed=seed, log=_log)
    write_json(out / "train_history.json", {"model": model_name, "dataset": spec.describe(), "history": res["history"]})
    _log(f"wrote {ck}")
    return {"checkpoint": str(ck), "history": res["history"], "model": model}


def cmd_train(args) -> int:
    run_train(args.model, args.dataset, args.epochs, Path(args.out), data=args.data, resume=args.resume, lr=args.lr,
              batch_size=args.batch_size, schedule=args.schedule, seed=args.seed, args=args)
    return 0


# --------------------------------------------------------------------------- compress

def run_compress(checkpoint: str, out: Path, *, dataset=None, data=None, target_flops=0.5, criterion=None,
                 steps=1, scope="global", finetune_epochs=0, lr=0.01, batch_size=128, calib_batches=8,
                 calib_batch_size=64, kd=False, round_to="auto", backend="onnxruntime", target_latency=None,
                 latency_batch=1, seed=0, micro_batch=None, activation_checkpoint=False,
                 compensate=True, reestimate_bn=True, args=None) -> dict:
    import oba_fx

    from .plots import plot_steps, plot_widths
    from .train import evaluate

    if target_flops is not None or target_latency is None:
        _fraction(target_flops, "--target-flops")
    if target_latency is not None:
        _fraction(target_latency, "--target-latency")
    if latency_batch < 1:
        raise UserError(f"--latency-batch must be >= 1, got {latency_batch}")
    criterion = criterion or oba_fx.DEFAULT_CRITERION
    if criterion not in oba_fx.COMPRESS_CRITERIA:
        raise UserError(f"unknown criterion '{criterion}'; choose from {', '.join(oba_fx.COMPRESS_CRITERIA)}")
    if steps < 1:
        raise UserError(f"--steps must be >= 1, got {steps}")
    if micro_batch is not None and micro_batch < 1:
        raise UserError(f"--micro-batch must be >= 1, got {micro_batch}")
    if activation_checkpoint is not True and activation_checkpoint is not False and activation_checkpoint < 1:
        raise UserError(f"--activation-checkpoint takes a number of segments >= 1, got {activation_checkpoint}")
    if finetune_epochs < 0:
        raise UserError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    model, info = load_model(checkpoint)
    dataset = dataset or info.get("dataset")
    if not dataset:
        raise UserError(f"{checkpoint} does not record its dataset; pass --dataset")
    spec = _dataset(dataset, data, args)
    shape = _shape_of(info, spec)
    pg = _init_distributed()  # torchrun: every rank scores its shard; rank 0 writes
    out.mkdir(parents=True, exist_ok=True)
    test = spec.test(512)
    example = torch.randn(2, *shape, generator=torch.Generator().manual_seed(seed))
    flops0, params0 = oba_fx.count(model, example[:1])
    _log(f"evaluating the original model on {spec.test_size} test samples")
    before = evaluate(model, test, progress=True)
    _log(f"original: accuracy {before['accuracy']:.4f}, loss {before['loss']:.4f}, {flops0 / 1e6:.2f} MFLOPs")
    calib = spec.calibration(calib_batches * steps, calib_batch_size, seed)
    train_data = spec.train(batch_size, seed=seed + 1)
    records = [{"step": 0, "accuracy": before["accuracy"], "loss": before["loss"], "flops": flops0,
                "params": params0, "flops_fraction": 1.0}]
    teacher = model if kd else None

    def after_step(m, step):
        if finetune_epochs:
            oba_fx.finetune(m, train_data, epochs=finetune_epochs, lr=lr, teacher=teacher, process_group=pg,
                            progress=_rank() == 0)
        ev = evaluate(m, test, progress=True)
        f, p = oba_fx.count(m, example[:1])
        records.append({"step": step, "accuracy": ev["accuracy"], "loss": ev["loss"], "flops": f, "params": p,
                        "flops_fraction": f / flops0})
        _log(f"step {step}/{steps}: {f / flops0:.1%} FLOPs, accuracy {ev['accuracy']:.4f}"
             + (f" after {finetune_epochs} fine-tuning epoch(s)" if finetune_epochs else " (no fine-tuning)"))

    goal = (f"{target_latency:.0%} of its {backend} latency at batch {latency_batch}" if target_latency is not None
            else f"{target_flops:.0%} FLOPs")
    _log(f"compressing to {goal} with '{criterion}' in {steps} step(s), scope {scope}")
    res = oba_fx.compress(model, example, calib, target_flops=target_flops, criterion=criterion, steps=steps,
                          target_latency=target_latency, latency_batch=latency_batch,
                          scope=scope, round_to=round_to, backend=backend, finetune=after_step,
                          batches_per_step=calib_batches,
                          seed=seed, process_group=pg, progress=_rank() == 0, micro_batch=micro_batch,
                          checkpoint=activation_checkpoint, compensate=compensate, reestimate_bn=reestimate_bn)
    slim = res.model
    flops1, params1 = oba_fx.count(slim, example[:1])
    after = {"accuracy": records[-1]["accuracy"], "loss": records[-1]["loss"], "flops": flops1, "params": params1}
    meta = {"dataset": spec.name, "input_shape": list(shape), "num_classes": spec.num_classes,
            "name": f"{info.get('name', 'model')}-slim", "source": str(checkpoint), "criterion": criterion,
            "target_flops": target_flops}
    if _rank() != 0:  # every rank holds the identical slimmed model; rank 0 writes the files
        return {"report": None, "model": slim, "original": model, "input_shape": shape}
    oba_fx.save(slim, out / "model.pt", meta=meta)
    onnx_path = oba_fx.export_onnx(slim, example, out / "model.onnx")
    report = {
        "source": str(checkpoint), "dataset": spec.describe(),
        "settings": {"target_flops": target_flops, "criterion": criterion, "steps": steps, "scope": scope,
                     "finetune_epochs_per_step": finetune_epochs, "lr": lr, "kd": kd, "round_to": round_to,
                     "backend": backend, "round_multiple": res.report["widths_rounding"]["multiple"],
                     "target_latency": target_latency, "latency_batch": latency_batch,
                     "calibration": {"batches_per_step": calib_batches, "batch_size": calib_batch_size},
                     "seed": seed},
        "before": {**before, "flops": flops0, "params": params0},
        "after": after,
        "flops_counted_for": "one sample (batch 1)",
        "steps": records,
        "compress": res.report,
        "files": {"model": str(out / "model.pt"), "onnx": str(onnx_path)},
    }
    name = info.get("name", "model")
    plot_widths(res.report["widths"]["before"], res.report["widths"]["after"], out / "widths.png",
                title=f"{name}: per-layer width, {criterion} to {goal}")
    plot_steps(records, out / "steps.png", title=f"{name}: accuracy and FLOPs across steps ({criterion})")
    report["files"].update(widths_plot=str(out / "widths.png"), steps_plot=str(out / "steps.png"))
    write_json(out / "report.json", report)
    _log(f"slimmed: {res.report['flops']['ratio']:.1%} FLOPs, {res.report['params']['ratio']:.1%} params, "
         f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}")
    lat = res.report.get("latency")
    if lat and "measured_fraction" in lat:
        _log(f"latency ({lat['backend']}, batch {lat['batch']}): {lat['measured_fraction']:.1%} of the original "
             f"measured ({lat['measured_ms']:.2f} ms vs {lat['original_ms']:.2f} ms), {lat['predicted_fraction']:.1%} "
             f"predicted; target {lat['target_fraction']:.0%}")
    _log(f"wrote {out / 'model.pt'}, {onnx_path}, {out / 'report.json'}, widths.png, steps.png")
    return {"report": report, "model": slim, "original": model, "input_shape": shape}


def cmd_compress(args) -> int:
    run_compress(args.checkpoint, Path(args.out), dataset=args.dataset, data=args.data,
                 target_flops=args.target_flops, criterion=args.criterion, steps=args.steps, scope=args.scope,
                 finetune_epochs=args.finetune_epochs, lr=args.lr, batch_size=args.batch_size,
                 calib_batches=args.calib_batches, calib_batch_size=args.calib_batch_size, kd=args.kd,
                 round_to=args.round_to, backend=args.backend, target_latency=args.target_latency,
                 latency_batch=args.latency_batch, seed=args.seed, micro_batch=args.micro_batch,
                 activation_checkpoint=args.activation_checkpoint or False, compensate=args.compensate,
                 reestimate_bn=args.reestimate_bn, args=args)
    return 0


# --------------------------------------------------------------------------- eval / export / bench

def cmd_eval(args) -> int:
    import oba_fx

    from .train import evaluate

    model, info = load_model(args.checkpoint)
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        raise UserError(f"{args.checkpoint} does not record its dataset; pass --dataset")
    spec = _dataset(dataset, args.data, args)
    shape = _shape_of(info, spec)
    ev = evaluate(model, spec.test(512), progress=True)
    flops, params = oba_fx.count(model, torch.randn(1, *shape))
    res = {"model": args.checkpoint, "dataset": spec.name, **ev, "flops": flops, "params": params}
    _log(f"{args.checkpoint} on {spec.name} test ({ev['samples']} samples): accuracy {ev['accuracy']:.4f}, "
         f"loss {ev['loss']:.4f}, {flops / 1e6:.2f} MFLOPs, {params / 1e6:.3f} M params")
    if args.json:
        write_json(args.json, res)
        _log(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    import oba_fx

    model, info = load_model(args.checkpoint, _input_shape(args.input_shape))
    shape = _shape_of(info)
    path = oba_fx.export_onnx(model, torch.randn(2, *shape), args.out)
    _log(f"wrote {path} (checked with onnx.checker; onnxruntime matches PyTorch; dynamic batch)")
    return 0


def run_bench(models: dict, shape, batch_sizes, repeats: int, json_path: Path | None, onnx: bool = True,
              channels_last: bool = False, compiled: bool = False) -> dict:
    from .latency import measure_latency, pytorch_guidance

    res = measure_latency(models, shape, batch_sizes=batch_sizes, repeats=repeats, onnx=onnx,
                          channels_last=channels_last, compiled=compiled)
    _log(f"{'model':<10} {'backend':<21} {'batch':>5} {'median ms':>10} {'p10':>8} {'p90':>8} {'speed-up':>9}")
    for r in res["rows"]:
        sp = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        _log(f"{r['model']:<10} {r['backend']:<21} {r['batch']:>5} {r['median_ms']:>10.3f} {r['p10_ms']:>8.3f} "
             f"{r['p90_ms']:>8.3f} {sp:>9}")
    if channels_last or compiled:
        res["pytorch_guidance"] = pytorch_guidance(res["rows"])
        for g in res["pytorch_guidance"]:
            advice = ("eager in the default memory format is fastest (no other mode gains 5%)"
                      if g["best"] == "pytorch" else
                      f"run it as {g['best']}: {g['gain']:.2f}x eager ({g['best_ms']:.3f} ms vs {g['eager_ms']:.3f})")
            _log(f"PyTorch guidance, {g['model']} at batch {g['batch']}: {advice}")
    if json_path:
        write_json(json_path, res)
        _log(f"wrote {json_path}")
    return res


def cmd_bench(args) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    model, info = load_model(args.checkpoint, _input_shape(args.input_shape))
    models = {"model": model}
    if args.baseline:
        base, binfo = load_model(args.baseline, _input_shape(args.input_shape))
        if binfo.get("input_shape") and info.get("input_shape") and binfo["input_shape"] != info["input_shape"]:
            raise UserError(f"--baseline takes inputs {binfo['input_shape']} but the model takes {info['input_shape']}")
        models = {"original": base, "slimmed": model}
    run_bench(models, _shape_of(info), args.batch_sizes, args.repeats, Path(args.json) if args.json else None,
              onnx=not args.no_onnx, channels_last=args.channels_last, compiled=args.compile)
    return 0


# --------------------------------------------------------------------------- demo

def cmd_demo(args) -> int:
    out = Path(args.out)
    target_flops, target_latency = _demo_target(args)  # bad goals fail before training starts
    t0 = time.perf_counter()
    if args.smoke:
        args.limit_train = args.limit_train or 512
        args.limit_test = args.limit_test or 256
    train_dir = out / "train"
    ck = train_dir / "checkpoint.pt"
    resume = ck.exists()
    if resume:
        from .train import _read

        done = _read(ck)
        if done["epoch"] >= args.epochs and done["config"].get("epochs") == args.epochs:
            _log(f"[1/4] {ck} already holds {args.epochs} trained epochs; reusing it")
            resume = None
    if resume is not None:
        _log(f"[1/4] training {args.model} on Fashion-MNIST for {args.epochs} epochs")
        run_train(args.model, "fashion-mnist", args.epochs, train_dir, data=args.data, resume=resume, lr=args.lr,
                  batch_size=args.batch_size, seed=args.seed, args=args)
    t_train = time.perf_counter() - t0
    goal = (f"{target_latency:.0%} of its {args.backend} latency at batch {args.latency_batch}"
            if target_latency is not None else f"{target_flops:.0%} FLOPs")
    _log(f"[2/4] compressing to {goal} with '{args.criterion}', then {args.finetune_epochs} fine-tuning epoch(s)")
    c = run_compress(str(ck), out / "compressed", data=args.data, target_flops=target_flops,
                     target_latency=target_latency, latency_batch=args.latency_batch,
                     criterion=args.criterion, steps=args.steps, finetune_epochs=args.finetune_epochs,
                     lr=args.finetune_lr, batch_size=args.batch_size, calib_batches=args.calib_batches, kd=True,
                     round_to=args.round_to, backend=args.backend, seed=args.seed, args=args)
    t_compress = time.perf_counter() - t0 - t_train
    _log("[3/4] measuring latency (PyTorch eager and onnxruntime, batch 1 and 32, interleaved medians)")
    bench = run_bench({"original": c["original"], "slimmed": c["model"]}, c["input_shape"], [1, 32],
                      args.repeats, out / "bench.json")
    rep = c["report"]
    sp = {(r["backend"], r["batch"]): r["speedup"] for r in bench["rows"] if r["model"] == "slimmed"}
    summary = {
        "model": args.model, "dataset": "fashion-mnist", "criterion": args.criterion,
        "target_flops": target_flops if target_latency is None else None, "target_latency": target_latency,
        "backend": args.backend, "latency_batch": args.latency_batch if target_latency is not None else None,
        "latency": rep["compress"].get("latency"),
        "train_epochs": args.epochs, "finetune_epochs": args.finetune_epochs,
        "accuracy_before": rep["before"]["accuracy"], "accuracy_after": rep["after"]["accuracy"],
        "flops_before": rep["before"]["flops"], "flops_after": rep["after"]["flops"],
        "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
        "speedup": {f"{b} batch {n}": v for (b, n), v in sorted(sp.items())},
        "seconds": {"train": t_train, "compress_finetune": t_compress, "total": time.perf_counter() - t0},
        "smoke": bool(args.smoke), "folder": str(out),
    }
    table = _demo_table(summary)
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", table + "\n")
    _log("[4/4] done\n")
    _log(table)
    _log(f"\nartifacts in {out}/: train/checkpoint.pt, compressed/model.pt, compressed/model.onnx, "
         "compressed/report.json, compressed/widths.png, compressed/steps.png, bench.json, summary.json, summary.md")
    return 0


#: the demo's default goal: this fraction of the original's PyTorch eager latency at batch 32
DEMO_LATENCY = 0.55


def _demo_target(args) -> tuple[float | None, float | None]:
    """(target_flops, target_latency) of a demo run: the one given, else the latency goal (--smoke: 40% FLOPs,
    which needs no latency table)."""
    if args.target_flops is not None and args.target_latency is not None:
        raise UserError("give one of --target-flops and --target-latency, not both")
    if args.target_flops is not None:
        _fraction(args.target_flops, "--target-flops")
        return args.target_flops, None
    if args.target_latency is not None:
        _fraction(args.target_latency, "--target-latency")
        return None, args.target_latency
    return (0.4, None) if args.smoke else (None, DEMO_LATENCY)


def _demo_table(s: dict) -> str:
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


# --------------------------------------------------------------------------- argument parsing

def _add_data(p, dataset_default="fashion-mnist"):
    p.add_argument("--dataset", default=dataset_default,
                   help="fashion-mnist, cifar10, cifar100 or imagenet (ImageFolder)"
                   + ("" if dataset_default else "; default: the one recorded in the checkpoint"))
    p.add_argument("--data", help="folder holding the data set (else $OBA_FX_DATA, then the Debian default for "
                                  "Fashion-MNIST)")
    p.add_argument("--limit-train", type=int, help="use a seeded subset of this many training samples")
    p.add_argument("--limit-test", type=int, help="use a seeded subset of this many test samples")


def _round_to_arg(text: str):
    if text == "auto":
        return "auto"
    if text.lower() == "none":
        return None
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"--round-to takes 'auto', a positive integer or 'none', got {text!r}")
    return v


def _add_widths(p, backend: str = "onnxruntime") -> None:
    from .widths import BACKENDS, ROUND_TO

    p.add_argument("--round-to", type=_round_to_arg, default="auto", metavar="auto|N|none",
                   help="keep channel counts at multiples of N; 'auto' (default) takes the multiple measured "
                        f"fastest for --backend ({', '.join(f'{b}: {m}' for b, m in ROUND_TO.items())}, from "
                        "benchmarks/widths.py); 'none' allows any width")
    p.add_argument("--backend", choices=BACKENDS, default=backend,
                   help=f"runtime the slim model is for; picks the --round-to auto multiple and is where "
                        f"--target-latency is measured (default {backend})")


def build_parser() -> argparse.ArgumentParser:
    import oba_fx

    p = argparse.ArgumentParser(prog="oba-fx", description="Optimal Brain Apoptosis as a torch.fx compiler pass")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train resnet20 on Fashion-MNIST, compress it with OBA, fine-tune, benchmark")
    d.add_argument("--out", default="runs/demo", help="folder for every artifact (default runs/demo)")
    d.add_argument("--model", default="resnet20")
    d.add_argument("--epochs", type=int, default=6, help="training epochs (default 6)")
    d.add_argument("--target-latency", type=float, metavar="F",
                   help=f"fraction of the original's latency to keep, measured in --backend at --latency-batch "
                        f"(default {DEMO_LATENCY}: the demo's goal; --smoke prunes to 40%% FLOPs instead)")
    d.add_argument("--latency-batch", type=int, default=32, help="batch size the latency goal is measured at "
                                                                "(default 32)")
    d.add_argument("--target-flops", type=float, metavar="F",
                   help="prune to this fraction of FLOPs instead of a latency goal")
    d.add_argument("--criterion", default="oba", choices=list(oba_fx.COMPRESS_CRITERIA),
                   help="default oba: the demo shows the paper's criterion (`compress` defaults to "
                        f"{oba_fx.DEFAULT_CRITERION}, the accuracy benchmark's choice)")
    d.add_argument("--steps", type=int, default=1)
    d.add_argument("--finetune-epochs", type=int, default=3, help="fine-tuning epochs after pruning (default 3)")
    d.add_argument("--lr", type=float, default=0.1, help="peak training learning rate (one-cycle)")
    d.add_argument("--finetune-lr", type=float, default=0.02)
    d.add_argument("--batch-size", type=int, default=128)
    d.add_argument("--calib-batches", type=int, default=8)
    d.add_argument("--repeats", type=int, default=30, help="timed runs per latency measurement")
    _add_widths(d, backend="pytorch")  # the latency goal binds in PyTorch eager (onnxruntime gains more, measured)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--data", help="Fashion-MNIST folder (default $OBA_FX_DATA, then " "/usr/share/datasets/fashion-mnist)")
    d.add_argument("--limit-train", type=int, help=argparse.SUPPRESS)
    d.add_argument("--limit-test", type=int, help=argparse.SUPPRESS)
    d.add_argument("--smoke", action="store_true", help="a seconds-long run on a small data subset (for tests)")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train a zoo model from scratch with resumable checkpoints")
    t.add_argument("--model", required=True, help="a models_zoo name (resnet20, vgg19_bn, vit_small, ...)")
    _add_data(t)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt (every epoch) and train_history.json")
    t.add_argument("--resume", action="store_true", help="continue the run in --out to the same final weights")
    t.add_argument("--lr", type=float, default=0.1)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("compress", help="prune a checkpoint to a FLOPs target, fine-tune, export")
    c.add_argument("checkpoint", help="a training checkpoint or an oba_fx.save file")
    _add_data(c, dataset_default=None)
    c.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs to keep, in (0, 1]")
    c.add_argument("--target-latency", type=float, metavar="F",
                   help="instead of FLOPs: fraction of the original's latency to keep, measured on this machine "
                        "in --backend at --latency-batch (a per-layer table, cached, then re-measured)")
    c.add_argument("--latency-batch", type=int, default=1, help="batch size --target-latency is measured at")
    c.add_argument("--criterion", default=oba_fx.DEFAULT_CRITERION,
                   help=f"one of {', '.join(oba_fx.COMPRESS_CRITERIA)} (default {oba_fx.DEFAULT_CRITERION}, chosen from the "
                        "accuracy benchmark)")
    c.add_argument("--steps", type=int, default=1, help="iterative steps, re-scoring after each (default 1)")
    c.add_argument("--scope", choices=("global", "local"), default="global")
    c.add_argument("--finetune-epochs", type=int, default=0, help="fine-tuning epochs after each step")
    c.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate")
    c.add_argument("--kd", action="store_true", help="distil from the original model while fine-tuning")
    c.add_argument("--batch-size", type=int, default=128, help="fine-tuning batch size")
    c.add_argument("--calib-batches", type=int, default=8, help="calibration batches per step")
    c.add_argument("--calib-batch-size", type=int, default=64)
    _add_widths(c)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--micro-batch", type=int, metavar="K",
                   help="score calibration batches in chunks of K samples (less memory, same scores)")
    c.add_argument("--activation-checkpoint", type=int, nargs="?", const=True, metavar="SEGMENTS",
                   help="recompute activations while scoring (less memory, one more forward, same scores); "
                        "optionally the number of graph segments (default about sqrt of the graph's nodes)")
    c.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=True,
                   help="after each rewrite, refit the kept input weights of every consumer layer by least "
                        "squares against the original layer's output on the calibration batches (default on; "
                        "--no-compensate keeps the sliced weights)")
    c.add_argument("--reestimate-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="after each rewrite, re-estimate every BatchNorm's running statistics on the "
                        "calibration batches instead of keeping the sliced ones (default on)")
    c.add_argument("--out", required=True, help="folder for model.pt, model.onnx, report.json and plots")
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="test accuracy and loss of a checkpoint")
    e.add_argument("checkpoint")
    _add_data(e, dataset_default=None)
    e.add_argument("--json", help="write the result as JSON here")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="export a checkpoint to ONNX (verified in onnxruntime)")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--input-shape", help="one sample's shape C,H,W (default: recorded in the checkpoint)")
    x.set_defaults(fn=cmd_export)

    b = sub.add_parser("bench", help="latency in PyTorch and onnxruntime (medians of interleaved runs)")
    b.add_argument("checkpoint", help="the (slimmed) model: a checkpoint, an oba_fx.save file or a model name")
    b.add_argument("--baseline", help="the original model to compare against (speed-up column)")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    b.add_argument("--repeats", type=int, default=30)
    b.add_argument("--input-shape", help="one sample's shape C,H,W (default: recorded in the checkpoint)")
    b.add_argument("--no-onnx", action="store_true", help="PyTorch only")
    b.add_argument("--channels-last", action="store_true",
                   help="also time PyTorch eager in the channels-last memory format (4-D inputs)")
    b.add_argument("--compile", action="store_true",
                   help="also time torch.compile(model) (compilation is not timed); with --channels-last or "
                        "--compile, bench says which PyTorch way runs each model fastest")
    b.add_argument("--json", help="write the timings as JSON here")
    b.set_defaults(fn=cmd_bench)

    q = sub.add_parser("inspect", help="trace a model: layers, coupled groups, frozen dims (and Hessian blocks)")
    q.add_argument("model", help="a model name (zoo or torchvision) or a checkpoint")
    q.add_argument("--input-shape", help="one sample's shape C,H,W; default 1,28,28 for zoo models, 3,224,224 "
                   "for torchvision models, or what the checkpoint records")
    q.add_argument("--rows", type=int, default=60, help="max groups to print (default 60)")
    q.add_argument("--hessian-blocks", action="store_true", help="add the Hessian-block map (text + PNG heatmap)")
    q.add_argument("--block-rows", type=int, default=40, help="max block pairs to print")
    q.add_argument("--png", help="heatmap path (default hessian_blocks.png, or in --out)")
    q.add_argument("--dot", help="write the Hessian-block graph as DOT here")
    q.add_argument("--json", help="write the groups as JSON here")
    q.add_argument("--graphml", help="write the networkx IR as GraphML here")
    q.add_argument("--out", help="folder for groups.json, ir.graphml and (with --hessian-blocks) "
                                 "hessian_blocks.{png,graphml,dot,json}")
    q.set_defaults(fn=cmd_inspect)

    bl = sub.add_parser("blocks", help="which network-curvature Hessian blocks F_lm are structurally zero, and why")
    bl.add_argument("model", help="a model name or a checkpoint")
    bl.add_argument("--input-shape", help="one sample's shape C,H,W (defaults as for inspect)")
    bl.add_argument("--rows", type=int, default=40, help="max block pairs to print")
    bl.add_argument("--png", help="write the block heatmap here")
    bl.add_argument("--graphml", help="write the block graph as GraphML here")
    bl.add_argument("--dot", help="write the block graph as DOT here")
    bl.add_argument("--json", help="write the classification as JSON here")
    bl.set_defaults(fn=cmd_blocks)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .passes.curvature import CalibrationError
    from .passes.trace import TraceFailure

    from .data import DatasetNotFound
    from .train import CheckpointError

    user_errors = (UserError, DatasetNotFound, CheckpointError, CalibrationError, TraceFailure, ValueError,
                   FileNotFoundError, MemoryError)
    try:
        return args.fn(args)
    except user_errors as e:
        if args.debug:
            raise
        msg = str(e).strip() or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and not isinstance(e, DatasetNotFound):
            msg = f"{e.strerror}: {e.filename}"
        print(f"oba-fx: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("oba-fx: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
