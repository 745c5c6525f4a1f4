"""Compiler passes of oba_fx.

trace          torch.fx tracing, shape propagation, networkx IR
modes          per-module training flags kept and restored (never model.train(was))
dependency     coupled-group solver (with coupling_rules: one rule per op)
rewrite        emits the slimmed graph
attention      SlimMultiheadAttention, the rewrite's replacement for nn.MultiheadAttention
"""
