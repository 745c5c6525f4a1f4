"""FLOPs and parameter counts, via ``torch.utils.flop_counter``."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from passes.trace import as_args

__all__ = ["count"]


def count(model: torch.nn.Module, example_inputs: Any) -> tuple[int, int]:
    """FLOPs of one forward pass on ``example_inputs`` and the number of parameters.

    FLOPs are ``torch.utils.flop_counter.FlopCounterMode`` totals: matmul,
    convolution and attention kernels, a multiply-add counted as 2 FLOPs
    (elementwise ops are not counted). The model runs in eval mode under
    ``torch.no_grad``; its mode is restored. Shared parameters count once.

    Returns:
        (flops, params)
    """
    args = as_args(example_inputs)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*args)
    finally:
        model.train(was)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return int(counter.get_total_flops()), int(params)
