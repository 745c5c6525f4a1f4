"""Command line: ``oba-fx inspect MODEL``."""
from __future__ import annotations

import argparse
import sys
import warnings

import networkx as nx
import torch

from .io import atomic_write, write_json


def _input_shape(name: str, text: str | None) -> tuple[int, ...]:
    if text:
        try:
            return tuple(int(v) for v in text.split(","))
        except ValueError:
            raise SystemExit(f"--input-shape must be comma-separated ints like 1,3,32,32, got '{text}'") from None
    import models_zoo

    if name in models_zoo.ZOO:
        return (1, 1, 28, 28)  # Fashion-MNIST, the embedded default data set
    return (1, 3, 224, 224)


def _build(name: str, shape: tuple[int, ...]) -> torch.nn.Module:
    import models_zoo

    kw = {}
    if name in models_zoo.ZOO:
        kw["in_channels"] = shape[1]
        if name.startswith("vit"):
            kw["img_size"] = shape[-1]
    return models_zoo.create(name, **kw)


def cmd_inspect(args) -> int:
    import oba_fx

    shape = _input_shape(args.model, args.input_shape)
    model = _build(args.model, shape).eval()
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", oba_fx.UnknownOpWarning)  # reported below
        g = oba_fx.trace(model, x)
    flops, params = oba_fx.count(model, x)
    print(f"{args.model}: input {tuple(shape)}, {flops / 1e6:.2f} MFLOPs, {params / 1e6:.3f} M params")
    print(f"{g.ir.number_of_nodes()} graph nodes, {len(g.groups)} groups, {len(g.prunable_groups)} prunable\n")
    print(g.summary(max_rows=args.rows))
    for w in g.warnings:
        print("warning:", w)
    if args.json:
        d = g.to_dict()
        d.update(model=args.model, input_shape=list(shape), flops=flops, params=params)
        write_json(args.json, d)
        print(f"wrote {args.json}")
    if args.graphml:
        ir = nx.DiGraph()
        for n, a in g.ir.nodes(data=True):
            ir.add_node(n, **{k: str(v) for k, v in a.items() if v is not None})
        ir.add_edges_from(g.ir.edges())
        atomic_write(args.graphml, lambda p: nx.write_graphml(ir, p))
        print(f"wrote {args.graphml}")
    return 0


def cmd_blocks(args) -> int:
    import oba_fx

    shape = _input_shape(args.model, args.input_shape)
    model = _build(args.model, shape).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", oba_fx.UnknownOpWarning)
        g = oba_fx.trace(model, torch.randn(*shape))
    blocks = oba_fx.hessian_blocks(g)
    print(blocks.to_text(max_rows=args.rows))
    for path, fn in ((args.png, blocks.plot), (args.graphml, blocks.write_graphml), (args.dot, blocks.write_dot)):
        if path:
            fn(path)
            print(f"wrote {path}")
    if args.json:
        write_json(args.json, blocks.to_dict())
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="oba-fx", description="Optimal Brain Apoptosis as a torch.fx compiler pass")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("inspect", help="trace a model and list its coupled channel groups")
    q.add_argument("model", help="a models_zoo name (resnet20, vgg19_bn, vit_small, ...) or a torchvision model name")
    q.add_argument("--input-shape", help="comma-separated input shape; default 1,1,28,28 for zoo models, "
                   "1,3,224,224 for torchvision models")
    q.add_argument("--rows", type=int, default=60, help="max groups to print (default 60)")
    q.add_argument("--json", help="write the groups as JSON here")
    q.add_argument("--graphml", help="write the networkx IR as GraphML here")
    q.set_defaults(fn=cmd_inspect)
    b = sub.add_parser("blocks", help="which network-curvature Hessian blocks F_lm are structurally zero, and why")
    b.add_argument("model", help="a models_zoo or torchvision model name")
    b.add_argument("--input-shape", help="comma-separated input shape (defaults as for inspect)")
    b.add_argument("--rows", type=int, default=40, help="max block pairs to print")
    b.add_argument("--png", help="write the block heatmap here")
    b.add_argument("--graphml", help="write the block graph as GraphML here")
    b.add_argument("--dot", help="write the block graph as DOT here")
    b.add_argument("--json", help="write the classification as JSON here")
    b.set_defaults(fn=cmd_blocks)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
