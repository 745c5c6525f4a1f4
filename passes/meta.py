"""The ``node.meta`` keys oba_fx writes on traced fx nodes: one table, one place.

Passes talk to later passes through the traced graph's nodes.  Tracing records
each node's value (``meta["spec"]``, a ``TensorSpec`` or python value) and
marks python branches; the coupling rules leave *rewrite hints* on nodes whose
literal arguments spell a size that pruning makes stale; the rewrite reads
them.  ``copy.deepcopy`` of a GraphModule copies every node's meta (shallowly),
so the rewrite reads its hints off its own deep copy of the traced module.

The coupling analysis clears every key in ``REWRITE_HINTS`` before its rules
run, so a re-analysis of the same traced graph never sees stale hints.
"""
from __future__ import annotations

__all__ = ["SPEC", "BRANCH", "REPLACE", "RESHAPE", "SPLIT", "SDPA_SCALE", "LAYER_NORM_SHAPE", "CONV_GROUPS",
           "WINDOW_ATTENTION", "META_KEYS", "REWRITE_HINTS"]

SPEC = "spec"
BRANCH = "oba_fx.branch"
REPLACE = "oba_fx.replace"
RESHAPE = "oba_fx.reshape"
SPLIT = "oba_fx.split"
SDPA_SCALE = "oba_fx.sdpa_scale"
LAYER_NORM_SHAPE = "oba_fx.layer_norm_shape"
CONV_GROUPS = "oba_fx.conv_groups"
WINDOW_ATTENTION = "oba_fx.window_attention"

#: every key, with who writes it and what its value means
META_KEYS: dict[str, str] = {
    SPEC: "trace: the node's recorded value (TensorSpec, a tuple of them, or a python value)",
    BRANCH: "trace: True where python branched on this value while tracing (its sizes are frozen)",
    REPLACE: "coupling -> rewrite: the module call is swapped for a slim one; value 'mha' (SlimMultiheadAttention)",
    RESHAPE: "coupling -> rewrite: True; the size arguments (view/reshape/expand/unflatten) follow the new shape",
    SPLIT: "coupling -> rewrite: the split dim (int); the split sections follow the new sizes",
    SDPA_SCALE: "coupling -> rewrite: the implicit SDPA scale (float), made explicit when the head dim shrinks",
    LAYER_NORM_SHAPE: "coupling -> rewrite: F.layer_norm's number of normalized dims (int); the shape is rewritten",
    CONV_GROUPS: "coupling -> rewrite: the virtual slot name (str) whose new size is F.conv*'s groups argument",
    WINDOW_ATTENTION: "coupling -> rewrite: {'scale': float}; Swin attention becomes the explicit-width function",
}

#: the hints the coupling rules leave for the rewrite
REWRITE_HINTS = (REPLACE, RESHAPE, SPLIT, SDPA_SCALE, LAYER_NORM_SHAPE, CONV_GROUPS, WINDOW_ATTENTION)
