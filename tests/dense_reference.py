"""Dense-Hessian references for tiny float64 networks (test helper)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, hessian, jacfwd, jacrev


class Flat:
    """Flatten a model's parameters into one vector and back."""

    def __init__(self, model):
        self.model = model
        self.names = [n for n, p in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(self, v):
        return {n: t.reshape(s) for n, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def flat(self, d):
        return torch.cat([d[n].reshape(-1) for n in self.names])


def full_data(calibration):
    xs = torch.cat([x for x, _ in calibration])
    ys = torch.cat([y for _, y in calibration])
    return xs, ys


def _jacobian_loop(fn, v):
    """Jacobian of a vector function by one plain backward per output (no vmap).

    torch.func's batched rules (jacrev/jacfwd/hessian use vmap) return an
    asymmetric, wrong Hessian for the tiny attention model on torch 2.14.1,
    while plain autograd agrees with finite differences; so the references
    are built without vmap.
    """
    v = v.detach().requires_grad_(True)
    out = fn(v).reshape(-1)
    rows = []
    for i in range(out.numel()):
        (r,) = torch.autograd.grad(out[i], v, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(v) if r is None else r)
    return torch.stack(rows)


def dense(model, calibration, loss=F.cross_entropy, third=True):
    """g, H, G, F of the mean loss over all data (third: the vmap-based 3rd derivative tensor)."""
    model.eval()
    fl = Flat(model)
    x, y = full_data(calibration)

    def out_fn(v):
        return functional_call(model, fl.unflat(v), (x,))

    def L(v):
        return loss(out_fn(v), y)

    th = fl.theta
    g = torch.func.grad(L)(th)

    def grad_fn(v):
        return torch.autograd.grad(L(v), v, create_graph=True)[0]

    H = _jacobian_loop(grad_fn, th)
    out = out_fn(th).detach()
    J = _jacobian_loop(out_fn, th)

    def out_grad(o):
        return torch.autograd.grad(loss(o.reshape(out.shape), y), o, create_graph=True)[0]

    Hl = _jacobian_loop(out_grad, out.reshape(-1))
    G = J.T @ Hl @ J
    T = jacfwd(jacfwd(torch.func.grad(L)))(th) if third else None
    return fl, g, H, G, T
