"""Importance criteria: per-parameter scores and per-channel coupled-group scores.

Every criterion predicts, per parameter entry, its share of the loss change
when the scored parameters are pruned, δ = −θ:

==============  =================================================================
``oba``         g⊙δ + ½ δ⊙(Hδ)            full Hessian (FastOBA, exact)
``oba-network`` g⊙δ + ½ δ⊙(Fδ)            the paper's graph-walk quantity, exact
``oba-gn``      g⊙δ + ½ δ⊙(Gδ)            Gauss-Newton part only
``oba-k3``      ``oba`` + ⅙ δ⊙∇³L[δ,δ]    up to the third-order term
``group-exact`` per channel S alone: g_Sδ_S + ½ δ_SᵀH_SSδ_S   (group_scores only)
``magnitude``   θ²                          (group score: squared L2 norm)
``taylor``      |g⊙δ|
``obd``         ½ diag(H) δ²                diag(H) from Hutchinson probes
``obd-fisher``  ½ diag(F̂) δ²                empirical Fisher, mean of per-sample g²
                                            (Torch-Pruning's HessianImportance)
``random``      uniform [0, 1)
==============  =================================================================

A group's per-channel score is the sum of its member slices' scores: producer
rows, norm entries, biases, consumer columns and head slices.

Criteria live in a registry (:func:`register_criterion`): a criterion is a per-parameter scoring function
(``scores(request) -> {param name: float64 tensor}``, :class:`ScoreRequest`) and, optionally, a
per-channel one (``channels(graph, calibration, loss_fn, options)``) that ``group_scores`` tries first.
The built-ins above are registered the way a user registers their own (``magnitude`` is the plain
example); ``CRITERIA`` is the tuple of the built-in names, :func:`criteria` the live list.

This module owns the criteria, the per-parameter and per-channel scores, and the group-exact products
(``vmap``'d HVPs and probe estimates); the data loops go through ``passes.calibration.reduce``.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.func import grad, jvp, vmap
from torch.utils import _pytree as pytree

from .passes import distributed as _dist
from .passes import stateless
from .passes.calibration import (Batch, CalibrationError, Sums, check_default_loss_output, default_loss, reduce,
                                 size_of_targets)
from .passes.curvature import composite_norms, curvature, scoring_mode
from .passes.errors import UsageError

__all__ = ["CRITERIA", "Criterion", "ScoreRequest", "ScoringOptions", "register_criterion", "unregister_criterion",
           "criteria", "get_criterion", "parameter_scores", "group_scores", "rank_scores", "group_exact_scores",
           "group_exact_parts", "hutchinson_diagonal", "fisher_diagonal", "channel_maps", "ChannelMap"]


# --------------------------------------------------------------------------- the criterion registry


@dataclass(frozen=True)
class ScoringOptions:
    """The keyword block every scoring entry point takes, passed through as one value."""

    probes: int = 16
    seed: int = 0
    progress: bool = True
    micro_batch: int | None = None
    checkpoint: bool | int = False
    shortcuts: bool = True
    method: str = "auto"  # group-exact: "vmap", "probes" or "auto"
    marginals: bool = True  # coupled-group scores of the oba family from row/column marginals


@dataclass
class ScoreRequest:
    """What a criterion's per-parameter function receives.

    Attributes:
        model: the network (not to be modified).
        calibration: re-iterable ``(inputs, targets)`` batches (None for criteria registered with ``data=False``).
        names: the scored parameters.
        loss_fn: batch-mean loss, or None for the default cross-entropy.
        options: probes, seed, progress, micro_batch, checkpoint, shortcuts.
    """

    model: nn.Module
    calibration: Iterable | None
    names: list[str]
    loss_fn: Callable | None
    options: ScoringOptions = field(default_factory=ScoringOptions)

    def __post_init__(self):
        self.named = dict(self.model.named_parameters())

    def delta(self, name: str) -> torch.Tensor:
        """δ = −θ of one parameter in float64, a fresh tensor (never in place on the model)."""
        return self.named[name].detach().to(torch.float64, copy=True).neg_()

    def curvature(self, want, **kwargs):
        """``passes.curvature.curvature`` on the request's model, data, parameters and options."""
        o = self.options
        kwargs = {"loss_fn": self.loss_fn, "params": self.names, "progress": o.progress,
                  "micro_batch": o.micro_batch, "checkpoint": o.checkpoint, "shortcuts": o.shortcuts, **kwargs}
        return curvature(self.model, self.calibration, want=want, **kwargs)


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: ``scores(request)`` per parameter and/or ``channels(...)`` per channel.

    ``channels(graph, calibration, loss_fn, options) -> {group id: tensor} or None`` is tried first by
    :func:`group_scores`; None (or no ``channels``) falls back to ``scores`` summed over each channel's
    member slices.  ``data=False``: ``scores`` needs no calibration data (``magnitude``, ``random``).
    """

    name: str
    scores: Callable[[ScoreRequest], dict] | None = None
    channels: Callable | None = None
    data: bool = True


_REGISTRY: dict[str, Criterion] = {}


def register_criterion(name: str, scores: Callable | None = None, *, channels: Callable | None = None,
                       data: bool = True, replace: bool = False):
    """Register a criterion under ``name``; usable by ``parameter_scores``, ``group_scores`` and ``compress``.

    ``scores(request: ScoreRequest) -> {param name: float64 tensor of the parameter's shape}`` gives every
    entry's predicted share of the loss change; ``channels`` (optional) scores coupled-group channels
    directly (see :class:`Criterion`).  Without either, returns a decorator for ``scores``::

        @oba_fx.scoring.register_criterion("l1")
        def l1(request):
            return {n: request.delta(n).abs() for n in request.names}

    Raises ValueError if ``name`` is taken (``replace=True`` overrides).
    """
    if scores is None and channels is None:
        def decorator(fn):
            register_criterion(name, fn, data=data, replace=replace)
            return fn

        return decorator
    if not isinstance(name, str) or not name:
        raise UsageError(f"a criterion name must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not replace:
        raise UsageError(f"criterion '{name}' is already registered (pass replace=True to override it)")
    crit = Criterion(name, scores, channels, data)
    _REGISTRY[name] = crit
    return crit


def unregister_criterion(name: str) -> None:
    """Remove a registered criterion (KeyError if there is none of that name)."""
    del _REGISTRY[name]


def criteria() -> tuple[str, ...]:
    """The names of every registered criterion, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``; ValueError naming the choices (and a close match) otherwise."""
    if name not in _REGISTRY:
        import difflib

        names = criteria()
        close = difflib.get_close_matches(name, names, n=1) if isinstance(name, str) else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UsageError(f"unknown criterion '{name}'{hint}; choose from {', '.join(names)}")
    return _REGISTRY[name]


def _reiterable(calibration):
    """A one-shot iterator is materialized once so several passes see the same data."""
    if calibration is None:
        raise CalibrationError("calibration is None: give an iterable of (inputs, targets) batches")
    try:
        it = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration must be an iterable of (inputs, targets) batches, got {type(calibration).__name__}"
        ) from None
    if it is calibration:
        return list(calibration)
    return calibration


# --------------------------------------------------------------------------- per-parameter scores


@_dist.accepts_process_group
def parameter_scores(
    model: nn.Module,
    calibration: Iterable,
    criterion: str = "oba",
    loss_fn: Callable | None = None,
    *,
    params: list[str] | None = None,
    probes: int = 16,
    seed: int = 0,
    progress: bool = True,
    micro_batch: int | None = None,
    checkpoint: bool | int = False,
    shortcuts: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-parameter scores, same shapes as the parameters (float64).

    Args:
        model: the network (not modified; scored in eval mode).
        calibration: iterable of ``(inputs, targets)``; the loss is the mean over all samples.
        criterion: one of :func:`criteria` except ``group-exact`` (use :func:`group_scores`).
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss; default cross-entropy.
        params: names of the scored parameters (δ = −θ on them); default all trainable ones.
        probes: Hutchinson probes for ``obd``.
        seed: seed for ``obd`` probes and ``random``.
        progress: tqdm progress bars.
        micro_batch: split calibration batches into chunks of this many samples
            (less memory; same scores for a per-sample mean loss).
        checkpoint: activation checkpointing while scoring (True, or a number of
            graph segments): less memory for one more forward, same scores.
        shortcuts: the exact δ = −θ kernels of the curvature pass (False: PyTorch's
            own forward-AD formulas; same scores, slower).
    """
    options = ScoringOptions(probes=probes, seed=seed, progress=progress, micro_batch=micro_batch,
                             checkpoint=checkpoint, shortcuts=shortcuts)
    return _parameter_scores(model, calibration, criterion, loss_fn, params, options)


def _parameter_scores(model, calibration, criterion: str, loss_fn, params, options: ScoringOptions):
    crit = get_criterion(criterion)
    if crit.scores is None:
        raise UsageError(f"{criterion} scores channels of coupled groups, not parameters: use "
                         "group_scores(graph, ...)")
    names = params if params is not None else [n for n, p in model.named_parameters()
                                               if p.requires_grad and p.is_floating_point()]
    if crit.data:
        calibration = _reiterable(calibration)
    return crit.scores(ScoreRequest(model, calibration, names, loss_fn, options))


def _second_order(request: ScoreRequest, q: str, third: bool = False) -> dict[str, torch.Tensor]:
    """g⊙δ + ½ δ⊙(qδ) (+ ⅙ δ⊙∇³L[δ,δ]), in place on the float64 accumulators, which nothing else holds."""
    r = request.curvature(("g", q, "T3") if third else ("g", q))
    second = getattr(r, q)
    out = {}
    for n in request.names:
        d = request.delta(n)
        s = r.g.pop(n).mul_(d)
        s.add_(second.pop(n).mul_(d), alpha=0.5)
        if third:
            s.add_(r.T3.pop(n).mul_(d), alpha=1.0 / 6.0)
        out[n] = s
    return out


def _marginal_channels(q: str):
    """The oba family's per-channel route: row/column marginals (``curvature(marginals=...)``) where they apply."""

    def channels(graph, calibration, loss_fn, options: ScoringOptions):
        if not options.marginals or options.checkpoint or _dist.current() is not None:
            return None
        return _marginal_group_scores(graph.gm, graph.prunable_groups, calibration, q, loss_fn, options.progress,
                                      options.micro_batch)

    return channels


register_criterion("oba", lambda r: _second_order(r, "H"), channels=_marginal_channels("H"))
register_criterion("oba-network", lambda r: _second_order(r, "F"), channels=_marginal_channels("F"))
register_criterion("oba-gn", lambda r: _second_order(r, "G"), channels=_marginal_channels("G"))
register_criterion("oba-k3", lambda r: _second_order(r, "H", third=True))
register_criterion("group-exact", channels=lambda graph, calibration, loss_fn, o: group_exact_scores(
    graph, calibration, loss_fn, method=o.method, probes=o.probes, seed=o.seed, progress=o.progress)[0])


@register_criterion("magnitude", data=False)
def magnitude(request: ScoreRequest) -> dict[str, torch.Tensor]:
    """θ² per entry (a group's score: its squared L2 norm); registered the way a user registers a criterion."""
    return {n: request.delta(n).square_() for n in request.names}


@register_criterion("taylor")
def taylor(request: ScoreRequest) -> dict[str, torch.Tensor]:
    """|g⊙δ|."""
    r = request.curvature(("g",))
    return {n: r.g.pop(n).mul_(request.delta(n)).abs_() for n in request.names}


@register_criterion("obd")
def obd(request: ScoreRequest) -> dict[str, torch.Tensor]:
    """½ diag(H) δ², diag(H) from Hutchinson probes."""
    o = request.options
    diag = hutchinson_diagonal(request.model, request.calibration, request.names, request.loss_fn, probes=o.probes,
                               seed=o.seed, progress=o.progress, micro_batch=o.micro_batch, checkpoint=o.checkpoint,
                               shortcuts=o.shortcuts)
    return {n: diag[n].mul_(request.delta(n).square_()).mul_(0.5) for n in request.names}


@register_criterion("obd-fisher")
def obd_fisher(request: ScoreRequest) -> dict[str, torch.Tensor]:
    """½ diag(F̂) δ², the empirical Fisher diagonal."""
    fisher = fisher_diagonal(request.model, request.calibration, request.names, request.loss_fn,
                             progress=request.options.progress)
    return {n: fisher[n].mul_(request.delta(n).square_()).mul_(0.5) for n in request.names}


@register_criterion("random", data=False)
def random_scores(request: ScoreRequest) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) from ``seed``."""
    gen = torch.Generator().manual_seed(request.options.seed)
    named = request.named
    return {n: torch.rand(named[n].shape, generator=gen, dtype=torch.float64).to(named[n].device)
            for n in request.names}


#: The built-in criteria, in registration order (:func:`criteria` includes criteria registered later).
CRITERIA = criteria()


def hutchinson_diagonal(model, calibration, names, loss_fn=None, probes=16, seed=0, progress=True, micro_batch=None,
                        checkpoint=False, shortcuts=True):
    """diag(H) ≈ mean over Rademacher probes z of z⊙Hz (unbiased; one HVP pass per probe)."""
    if probes < 1:
        raise UsageError("probes must be >= 1")
    named = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    acc = {n: torch.zeros(named[n].shape, dtype=torch.float64, device=named[n].device) for n in names}
    for _ in range(probes):
        z = {n: (torch.randint(0, 2, named[n].shape, generator=gen) * 2 - 1).to(named[n]) for n in names}
        r = curvature(model, calibration, want=("H",), direction=z, loss_fn=loss_fn, params=names, progress=progress,
                      micro_batch=micro_batch, checkpoint=checkpoint, shortcuts=shortcuts)
        for n in names:
            acc[n] += z[n].to(torch.float64) * r.H[n]
    return {n: v / probes for n, v in acc.items()}


def fisher_diagonal(model, calibration, names, loss_fn=None, progress=True, chunk: int = 32):
    """Empirical Fisher diagonal: mean over samples of the squared per-sample gradient."""
    loss_fn = loss_fn or default_loss
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}

    def sample_loss(p, inputs, target):
        out = stateless.call(model, p, tuple(x.unsqueeze(0) for x in inputs))
        return loss_fn(out, target.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0), chunk_size=chunk)

    def step(batch: Batch, sums: Sums) -> None:
        inputs, targets, bi = batch.inputs, batch.targets, batch.index
        if loss_fn is default_loss:
            with torch.no_grad():
                check_default_loss_output(model(*inputs), targets, bi)
        try:
            with torch.no_grad():  # torch.func.grad ignores it; it keeps the ordinary tape off
                gs = per_sample(params, inputs, targets)
        except Exception:  # noqa: BLE001 - an op without vmap support: loop over samples
            gs = {n: [] for n in names}
            for i in range(targets.shape[0]):
                with torch.no_grad():
                    gi = grad(sample_loss)(params, tuple(x[i] for x in inputs), targets[i])
                for n in names:
                    gs[n].append(gi[n])
            gs = {n: torch.stack(v) for n, v in gs.items()}
        for n in names:
            if not torch.isfinite(gs[n]).all():
                raise CalibrationError(f"batch {bi}: per-sample gradient of {n} is not finite")
            sums.add(n, (gs[n].to(torch.float64) ** 2).sum(0))

    sums = Sums()
    for n in names:
        sums.zeros(n, named[n].shape, named[n].device)
    with scoring_mode(model):
        reduce(calibration, step, device=named[names[0]].device, sums=sums, size=size_of_targets)
    return sums.mean()


# ---------------------------------------------------------------------------
# groups


def _reduce_to_channels(group, per_param: dict[str, torch.Tensor],
                        marginals: dict[str, dict[int, torch.Tensor]] | None = None) -> torch.Tensor:
    """Sum of a per-parameter score over each channel's member slices (``marginals[name][dim]``: parts of
    such sums already taken, added on top of ``per_param``)."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        s = per_param.get(m.name)
        part = (marginals or {}).get(m.name, {}).get(m.dim)
        if s is None and part is None:
            continue  # buffers and unscored tensors carry no score
        along = None
        if s is not None:
            dims = [d for d in range(s.ndim) if d != m.dim]
            along = s.sum(dim=dims) if dims else s
        if part is not None:
            along = part if along is None else along + part
        out.index_add_(0, m.channel, along.detach().cpu()[m.index])
    return out


