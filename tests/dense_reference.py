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


def dense(model, calibration, loss=F.cross_entropy, third=True):
    """g, H, G, F and the third derivative tensor of the mean loss over all data."""
    model.eval()
    fl = Flat(model)
    x, y = full_data(calibration)

    def out_fn(v):
        return functional_call(model, fl.unflat(v), (x,))

    def L(v):
        return loss(out_fn(v), y)

    th = fl.theta
    g = torch.func.grad(L)(th)
    H = hessian(L)(th)
    out = out_fn(th)
    J = jacrev(out_fn)(th).reshape(out.numel(), -1)
    Hl = hessian(lambda o: loss(o.reshape(out.shape), y))(out.reshape(-1)).reshape(out.numel(), out.numel())
    G = J.T @ Hl @ J
    T = jacfwd(jacfwd(torch.func.grad(L)))(th) if third else None
    return fl, g, H, G, T
