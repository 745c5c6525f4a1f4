"""Command line: ``oba-fx {demo,train,compress,eval,export,bench,inspect,blocks}`` (also ``python -m oba_fx``).

A thin layer: each ``cmd_*`` turns parsed flags into a call of a workflow function in ``oba_fx.workflows``
(or of the public API) with explicit arguments. A problem with the input (missing data, unknown model,
unreadable checkpoint, bad option values: ``oba_fx.UsageError`` and the typed errors that name a fix) prints
one line ``oba-fx: error: ...`` and exits with status 2; ``--debug`` shows the traceback instead. Any other
exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .compress_plan import compress_criteria
from .io import atomic_write, write_json
from .workflows import (DEMO_LATENCY, CompressSettings, DemoSettings, Limits, UserError, input_shape_of, load_model,
                        log, open_dataset, parse_input_shape, run_bench, run_compress, run_demo, run_train, trace_quiet)

EXIT_USER_ERROR = 2

__all__ = ["main", "build_parser", "UserError", "EXIT_USER_ERROR"]


def _limits(args) -> Limits:
    return Limits(train=getattr(args, "limit_train", None), test=getattr(args, "limit_test", None))


# --------------------------------------------------------------------------- inspect / blocks

def cmd_inspect(args) -> int:
    import networkx as nx

    import oba_fx

    model, info = load_model(args.model, parse_input_shape(args.input_shape))
    shape = input_shape_of(info)
    x = torch.randn(1, *shape)
    g = trace_quiet(model, x)
    flops, params = oba_fx.count(model, x)
    log(f"{info.get('name', args.model)}: input {(1, *shape)}, {flops / 1e6:.2f} MFLOPs, {params / 1e6:.3f} M params")
    log(f"{g.ir.number_of_nodes()} graph nodes, {len(g.groups)} groups, {len(g.prunable_groups)} prunable\n")
    log(g.summary(max_rows=args.rows))
    for w in g.warnings:
        log(f"warning: {w}")
    out = Path(args.out) if args.out else None
    json_path = args.json or (out / "groups.json" if out else None)
    graphml = args.graphml or (out / "ir.graphml" if out else None)
    if json_path:
        d = g.to_dict()
        d.update(model=info.get("name", args.model), input_shape=list(shape), flops=flops, params=params)
        write_json(json_path, d)
        log(f"wrote {json_path}")
    if graphml:
        ir = nx.DiGraph()
        for n, a in g.ir.nodes(data=True):
            ir.add_node(n, **{k: str(v) for k, v in a.items() if v is not None})
        ir.add_edges_from(g.ir.edges())
        atomic_write(graphml, lambda p: nx.write_graphml(ir, p))
        log(f"wrote {graphml}")
    if args.hessian_blocks:
        log("")
        _blocks(g, args, out)
    return 0


def _blocks(g, args, out: Path | None) -> None:
    import oba_fx

    blocks = oba_fx.hessian_blocks(g)
    log(blocks.to_text(max_rows=args.block_rows))
    png = args.png or (out / "hessian_blocks.png" if out else None)
    if png is None and args.hessian_blocks:
        png = Path("hessian_blocks.png")
    targets = ((png, blocks.plot), (getattr(args, "blocks_graphml", None) or (out / "hessian_blocks.graphml" if out
                                                                               else None), blocks.write_graphml),
               (args.dot or (out / "hessian_blocks.dot" if out else None), blocks.write_dot))
    for path, fn in targets:
        if path:
            fn(path)
            log(f"wrote {path}")
    bj = getattr(args, "blocks_json", None) or (out / "hessian_blocks.json" if out else None)
    if bj:
        write_json(bj, blocks.to_dict())
        log(f"wrote {bj}")


def cmd_blocks(args) -> int:
    model, info = load_model(args.model, parse_input_shape(args.input_shape))
    g = trace_quiet(model, torch.randn(1, *input_shape_of(info)))
    args.hessian_blocks = False
    args.blocks_json, args.blocks_graphml, args.block_rows = args.json, args.graphml, args.rows
    _blocks(g, args, None)
    return 0


# --------------------------------------------------------------------------- train / compress / demo

def cmd_train(args) -> int:
    run_train(args.model, args.dataset, args.epochs, Path(args.out), data=args.data, resume=args.resume, lr=args.lr,
              batch_size=args.batch_size, schedule=args.schedule, seed=args.seed, limits=_limits(args))
    return 0


def cmd_compress(args) -> int:
    settings = CompressSettings(
        target_flops=args.target_flops, target_latency=args.target_latency, latency_batch=args.latency_batch,
        criterion=args.criterion, steps=args.steps, scope=args.scope, finetune_epochs=args.finetune_epochs,
        lr=args.lr, batch_size=args.batch_size, calib_batches=args.calib_batches,
        calib_batch_size=args.calib_batch_size, kd=args.kd, round_to=args.round_to, backend=args.backend,
        seed=args.seed, micro_batch=args.micro_batch, activation_checkpoint=args.activation_checkpoint or False,
        compensate=args.compensate, reestimate_bn=args.reestimate_bn)
    run_compress(args.checkpoint, Path(args.out), settings, dataset=args.dataset, data=args.data,
                 limits=_limits(args))
    return 0


def cmd_demo(args) -> int:
    settings = DemoSettings(
        model=args.model, epochs=args.epochs, target_flops=args.target_flops, target_latency=args.target_latency,
        latency_batch=args.latency_batch, criterion=args.criterion, steps=args.steps,
        finetune_epochs=args.finetune_epochs, lr=args.lr, finetune_lr=args.finetune_lr, batch_size=args.batch_size,
        calib_batches=args.calib_batches, repeats=args.repeats, round_to=args.round_to, backend=args.backend,
        seed=args.seed, smoke=args.smoke)
    run_demo(Path(args.out), settings, data=args.data, limits=_limits(args))
    return 0


# --------------------------------------------------------------------------- eval / export / bench

def cmd_eval(args) -> int:
    import oba_fx

    from .train import evaluate

    model, info = load_model(args.checkpoint)
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        raise UserError(f"{args.checkpoint} does not record its dataset; pass --dataset")
    spec = open_dataset(dataset, args.data, _limits(args))
    shape = input_shape_of(info, spec)
    ev = evaluate(model, spec.test(512), progress=True)
    flops, params = oba_fx.count(model, torch.randn(1, *shape))
    res = {"model": args.checkpoint, "dataset": spec.name, **ev, "flops": flops, "params": params}
    log(f"{args.checkpoint} on {spec.name} test ({ev['samples']} samples): accuracy {ev['accuracy']:.4f}, "
         f"loss {ev['loss']:.4f}, {flops / 1e6:.2f} MFLOPs, {params / 1e6:.3f} M params")
    if args.json:
        write_json(args.json, res)
        log(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    import oba_fx

    model, info = load_model(args.checkpoint, parse_input_shape(args.input_shape))
    shape = input_shape_of(info)
    path = oba_fx.export_onnx(model, torch.randn(2, *shape), args.out)
    log(f"wrote {path} (checked with onnx.checker; onnxruntime matches PyTorch; dynamic batch)")
    return 0


def cmd_bench(args) -> int:
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")
    model, info = load_model(args.checkpoint, parse_input_shape(args.input_shape))
    models = {"model": model}
    if args.baseline:
        base, binfo = load_model(args.baseline, parse_input_shape(args.input_shape))
        if binfo.get("input_shape") and info.get("input_shape") and binfo["input_shape"] != info["input_shape"]:
            raise UserError(f"--baseline takes inputs {binfo['input_shape']} but the model takes {info['input_shape']}")
        models = {"original": base, "slimmed": model}
    run_bench(models, input_shape_of(info), args.batch_sizes, args.repeats, Path(args.json) if args.json else None,
              onnx=not args.no_onnx, channels_last=args.channels_last, compiled=args.compile)
    return 0


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


def _demo_parser(sub) -> None:
    import oba_fx

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
    d.add_argument("--criterion", default="oba", choices=list(compress_criteria()),
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


def _train_parser(sub) -> None:
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


def _compress_parser(sub) -> None:
    import oba_fx

    c = sub.add_parser("compress", help="prune a checkpoint to a FLOPs target, fine-tune, export")
    c.add_argument("checkpoint", help="a training checkpoint or an oba_fx.save file")
    _add_data(c, dataset_default=None)
    c.add_argument("--target-flops", type=float, default=0.5, help="fraction of FLOPs to keep, in (0, 1]")
    c.add_argument("--target-latency", type=float, metavar="F",
                   help="instead of FLOPs: fraction of the original's latency to keep, measured on this machine "
                        "in --backend at --latency-batch (a per-layer table, cached, then re-measured)")
    c.add_argument("--latency-batch", type=int, default=1, help="batch size --target-latency is measured at")
    c.add_argument("--criterion", default=oba_fx.DEFAULT_CRITERION,
                   help=f"one of {', '.join(compress_criteria())} (default {oba_fx.DEFAULT_CRITERION}, chosen from the "
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


def _eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="test accuracy and loss of a checkpoint")
    e.add_argument("checkpoint")
    _add_data(e, dataset_default=None)
    e.add_argument("--json", help="write the result as JSON here")
    e.set_defaults(fn=cmd_eval)


def _export_parser(sub) -> None:
    x = sub.add_parser("export", help="export a checkpoint to ONNX (verified in onnxruntime)")
    x.add_argument("checkpoint")
    x.add_argument("--out", required=True, help="the .onnx file to write")
    x.add_argument("--input-shape", help="one sample's shape C,H,W (default: recorded in the checkpoint)")
    x.set_defaults(fn=cmd_export)


def _bench_parser(sub) -> None:
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


def _inspect_parser(sub) -> None:
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


def _blocks_parser(sub) -> None:
    bl = sub.add_parser("blocks", help="which network-curvature Hessian blocks F_lm are structurally zero, and why")
    bl.add_argument("model", help="a model name or a checkpoint")
    bl.add_argument("--input-shape", help="one sample's shape C,H,W (defaults as for inspect)")
    bl.add_argument("--rows", type=int, default=40, help="max block pairs to print")
    bl.add_argument("--png", help="write the block heatmap here")
    bl.add_argument("--graphml", help="write the block graph as GraphML here")
    bl.add_argument("--dot", help="write the block graph as DOT here")
    bl.add_argument("--json", help="write the classification as JSON here")
    bl.set_defaults(fn=cmd_blocks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oba-fx", description="Optimal Brain Apoptosis as a torch.fx compiler pass")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _train_parser(sub)
    _compress_parser(sub)
    _eval_parser(sub)
    _export_parser(sub)
    _bench_parser(sub)
    _inspect_parser(sub)
    _blocks_parser(sub)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetNotFound
    from .passes.curvature import CalibrationError
    from .passes.errors import UsageError
    from .passes.trace import TraceFailure
    from .train import CheckpointError

    return (UsageError, DatasetNotFound, CheckpointError, CalibrationError, TraceFailure, FileNotFoundError,
            MemoryError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except _user_errors() as e:
        if args.debug:
            raise
        from .data import DatasetNotFound

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