def _marginal_group_scores(model, groups, calibration, q, loss_fn, progress, micro_batch):
    """Group scores g⊙δ + ½ δ⊙(qδ) (q in H, F, G) without any weight's per-parameter score where it is not
    needed: layers that use a member weight with δ = −θ give the row / column sums of δ⊙g and δ⊙Hδ directly
    (``curvature(marginals=...)``), which skips their weight-gradient products."""
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
    dims: dict[str, set] = {}
    for g in groups:
        for m in g.members:
            if m.name in named:
                dims.setdefault(m.name, set()).add(m.dim)
    marg = {n: tuple(sorted(d)) for n, d in dims.items()
            if n in names and named[n].ndim >= 2 and d <= {0, 1}}
    r = curvature(model, _reiterable(calibration), want=("g", q), loss_fn=loss_fn, params=names, progress=progress,
                  micro_batch=micro_batch, marginals=marg)
    second = getattr(r, q)
    per_param = {}
    for n in names:
        if n not in r.g and n not in second:
            continue
        d = named[n].detach().to(torch.float64, copy=True).neg_()
        s = r.g[n].mul(d) if n in r.g else torch.zeros_like(d)
        if n in second:
            s.add_(second[n].mul_(d), alpha=0.5)
        per_param[n] = s
    parts: dict[str, dict[int, torch.Tensor]] = {}
    mg, mq = (r.marginals or {}).get("g", {}), (r.marginals or {}).get(q, {})
    for n in set(mg) | set(mq):
        parts[n] = {}
        for dim in marg[n]:
            a, b = mg.get(n, {}).get(dim), mq.get(n, {}).get(dim)
            v = None if a is None else a.clone()
            if b is not None:
                v = 0.5 * b if v is None else v.add_(b, alpha=0.5)
            if v is not None:
                parts[n][dim] = v
    return {g.id: _reduce_to_channels(g, per_param, parts) for g in groups}


