"""Compiler passes of oba_fx.

trace          torch.fx tracing, shape propagation, networkx IR
dependency     coupled-group solver (with coupling_rules: one rule per op)
rewrite        emits the slimmed graph
attention      SlimMultiheadAttention, the rewrite's replacement for nn.MultiheadAttention
"""
