"""Hardware-friendly widths: the channel multiple each backend runs fastest, and how a group rounds to it.

CPU kernels block channels (onnxruntime's NCHWc convolutions and oneDNN's blocked layouts use 8 channels on
AVX2 and 16 on AVX-512): a width just above a multiple pays for the whole next block, and odd widths can cost
layout conversions. ``ROUND_TO`` holds, per backend, the multiple ``benchmarks/widths.py`` measured to give the
best speed-up per FLOPs reduction on this project's benchmark machine (BENCHMARKS.md, "Hardware-friendly
widths", shows the measurement and the machine). On another CPU, re-run that benchmark and pass
``round_to=`` explicitly.

How a group rounds (``group_multiple``): a group's unit is not always one channel of one tensor. A unit of a
head group is a whole head (64 channels of q, k and v), a unit of a head-dim group is one channel of every
head, a unit of a grouped conv's group is one conv group. The tensor widths are ``kept units x channels per
unit``, so a group rounds its kept units to ``round_to / gcd(round_to, channels per unit)``: heads of 64
channels need no rounding at all. A group narrower than two multiples uses the largest power of two that
still leaves half of it removable (a 16-channel group at ``round_to=16`` keeps 8 or 16), so it stays
prunable; wider groups keep the backend's multiple, since a width off the kernels' channel block costs
layout conversions (onnxruntime inserts a reorder around every convolution whose channels are not a
multiple of its NCHWc block). A group may always keep its original width, whatever its multiple.
"""
from __future__ import annotations

import math
from .passes.errors import UsageError

__all__ = ["ROUND_TO", "BACKENDS", "resolve_round_to", "channels_per_unit", "group_multiple"]

#: channel multiple per backend, chosen by benchmarks/widths.py (see BENCHMARKS.md, "Hardware-friendly widths")
ROUND_TO: dict[str, int] = {"onnxruntime": 16, "pytorch": 16}
BACKENDS = tuple(ROUND_TO)

_WIDTH_ROLES = ("producer", "consumer", "norm", "bias", "head")


def resolve_round_to(round_to, backend: str) -> int | None:
    """The multiple ``compress`` rounds to: ``"auto"`` -> ``ROUND_TO[backend]``; None or 1 -> no rounding."""
    if backend not in ROUND_TO:
        raise UsageError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)} (the runtime the slim "
                         f"model is deployed on; it picks the channel multiple), got {backend!r}")
    if round_to == "auto":
        return ROUND_TO[backend]
    if round_to is None:
        return None
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise UsageError(f"round_to must be 'auto' (the multiple measured for the backend), a positive int, or "
                         f"None (no rounding); got {round_to!r}")
    return None if round_to == 1 else round_to


def channels_per_unit(group) -> int:
    """How many positions of each width-carrying tensor one unit of ``group`` removes (their gcd)."""
    counts = []
    for m in group.members:
        if m.role in _WIDTH_ROLES and m.index.numel():
            n, rem = divmod(m.index.numel(), group.size)
            counts.append(n if rem == 0 else 1)
    return math.gcd(*counts) if counts else 1


def group_multiple(group, round_to: int | None) -> int:
    """The multiple ``group``'s kept unit count is rounded up to (1: any count)."""
    if not round_to or round_to == 1 or group.size < 2:
        return 1
    m = round_to // math.gcd(round_to, channels_per_unit(group))
    if 2 * m > group.size:  # too small for this multiple: the largest power of two that leaves half removable
        m = 1 << max(0, (group.size // 2).bit_length() - 1)
    return max(1, m)
