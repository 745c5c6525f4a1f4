"""The compiler passes of oba_fx (imported as ``oba_fx.passes``), in pipeline order.

See docs/architecture.md for the picture, the ``node.meta`` keys and how to extend the passes.

trace            torch.fx tracing, shape propagation, networkx IR; ``Recorder``, ``LeafTracer``
coupling/        the coupling rules, one module per op family, in the ``COUPLING_RULES`` registry
dependency       the coupled-group solver: ``Coupling`` facts -> ``CouplingResult`` (``Group``, ``Group.key``)
hessian_blocks   which network-curvature blocks F_lm are structurally zero (the analysis and its result)
block_rules      the Hessian-block rules (``BLOCK_RULES``) and their typed result ``Flow``
block_views      text / DOT / GraphML / PNG views of a Hessian-block result
calibration      the one calibration reducer: batches, devices, shards, weights, all-reduce, empty data
curvature        g, Hδ, Gδ, Fδ and third-order terms by forward-over-reverse autodiff
neg_theta        the δ = −θ kernels (exact shortcuts of the dual forward) and row/column marginals
exact_ops        ``composite_norms``: a TorchFunctionMode routing norms to twice-differentiable composites
checkpoint       segmented recomputation of the dual forward (activation checkpointing)
stateless        run a module with substituted parameters
distributed      process groups, sharding, float64 all-reduce
rewrite          emits the slimmed graph; ``attention`` (slim attention modules), ``inplace`` (in-place adds)
compensate       refits consumers' kept input weights after a rewrite
norm_stats       BatchNorm statistics re-estimation
modes            per-module training flags kept and restored (never ``model.train(was)``)
registry         ``OpRegistry`` (rules keyed by op) and the typed ``NoRule``
meta             the ``node.meta`` keys passes hand to later passes
fxutil           small helpers on fx nodes and qualified names
errors           ``UsageError``: a caller's mistake, named with its fix
fileio           atomic file writes
"""