@_dist.accepts_process_group
def group_scores(
    graph,
    calibration: Iterable,
    criterion: str = "oba",
    loss_fn: Callable | None = None,
    *,
    method: str = "auto",
    probes: int = 64,
    seed: int = 0,
    progress: bool = True,
    micro_batch: int | None = None,
    checkpoint: bool | int = False,
    marginals: bool = True,
) -> dict[int, torch.Tensor]:
    """Predicted loss change per channel of every prunable group (signed, float64).

    Args:
        graph: an ``oba_fx.Graph`` (from ``oba_fx.trace``).
        calibration: iterable of ``(inputs, targets)``.
        criterion: one of :func:`criteria` (``CRITERIA`` and any registered since).
        loss_fn: batch-mean loss; default cross-entropy.
        method: for ``group-exact``: "vmap" (exact, one HVP per channel),
            "probes" (random-sign estimate, ``probes`` HVP passes in total) or
            "auto" (vmap when the model has at most 4096 prunable channels).
        probes: probe count for ``group-exact`` probes and ``obd``.
        marginals: the oba family (``oba``, ``oba-network``, ``oba-gn``) scores
            channels from the row/column marginals of the curvature pass, which
            skips weight-gradient products; False sums per-parameter scores
            instead (same scores up to round-off, slower).

    Returns:
        ``{group id: tensor of shape (group.size,)}`` for every prunable group.
        Use :func:`rank_scores` to turn them into importances.
    """
    crit = get_criterion(criterion)
    options = ScoringOptions(probes=probes, seed=seed, progress=progress, micro_batch=micro_batch,
                             checkpoint=checkpoint, method=method, marginals=marginals)
    if crit.channels is not None:
        scores = crit.channels(graph, calibration, loss_fn, options)
        if scores is not None:
            return scores
    per_param = _parameter_scores(graph.gm, calibration, criterion, loss_fn, None,
                                  dataclasses.replace(options, probes=min(probes, 16)))
    return {g.id: _reduce_to_channels(g, per_param) for g in graph.prunable_groups}


