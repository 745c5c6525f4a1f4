"""The rewrite gives back the in-place residual adds that fx tracing drops, only where nothing can change."""
from __future__ import annotations

import copy
import operator
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

import oba_fx
from oba_fx.passes.inplace import add_into, inplace_adds


def _out_of_place(gm):
    gm = copy.deepcopy(gm)
    for n in gm.graph.nodes:
        if n.target is add_into:
            n.target = operator.add
    gm.recompile()
    return gm


def _compress(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oba_fx.compress(model, x[:2], [(x, torch.randint(0, 10, (len(x),)))], target_flops=0.5,
                               progress=False, compensate=False, reestimate_bn=False).model


@pytest.mark.slow
def test_resnet_blocks_add_in_place_with_the_same_values_and_gradients():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    slim = _compress(model, x)
    n = sum(node.target is add_into for node in slim.graph.nodes)
    assert n == 8, n  # one per BasicBlock: `out += identity` after bn2
    plain = _out_of_place(slim)
    with torch.no_grad():
        assert torch.equal(slim(x), plain(x))
    slim.train(), plain.train()
    xs = x.clone().requires_grad_(True)
    xp = x.clone().requires_grad_(True)
    slim(xs).square().sum().backward()
    plain(xp).square().sum().backward()
    assert torch.allclose(xs.grad, xp.grad, rtol=1e-5, atol=1e-6)
    gp = dict(plain.named_parameters())
    for name, p in slim.named_parameters():
        assert torch.allclose(p.grad, gp[name].grad, rtol=1e-5, atol=1e-6), name
    # a second compress traces the slim model again: add_into is not a leaf, it traces to a plain add
    retraced = oba_fx.trace(slim.eval(), x[:2])
    assert not any(node.target is add_into for node in retraced.gm.graph.nodes)
    again = _compress(slim, x)
    with torch.no_grad():
        assert again(x).shape == (4, 10)


@pytest.mark.slow
def test_slim_resnet_compiles_as_one_graph():
    """Under torch.compile the in-place helpers are plain ops: no graph break per block (reading ``grad_fn``
    broke the graph at every add, and recompiling ``add_into`` per shape ran the slim model slower compiled than
    the original)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    slim = _compress(model, x)
    assert any(node.target is add_into for node in slim.graph.nodes)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(slim)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    with torch.no_grad():
        assert torch.allclose(torch.compile(slim, backend="eager")(x), slim(x), rtol=1e-5, atol=1e-6)


class _Adds(nn.Module):
    """Adds the pass must leave alone: a first operand with another user, a function's output, a broadcast that
    would grow the first operand, and one it may take (conv output, sole user)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(3, 1, 1)
        self.d = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a = self.a(x)
        shared = a + x[:, :1]  # a is used again below
        fn = torch.relu(x[:, :1]) + a  # a function's output
        c = self.c(x)
        grows = c + a  # c has 1 channel: a.add_ would have to broadcast c up; runtime falls back
        d = self.d(x)
        takes = d + a
        return shared + fn + grows + takes + a


def test_only_safe_adds_become_in_place():
    torch.manual_seed(0)
    m = _Adds().eval()
    gm = torch.fx.symbolic_trace(m)
    ref_gm = copy.deepcopy(gm)
    assert inplace_adds(gm) == 2  # grows (checked again at run time) and takes
    adds = [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, add_into)]
    assert adds[:4] == [operator.add, operator.add, add_into, add_into]  # shared, fn, grows, takes
    assert all(t is operator.add for t in adds[4:])  # the sum of the results: functions' outputs
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(gm(x), ref_gm(x))
        assert torch.equal(gm(x), m(x))


class _Block(nn.Module):
    """A residual block with out-of-place ReLUs: a shared nn.ReLU() module and F.relu."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        out = self.relu(self.b1(self.c1(x)))  # after a BN: in place
        out = self.b2(self.c2(out)) + x  # add_into
        out = torch.nn.functional.relu(out)  # after an add: in place
        return self.head(self.relu(out).mean((2, 3)))  # after relu_into (not a safe producer): stays


def test_relus_go_in_place_and_everything_survives_save_and_load(tmp_path):
    """ReLUs after a BN or an add run in place (the module form and F.relu); a save/load round trip (which
    re-traces the pickled code) gets every in-place op back; values and gradients unchanged."""
    from oba_fx.passes.inplace import relu_into

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Block()).eval()
    x = torch.randn(4, 3, 16, 16)
    slim = _compress(model, x)
    count = lambda gm, f: sum(n.target is f for n in gm.graph.nodes)  # noqa: E731
    assert (count(slim, add_into), count(slim, relu_into)) == (1, 2)
    path = tmp_path / "slim.pt"
    oba_fx.save(slim, path)
    loaded = oba_fx.load(path)
    assert (count(loaded, add_into), count(loaded, relu_into)) == (1, 2)
    plain = torch.fx.symbolic_trace(slim)  # re-traced: plain adds and F.relu
    assert count(plain, add_into) == 0 and count(plain, relu_into) == 0
    with torch.no_grad():
        ref = plain(x)
        assert torch.equal(slim(x), ref) and torch.equal(loaded(x), ref)
    slim.train(), plain.train()  # fine-tuning through the in-place ops gives the out-of-place gradients
    slim(x).square().sum().backward()
    plain(x).square().sum().backward()
    gp = dict(plain.named_parameters())
    for name, p in slim.named_parameters():
        assert torch.allclose(p.grad, gp[name].grad, rtol=1e-5, atol=1e-6), name
