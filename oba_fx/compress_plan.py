"""The plan of a compress run: its options checked once (:class:`CompressConfig`), the goal of every step
(:func:`step_goals`), and what each step reports (:class:`StepReport`).

``oba_fx.compress`` builds a ``CompressConfig`` from its keywords, so a bad option fails before any work, with
a message that names it and the fix. A ``StepReport`` is typed while a step fills it and becomes the JSON-able
dict of ``report["step_reports"]`` at the end.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from .passes.compensate import DEFAULT_DAMPING
from .passes.errors import UsageError

from .joint import JOINT_ROUNDS
from .scoring import CRITERIA, criteria
from .widths import resolve_round_to

__all__ = ["SELECTIONS", "COMPRESS_CRITERIA", "compress_criteria", "DEFAULT_CRITERION", "DEFAULT_NORMALIZE", "CompressConfig",
           "step_goals", "StepReport"]

#: Criteria that select the removal set as a whole (``oba_fx.joint``) rather than rank channels one by one.
SELECTIONS = ("oba-joint",)
#: The built-in names ``compress(criterion=...)`` accepts (criteria registered later with
#: ``oba_fx.register_criterion`` are accepted too).
COMPRESS_CRITERIA = CRITERIA + SELECTIONS



def compress_criteria() -> tuple[str, ...]:
    """Every name ``compress(criterion=...)`` accepts now: the registered criteria, then ``SELECTIONS``."""
    return criteria() + SELECTIONS


#: The defaults of ``compress`` and the CLI, chosen from benchmarks/results/accuracy.json by the rule in
#: ``benchmarks/report.py:recommend`` (tests/test_benchmarks.py checks they agree with the recorded data).
DEFAULT_CRITERION = "magnitude"
DEFAULT_NORMALIZE = "none"


@dataclass
class CompressConfig:
    """Every option of ``oba_fx.compress`` (see its docstring), checked when built.

    ``measure`` ("flops", "params" or "latency") and ``target`` are derived: target_latency, then
    target_params, take precedence over target_flops (which has a default). ``round_multiple`` is
    ``round_to`` resolved for ``backend``.
    """

    target_flops: float | None = 0.5
    target_params: float | None = None
    target_latency: float | None = None
    criterion: str | Callable = DEFAULT_CRITERION
    loss_fn: Callable | None = None
    steps: int = 1
    scope: str = "global"
    max_layer_ratio: float = 0.9
    round_to: int | str | None = "auto"
    backend: str = "onnxruntime"
    latency_batch: int = 1
    ignore: tuple = ()
    finetune: Callable | None = None
    leaf_modules: Iterable = ()
    batches_per_step: int | None = None
    normalize: str = DEFAULT_NORMALIZE
    signed: bool = False
    schedule: str = "geometric"
    probes: int = 16
    seed: int = 0
    progress: bool = True
    micro_batch: int | None = None
    checkpoint: bool | int = False
    reestimate_bn: Any = True
    compensate: bool = True
    damping: float = DEFAULT_DAMPING
    joint_rounds: int = JOINT_ROUNDS
    measure: str = field(init=False)
    target: float = field(init=False)
    round_multiple: int = field(init=False)

    def __post_init__(self) -> None:
        self.measure, self.target = self._target()
        self._check_selection()
        self.round_multiple = resolve_round_to(self.round_to, self.backend)
        self._check_latency_and_schedule()
        self._check_post_rewrite()
        self.ignore = tuple(self.ignore)

    def _target(self) -> tuple[str, float]:
        if self.target_flops is None and self.target_params is None and self.target_latency is None:
            raise UsageError("give target_flops=, target_params= or target_latency=, a fraction of the original "
                             "in (0, 1]")
        if self.target_latency is not None and self.target_params is not None:
            raise UsageError("give one of target_params= and target_latency=, not both")
        measure = ("latency" if self.target_latency is not None else "params" if self.target_params is not None
                   else "flops")
        target = {"latency": self.target_latency, "params": self.target_params, "flops": self.target_flops}[measure]
        if not isinstance(target, (int, float)) or isinstance(target, bool):
            raise UsageError(f"target_{measure} must be a number in (0, 1], got {target!r}")
        target = float(target)
        if not (0 < target <= 1) or math.isnan(target):
            raise UsageError(f"target_{measure}={target} must be a fraction of the original in (0, 1], e.g. 0.5")
        return measure, target

    def _check_selection(self) -> None:
        criterion, names = self.criterion, compress_criteria()  # registered criteria count
        if not callable(criterion) and criterion not in names:
            raise UsageError(f"unknown criterion '{criterion}'; choose from {', '.join(names)}, or pass "
                             "a callable criterion(graph, batches) -> {group id: per-channel predicted loss change}")
        if criterion in SELECTIONS and self.scope != "global":
            raise UsageError(f"criterion '{criterion}' selects the removal set over all groups at once; use "
                             "scope='global' (or a per-channel criterion with scope='local')")
        jr = self.joint_rounds
        if not isinstance(jr, int) or isinstance(jr, bool) or jr < 0:
            raise UsageError(f"joint_rounds must be an int >= 0, got {jr!r}")
        if self.scope not in ("global", "local"):
            raise UsageError(f"scope must be 'global' or 'local', got {self.scope!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise UsageError(f"steps must be a positive int, got {self.steps!r}")
        if not (0 < self.max_layer_ratio <= 1):
            raise UsageError(f"max_layer_ratio must be in (0, 1], got {self.max_layer_ratio}")

    def _check_latency_and_schedule(self) -> None:
        if self.measure == "latency":
            if self.criterion == "oba-joint":
                raise UsageError("target_latency does not support criterion 'oba-joint' yet (its swaps keep a FLOPs "
                                 "budget); use target_flops=, or another criterion")
            if self.scope != "global":
                raise UsageError("target_latency ranks channels by importance per millisecond over all groups; use "
                                 "scope='global'")
        if self.schedule not in ("geometric", "linear"):
            raise UsageError(f"schedule must be 'geometric' or 'linear', got {self.schedule!r}")

    def _check_post_rewrite(self) -> None:
        rb = self.reestimate_bn
        if rb is not True and rb is not False:
            if not isinstance(rb, Iterable) or isinstance(rb, (str, bytes)):
                raise UsageError(f"reestimate_bn must be True, False or an iterable of (inputs, targets) batches, "
                                 f"got {type(rb).__name__}")
            if iter(rb) is rb:
                self.reestimate_bn = list(rb)
        if not isinstance(self.compensate, bool):
            raise UsageError(f"compensate must be True or False, got {self.compensate!r}")
        if not (isinstance(self.damping, (int, float)) and self.damping >= 0):
            raise UsageError(f"damping must be a number >= 0, got {self.damping!r}")

    @property
    def criterion_name(self) -> str:
        c = self.criterion
        return c if isinstance(c, str) else getattr(c, "__name__", "custom")

    def step_seed(self, step: int) -> int:
        return self.seed + step


def step_goals(target: float, steps: int, schedule: str, base: float) -> list[float]:
    """The goal (in the measure's units) after each step: ``target^(s/S)`` of ``base`` (geometric) or
    ``1 - (1 - target) s / S`` (linear), never past the final ``target * base``, which the last step meets."""
    final_goal = target * base
    goals = []
    for step in range(1, steps + 1):
        frac = target ** (step / steps) if schedule == "geometric" else 1 - (1 - target) * step / steps
        goals.append(final_goal if step == steps else max(frac * base, final_goal))
    return goals


@dataclass
class StepReport:
    """What one compress step did. ``to_dict()`` gives ``report["step_reports"][i]``.

    A step that removes nothing (already at its goal, or a latency selection that kept everything) has
    ``note`` set and reports only the fields before it.
    """

    step: int
    goal: float
    before: float
    after: float | None = None
    removed: dict = field(default_factory=dict)
    removed_channels: dict = field(default_factory=dict)
    channels_removed: int = 0
    note: str | None = None
    latency: dict | None = None
    goal_fraction: float | None = None
    predicted_delta_loss: float | None = None
    measured_delta_loss: float | None = None
    measured_delta_loss_rewrite: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    bisection_evaluations: int = 0
    out_of_order_channels: dict = field(default_factory=dict)
    post_rewrite: dict = field(default_factory=dict)
    joint: dict | None = None
    rounding_relaxed: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    loss_after_finetune: float | None = None
    flops_after: int | None = None
    params_after: int | None = None

    def to_dict(self) -> dict:
        if self.note is not None:
            out = {"step": self.step, "goal": self.goal, "before": self.before, "after": self.after,
                   "removed": self.removed, "removed_channels": self.removed_channels,
                   "channels_removed": self.channels_removed, "note": self.note}
            return {**out, **({"latency": self.latency} if self.latency else {})}
        out = {
            "step": self.step, "goal": self.goal, "goal_fraction": self.goal_fraction, "before": self.before,
            "after": self.after, "channels_removed": self.channels_removed, "removed": self.removed,
            "removed_channels": self.removed_channels, "predicted_delta_loss": self.predicted_delta_loss,
            "measured_delta_loss": self.measured_delta_loss,
            # the prediction is for the plain removal: compare it with this one
            "measured_delta_loss_rewrite": self.measured_delta_loss_rewrite,
            "loss_before": self.loss_before, "loss_after": self.loss_after,
            "bisection_evaluations": self.bisection_evaluations,
            # channels taken out of rank order to land on the goal (see oba_fx.selection.fill_to_goal)
            "out_of_order_channels": self.out_of_order_channels,
            "post_rewrite": self.post_rewrite,
            **({"joint": self.joint} if self.joint is not None else {}),
            **({"latency": self.latency} if self.latency is not None else {}),
            **({"rounding_relaxed": self.rounding_relaxed} if self.rounding_relaxed else {}),
            "seconds": self.seconds,
        }
        if self.loss_after_finetune is not None:
            out["loss_after_finetune"] = self.loss_after_finetune
        out["flops_after"], out["params_after"] = self.flops_after, self.params_after
        return out