def rank_scores(scores: dict[int, torch.Tensor], signed: bool = False, normalize: str = "none") -> dict[int, torch.Tensor]:
    """Importances for global ranking: |ΔL| (or signed ΔL), optionally normalized per group.

    Args:
        signed: rank by the signed predicted loss change instead of its magnitude.
        normalize: "none", "mean" (divide by the group's mean |score|) or
            "max" (divide by the group's max |score|).
    """
    if normalize not in ("none", "mean", "max"):
        raise UsageError(f"normalize must be 'none', 'mean' or 'max', got {normalize!r}")
    out = {}
    for gid, s in scores.items():
        v = s.clone() if signed else s.abs()
        if normalize != "none":
            ref = s.abs().mean() if normalize == "mean" else s.abs().max()
            v = v / ref.clamp_min(1e-30)
        out[gid] = v
    return out


class ChannelMap:
    """Which channel of one group each entry of one parameter belongs to.

    ``entries`` are (dim, chan) pairs, ``chan`` a LongTensor over that dim with
    the channel id or -1.  A parameter is usually sliced along one dim; a
    residual conv that maps a channel onto itself is sliced along two (rows
    and columns of the same group), and an entry on both slices of channel c
    belongs to c once.
    """

    def __init__(self, shape, entries):
        self.shape = tuple(shape)
        self.entries = entries
        if len(entries) > 2:
            raise NotImplementedError("a parameter sliced along more than two dims by one group")

    def to(self, device):
        return ChannelMap(self.shape, [(d, c.to(device)) for d, c in self.entries])

    def _b(self, vec, dim):
        view = [1] * len(self.shape)
        view[dim] = -1
        return vec.view(view)

    def _overlap(self):
        (d0, c0), (d1, c1) = self.entries
        return d0, d1, (c0[:, None] == c1[None, :]) & (c0[:, None] >= 0)

    def mask(self, c):
        """Boolean mask of channel ``c`` (works under vmap with a batched ``c``)."""
        out = None
        for d, chan in self.entries:
            m = self._b(chan == c, d)
            out = m if out is None else (out | m)
        return out.expand(self.shape)

    def spread(self, per_channel):
        """Σ_c per_channel[c] · mask_c, as a tensor of the parameter's shape."""
        pad = torch.cat([per_channel, per_channel.new_zeros(1)])  # index -1 -> 0
        out = None
        for d, chan in self.entries:
            v = self._b(pad[chan], d)
            out = v if out is None else out + v
        out = out.expand(self.shape).clone()
        if len(self.entries) == 2:
            d0, d1, eq = self._overlap()
            fix = torch.where(eq, pad[self.entries[0][1]][:, None], torch.zeros((), dtype=pad.dtype))
            out = out - fix.reshape([self.shape[k] if k in (d0, d1) else 1 for k in range(len(self.shape))])
        return out

    def reduce(self, x, size):
        """Per channel c: the sum of ``x`` over mask_c."""
        out = torch.zeros(size, dtype=x.dtype)
        for d, chan in self.entries:
            along = x.sum(dim=[k for k in range(x.ndim) if k != d]) if x.ndim > 1 else x
            sel = chan >= 0
            out.index_add_(0, chan[sel], along[sel])
        if len(self.entries) == 2:
            d0, d1, eq = self._overlap()
            rest = [k for k in range(x.ndim) if k not in (d0, d1)]
            plane = x.sum(dim=rest) if rest else x
            i, j = eq.nonzero(as_tuple=True)
            out.index_add_(0, self.entries[0][1][i], -plane[i, j])
        return out


