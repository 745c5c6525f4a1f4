"""oba_fx: Optimal Brain Apoptosis as a torch.fx compiler pass.

Public API:
    trace(model, example_inputs, leaf_modules=(), ignore=()) -> Graph
    Graph.groups, Graph.prune({group_id: [indices]}) -> torch.nn.Module
    count(model, example_inputs) -> (flops, params)
    parameter_scores(model, calibration, criterion="oba") -> {name: Tensor}
    group_scores(graph, calibration, criterion="oba") -> {group id: Tensor}
    register_criterion(name)(fn), criteria() -> the criteria by name (built-in and registered)
    hessian_blocks(graph) -> HessianBlocks
    compress(model, example_inputs, calibration, target_flops=0.5) -> CompressResult
    get_dataset("fashion-mnist"), train(...), evaluate(...), measure_latency(...)
"""
from .passes.dependency import Group, Member, UnknownOpWarning
from .passes.compensate import compensate
from .passes.calibration import CalibrationError
from .passes.errors import UsageError
from .passes.norm_stats import reestimate_batchnorm
from .passes.hessian_blocks import HessianBlocks, check_blocks, hessian_blocks
from .passes.rewrite import RewriteError
from .passes.trace import TraceFailure

from .compress import CompressResult, compress, evaluate_loss
from .counting import count
from .data import DATASETS, DatasetNotFound, DataSpec, get_dataset
from .export import OnnxMismatch, export_onnx, load, save
from .finetune import finetune
from .graph import Graph, trace
from .latency import measure_latency, pytorch_guidance
from .compress_plan import COMPRESS_CRITERIA, DEFAULT_CRITERION, DEFAULT_NORMALIZE, CompressConfig, compress_criteria
from .scoring import (CRITERIA, criteria, group_exact_scores, group_scores, parameter_scores, rank_scores,
                      register_criterion, unregister_criterion)
from .train import CheckpointError, evaluate, load_checkpoint, train
from .widths import ROUND_TO
from .unstructured import compress_unstructured, make_permanent, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "trace", "Graph", "Group", "Member", "count", "compress", "CompressResult", "evaluate_loss",
    "DEFAULT_CRITERION", "DEFAULT_NORMALIZE", "COMPRESS_CRITERIA", "compress_criteria", "CompressConfig",
    "parameter_scores", "group_scores", "group_exact_scores", "rank_scores", "CRITERIA", "criteria",
    "register_criterion", "unregister_criterion", "UsageError",
    "hessian_blocks", "HessianBlocks", "check_blocks",
    "finetune", "compress_unstructured", "make_permanent", "sparsity_report",
    "save", "load", "export_onnx", "OnnxMismatch",
    "TraceFailure", "RewriteError", "UnknownOpWarning",
    "get_dataset", "DataSpec", "DATASETS", "DatasetNotFound", "train", "evaluate", "load_checkpoint",
    "CheckpointError", "measure_latency", "pytorch_guidance", "ROUND_TO", "compensate", "reestimate_batchnorm", "CalibrationError",
]
