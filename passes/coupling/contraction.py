"""Coupling rules for contractions: matmul / bmm / mm and einsum.

The contracted dims of the operands couple with each other; the free dims
couple with the output's; batch dims couple where their sizes agree.
"""
from __future__ import annotations

import operator

import torch

from .core import COUPLING_RULES, RuleContext


@COUPLING_RULES.register(operator.matmul, torch.matmul, torch.bmm, torch.mm, "matmul", "bmm", "mm")
def matmul_rule(r: RuleContext, node):
    a_node, b_node = node.args[0], node.args[1]
    a, b, y = r.value(a_node), r.value(b_node), r.value(node)
    a_vec, b_vec = len(a) == 1, len(b) == 1
    if a_vec and b_vec:
        r.c.equal(a[0], b[0])
        return
    if a_vec:
        r.c.equal(a[0], b[-2])
        r.c.equal(y[-1], b[-1])
        r.batch(y[:-1], [b[:-2]])
        return
    if b_vec:
        r.c.equal(a[-1], b[0])
        r.c.equal(y[-1], a[-2])
        r.batch(y[:-1], [a[:-2]])
        return
    r.c.equal(a[-1], b[-2])
    r.c.equal(y[-2], a[-2])
    r.c.equal(y[-1], b[-1])
    r.batch(y[:-2], [a[:-2], b[:-2]])


@COUPLING_RULES.register(torch.einsum)
def einsum_rule(r: RuleContext, node):
    """Dims that share a letter couple (the largest size among them: size-1 dims broadcast)."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if not rhs and "->" not in eq:
        letters = sorted(set(c for c in lhs if c.isalpha()), key=lambda c: c)
        rhs = "".join(c for c in letters if lhs.count(c) == 1)
    if "..." in eq:
        n_ell = max(len(r.value(o)) - len(t.replace("...", "")) for o, t in zip(ops, terms))
        fill = "".join(chr(0x100 + k) for k in range(n_ell))
        terms = [t.replace("...", fill[n_ell - (len(r.value(o)) - len(t.replace("...", ""))) :])
                 for o, t in zip(ops, terms)]
        rhs = rhs.replace("...", fill)
    by_letter: dict[str, list[int]] = {}
    for o, t in zip(ops, terms):
        for ch, s in zip(t, r.value(o)):
            by_letter.setdefault(ch, []).append(s)
    for ch, s in zip(rhs, r.value(node)):
        by_letter.setdefault(ch, []).append(s)
    for slots in by_letter.values():
        big = max(r.c.size(s) for s in slots)
        slots = [s for s in slots if r.c.size(s) == big]
        for s in slots[1:]:
            r.c.equal(slots[0], s)