def channel_maps(graph, names) -> dict[int, dict[str, ChannelMap]]:
    """Per prunable group: {param name: ChannelMap} of the parameters in ``names``."""
    maps = {}
    params = dict(graph.gm.named_parameters())
    for g in graph.prunable_groups:
        per: dict[str, dict[int, torch.Tensor]] = {}
        for m in g.members:
            if m.name not in names:
                continue
            p = params[m.name]
            chan = per.setdefault(m.name, {}).setdefault(m.dim, torch.full((p.shape[m.dim],), -1, dtype=torch.long))
            chan[m.index] = m.channel
        maps[g.id] = {n: ChannelMap(params[n].shape, sorted(d.items())) for n, d in per.items()}
    return maps


@_dist.accepts_process_group
def group_exact_scores(graph, calibration, loss_fn=None, method="auto", probes=64, seed=0, progress=True,
                       channels=None):
    """g_Sδ_S + ½ δ_SᵀH_SSδ_S for each channel S of each prunable group, alone.

    "vmap" is exact: a batched Hessian-vector product over the group's channels.
    ``channels={group id: [channel, ...]}`` (vmap only) computes just those
    channels, one HVP each; every other entry of the result is NaN.
    "probes" estimates the quadratic term with P random-sign probes over all
    channels of all groups at once: with v = Σ_c s_c δ_c and Rademacher s,
    E[s_c δ_cᵀ(Hv)] = δ_cᵀHδ_c, with variance Σ_{k≠c} (δ_cᵀHδ_k)² / P.

    Returns:
        (scores, stderr): stderr is None for "vmap", else the per-channel
        standard error of the probe estimate (sample std / sqrt(P)).
    """
    if method not in ("auto", "vmap", "probes"):
        raise UsageError(f"method must be 'auto', 'vmap' or 'probes', got {method!r}")
    groups = graph.prunable_groups
    method = _exact_method(groups, method)
    if channels is not None:
        if method != "vmap":
            raise UsageError("channels= needs method='vmap' (the probe estimate covers every channel at once)")
        sizes = {g.id: g.size for g in groups}
        for gid, cs in channels.items():
            if gid not in sizes:
                raise UsageError(f"channels=: {gid!r} is not a prunable group id; see graph.prunable_groups")
            bad = [c for c in cs if not 0 <= int(c) < sizes[gid]]
            if bad:
                raise UsageError(f"channels=: group {gid} has {sizes[gid]} channels, got indices {bad[:5]}")
    first, quad, q_err = group_exact_parts(graph, calibration, loss_fn, method, probes, seed, progress, channels)
    scores = {g.id: first[g.id] + 0.5 * quad[g.id] for g in graph.prunable_groups}
    if q_err is None:
        return scores, None
    return scores, {gid: 0.5 * e for gid, e in q_err.items()}


