"""The coupling analysis is extended the documented way: a rule registered with ``COUPLING_RULES.register``."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import oba_fx
from helpers import random_removal, zero_consumers
from oba_fx.passes.coupling import COUPLING_RULES, NoRule, RuleContext


class ChannelScale(nn.Module):
    """A user's per-channel op, kept as a leaf: the analysis has no rule for it."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.s = ChannelScale(8)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.s(self.c1(x))))


def channel_scale_rule(r: RuleContext, node):
    """Every dim passes through; ``scale`` goes with its channel."""
    x, y = r.value(node.args[0]), r.value(node)
    r.eq_all(x, y)
    r.c.equal(y[1], r.c.param(f"{node.target}.scale", {0: "norm"})[0])
    return None


def _trace(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = oba_fx.trace(model, x, leaf_modules=[ChannelScale])
    return graph, [str(w.message) for w in caught if issubclass(w.category, oba_fx.UnknownOpWarning)]


def _c1_group(graph):
    return next(g for g in graph.groups if any(m.name == "c1.weight" and m.dim == 0 for m in g.members))


@pytest.fixture
def registered():
    """Register a rule for ChannelScale for one test, and remove it after."""
    def register(rule):
        COUPLING_RULES.register(ChannelScale)(rule)
        return rule

    yield register
    COUPLING_RULES.unregister(ChannelScale)
    assert ChannelScale not in COUPLING_RULES


def test_a_registered_rule_makes_a_frozen_channel_prunable(registered):
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)

    graph, warned = _trace(model, x)  # no rule: the channels ChannelScale touches stay frozen
    g = _c1_group(graph)
    assert not g.prunable and "ChannelScale" in g.reason
    assert len(warned) == 1 and warned[0].startswith("oba_fx: no coupling rule for module s (ChannelScale)")
    assert warned[0].endswith("; the dims it touches stay frozen")

    registered(channel_scale_rule)
    graph, warned = _trace(model, x)
    assert not warned
    g = _c1_group(graph)
    assert g.prunable and g.size == 8
    assert {(m.name, m.dim) for m in g.members} >= {("c1.weight", 0), ("c1.bias", 0), ("s.scale", 0),
                                                      ("c2.weight", 1)}
    removal = {g.id: [1, 4, 6]}
    slim = graph.prune(removal)
    assert slim.s.scale.shape == (5,) and slim.c1.out_channels == 5 and slim.c2.in_channels == 5
    ref = zero_consumers(graph, removal)  # the original with the removed channels' consumer columns zeroed
    with torch.no_grad():
        y, y_ref = slim(x), ref(x)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    # and a random removal over every prunable group is exact too
    removal = random_removal(graph, 0.5)
    with torch.no_grad():
        assert torch.allclose(graph.prune(removal)(x), zero_consumers(graph, removal)(x), rtol=1e-5, atol=1e-6)


def test_no_rule_reason_reaches_the_warning(registered):
    registered(lambda r, node: NoRule("ChannelScale with a per-pixel scale is not supported"))
    graph, warned = _trace(Net().eval(), torch.randn(2, 3, 8, 8))
    assert len(warned) == 1
    assert "no coupling rule for module s (ChannelScale)" in warned[0]
    assert "ChannelScale with a per-pixel scale is not supported" in warned[0]
    assert not _c1_group(graph).prunable


def test_the_default_reason_keeps_the_plain_warning(registered):
    registered(lambda r, node: NoRule())
    _, warned = _trace(Net().eval(), torch.randn(2, 3, 8, 8))
    assert len(warned) == 1 and NoRule().reason not in warned[0]
    assert warned[0].endswith("; the dims it touches stay frozen")


def test_builtin_rules_are_registered_with_the_public_decorator():
    """The roll rule lives in its own module, written against the public API only."""
    from oba_fx.passes.coupling import roll

    assert torch.roll in COUPLING_RULES and "roll" in COUPLING_RULES
    assert roll.roll_rule.__module__ == "oba_fx.passes.coupling.roll"
    # a module rule covers subclasses (most specific registered class in the MRO)
    assert COUPLING_RULES.module_rule(type("MyConv", (nn.Conv2d,), {})) is COUPLING_RULES.module_rule(nn.Conv2d)
