"""Multi-head attention whose inner widths may differ from its embed dim.

``nn.MultiheadAttention`` ties the q/k/v width to ``embed_dim`` and splits it
into ``num_heads`` equal heads.  After pruning heads, head dims or the residual
width those no longer agree, so the rewrite pass swaps in this module.  It keeps
``nn.MultiheadAttention``'s parameter names (``in_proj_weight``,
``in_proj_bias``, ``out_proj``) and call signature, and the original softmax
scale (1/sqrt of the *original* head dim), so an unpruned copy computes the
same function.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SlimMultiheadAttention(nn.Module):
    """Attention with ``num_heads`` heads of widths ``qk_head_dim`` and ``v_head_dim``.

    Shapes (batch_first): query (B, L, E), key/value (B, S, E) -> (B, L, E_out).
    ``in_proj_weight`` is (H*Dqk + H*Dqk + H*Dv, E): q rows, then k, then v.
    """

    def __init__(self, embed_dim, out_dim, num_heads, qk_head_dim, v_head_dim, scale, batch_first, dropout, bias):
        super().__init__()
        self.embed_dim, self.out_dim = embed_dim, out_dim
        self.num_heads, self.qk_head_dim, self.v_head_dim = num_heads, qk_head_dim, v_head_dim
        self.scale, self.batch_first, self.dropout = scale, batch_first, dropout
        rows = num_heads * (2 * qk_head_dim + v_head_dim)
        self.in_proj_weight = nn.Parameter(torch.empty(rows, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(rows)) if bias else None
        self.out_proj = nn.Linear(num_heads * v_head_dim, out_dim, bias=True)

    @classmethod
    def from_tensors(cls, m: nn.MultiheadAttention, in_w, in_b, out_w, out_b, heads, dqk, dv):
        slim = cls(in_w.shape[1], out_w.shape[0], heads, dqk, dv, (m.head_dim) ** -0.5, m.batch_first, m.dropout,
                   in_b is not None)
        slim.out_proj = nn.Linear(out_w.shape[1], out_w.shape[0], bias=out_b is not None)
        with torch.no_grad():
            slim.in_proj_weight = nn.Parameter(in_w.detach().clone(), requires_grad=m.in_proj_weight.requires_grad)
            if in_b is not None:
                slim.in_proj_bias = nn.Parameter(in_b.detach().clone(), requires_grad=m.in_proj_bias.requires_grad)
            slim.out_proj.weight = nn.Parameter(out_w.detach().clone())
            if out_b is not None:
                slim.out_proj.bias = nn.Parameter(out_b.detach().clone())
        slim.train(m.training)
        return slim

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        H, dqk, dv = self.num_heads, self.qk_head_dim, self.v_head_dim
        w, b = self.in_proj_weight, self.in_proj_bias
        sizes = [H * dqk, H * dqk, H * dv]
        wq, wk, wv = w.split(sizes)
        bq, bk, bv = b.split(sizes) if b is not None else (None, None, None)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        q = F.linear(query, wq, bq).reshape(B, L, H, dqk).transpose(1, 2)
        k = F.linear(key, wk, bk).reshape(B, S, H, dqk).transpose(1, 2)
        v = F.linear(value, wv, bv).reshape(B, S, H, dv).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if attn_mask is not None:
            mask = attn_mask.reshape(B, H, L, S) if attn_mask.dim() == 3 else attn_mask
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        if is_causal and attn_mask is None:
            causal = torch.ones(L, S, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(causal, float("-inf"))
        if key_padding_mask is not None:
            kpm = key_padding_mask.reshape(B, 1, 1, S)
            scores = scores.masked_fill(kpm, float("-inf")) if kpm.dtype == torch.bool else scores + kpm
        attn = scores.softmax(dim=-1)
        attn_drop = F.dropout(attn, p=self.dropout, training=self.training) if self.dropout > 0 else attn
        out = (attn_drop @ v).transpose(1, 2).reshape(B, L, H * dv)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.mean(dim=1) if average_attn_weights else attn
            if not batched:
                weights = weights.squeeze(0)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, out_dim={self.out_dim}, num_heads={self.num_heads}, "
                f"qk_head_dim={self.qk_head_dim}, v_head_dim={self.v_head_dim}, batch_first={self.batch_first}")