#: ``method="auto"`` of group-exact: exact vmap up to this many prunable channels, probes above.
VMAP_MAX_CHANNELS = 4096


def _exact_method(groups, method: str) -> str:
    if method != "auto":
        return method
    return "vmap" if sum(g.size for g in groups) <= VMAP_MAX_CHANNELS else "probes"


def group_exact_parts(graph, calibration, loss_fn, method, probes, seed, progress, channels=None):
    """(g_Sδ_S, δ_SᵀH_SSδ_S, standard error of the latter or None) per channel S of every prunable group."""
    model = graph.gm
    groups = graph.prunable_groups
    method = _exact_method(groups, method)
    calibration = _reiterable(calibration)
    named = dict(model.named_parameters())
    names = [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
    maps = channel_maps(graph, set(names))
    theta = {n: named[n].detach() for n in names}
    delta = {n: -t for n, t in theta.items()}
    r = curvature(model, calibration, want=("g",), loss_fn=loss_fn, params=names, progress=False)
    first = {}
    gd = {n: r.g[n] * delta[n].to(torch.float64) for n in names}
    for g in groups:
        s = torch.zeros(g.size, dtype=torch.float64)
        for n, cm in maps[g.id].items():
            s += cm.reduce(gd[n].cpu(), g.size)
        first[g.id] = s
    if method == "vmap":
        return first, _quad_vmap(model, calibration, groups, maps, delta, loss_fn, progress, channels=channels), None
    gen = torch.Generator().manual_seed(seed)
    sums = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    sq = {g.id: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    for _ in range(probes):
        signs = {g.id: (torch.randint(0, 2, (g.size,), generator=gen) * 2 - 1).double() for g in groups}
        v = {n: torch.zeros_like(delta[n]) for n in names}
        for g in groups:
            for n, cm in maps[g.id].items():
                v[n] = v[n] + cm.spread(signs[g.id]).to(delta[n]) * delta[n]
        hv = curvature(model, calibration, want=("H",), direction=v, loss_fn=loss_fn, params=names,
                       progress=progress).H
        for g in groups:
            est = torch.zeros(g.size, dtype=torch.float64)
            for n, cm in maps[g.id].items():
                est += cm.reduce((delta[n].to(torch.float64) * hv[n]).cpu(), g.size)
            est = est * signs[g.id]
            sums[g.id] += est
            sq[g.id] += est**2
    quad, err = {}, {}
    for g in groups:
        mean = sums[g.id] / probes
        var = (sq[g.id] / probes - mean**2).clamp_min(0) * probes / max(probes - 1, 1)
        quad[g.id] = mean
        err[g.id] = (var / probes).sqrt()
    return first, quad, err


def _quad_vmap(model, calibration, groups, maps, delta, loss_fn, progress, chunk: int = 8, channels=None):
    """δ_cᵀ H δ_c for every channel (or those in ``channels``; the rest NaN), by vmapped forward-over-reverse
    HVPs over the touched params."""
    loss_fn = loss_fn or default_loss
    sizes = {g.id: g.size for g in groups}
    if channels is not None:
        groups = [g for g in groups if len(channels.get(g.id, ()))]
    which = {g.id: (torch.arange(g.size) if channels is None else
                    torch.tensor(sorted(set(int(c) for c in channels[g.id])), dtype=torch.long)) for g in groups}
    device = next(iter(delta.values())).device

    def step(batch: Batch, sums: Sums) -> None:
        for g in groups:
            q = _quad_vmap_group(model, batch, maps[g.id], delta, loss_fn, which[g.id].to(device), chunk)
            if not torch.isfinite(q).all():
                raise CalibrationError(f"batch {batch.index}: non-finite Hessian product in group {g.id}")
            part = torch.zeros(g.size, dtype=torch.float64)
            part[which[g.id]] = batch.size * q.detach().cpu().to(torch.float64)
            sums.add(g.id, part)

    sums = Sums()
    for gid, size in sizes.items():
        sums.zeros(gid, size)
    with scoring_mode(model), composite_norms():
        reduce(calibration, step, device=device, sums=sums, size=size_of_targets, progress=progress,
               desc="group-exact (vmap)")
    out = sums.mean()
    if channels is not None:
        for gid, v in out.items():
            chosen = set(int(c) for c in channels.get(gid, ()))
            v[[c for c in range(sizes[gid]) if c not in chosen]] = math.nan
    return out


def _quad_vmap_group(model, batch: Batch, cmaps, delta, loss_fn, which: torch.Tensor, chunk: int) -> torch.Tensor:
    """δ_cᵀ H_batch δ_c of one group's channels ``which`` on one batch (the batch-mean loss's Hessian)."""
    inputs, device = batch.inputs, which.device
    t_leaves, t_spec = pytree.tree_flatten(batch.targets)
    t_float = [i for i, t in enumerate(t_leaves) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    t0 = tuple(t_leaves[i] for i in t_float)
    t_zero = tuple(torch.zeros_like(t) for t in t0)

    def rebuild_targets(tensors):
        leaves = list(t_leaves)
        for i, t in zip(t_float, tensors):
            leaves[i] = t
        return pytree.tree_unflatten(leaves, t_spec)

    cm = {k: v.to(device) for k, v in cmaps.items()}
    touched = list(cm)
    p0 = {k: delta[k].neg() for k in touched}  # θ

    def L(p, target_tensors):
        return loss_fn(stateless.call(model, p, inputs), rebuild_targets(target_tensors))

    def hvp_c(c):
        v = {k: torch.where(cm[k].mask(c), delta[k], torch.zeros_like(delta[k])) for k in touched}
        # the targets get explicit zero tangents: left out, the losses' backward formulas see a
        # ZeroTensor tangent, which some update in place (mse_loss's double backward divides it by
        # the element count: "ZeroTensors are immutable")
        hv = jvp(grad(L), (p0, t0), (v, t_zero))[1]
        return sum((v[k].to(torch.float64) * hv[k].to(torch.float64)).sum() for k in touched)

    # torch.func.grad ignores an outer no_grad; the ordinary tape would otherwise record every
    # chunk through the model's own (requires_grad) untouched parameters and keep all their
    # activations alive until the group finishes.
    with torch.no_grad():
        return vmap(hvp_c, chunk_size=chunk)(which)
