"""oba_fx: Optimal Brain Apoptosis as a torch.fx compiler pass.

Public API:
    trace(model, example_inputs, leaf_modules=(), ignore=()) -> Graph
    Graph.groups, Graph.prune({group_id: [indices]}) -> torch.nn.Module
    count(model, example_inputs) -> (flops, params)
    parameter_scores(model, calibration, criterion="oba") -> {name: Tensor}
    group_scores(graph, calibration, criterion="oba") -> {group id: Tensor}
    hessian_blocks(graph) -> HessianBlocks
"""
from passes.dependency import Group, Member, UnknownOpWarning
from passes.hessian_blocks import HessianBlocks, check_blocks, hessian_blocks
from passes.rewrite import RewriteError
from passes.trace import TraceFailure

from .compress import CompressResult, compress, evaluate_loss
from .counting import count
from .export import OnnxMismatch, export_onnx, load, save
from .finetune import finetune
from .graph import Graph, trace
from .scoring import CRITERIA, group_exact_scores, group_scores, parameter_scores, rank_scores
from .unstructured import compress_unstructured, make_permanent, sparsity_report

__version__ = "0.1.0"

__all__ = [
    "trace", "Graph", "Group", "Member", "count", "compress", "CompressResult", "evaluate_loss",
    "parameter_scores", "group_scores", "group_exact_scores", "rank_scores", "CRITERIA",
    "hessian_blocks", "HessianBlocks", "check_blocks",
    "finetune", "compress_unstructured", "make_permanent", "sparsity_report",
    "save", "load", "export_onnx", "OnnxMismatch",
    "TraceFailure", "RewriteError", "UnknownOpWarning",
]
