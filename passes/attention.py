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

import math

import torch
import torch.fx
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
    def from_tensors(cls, m: nn.Module, in_w, in_b, out_w, out_b, heads, dqk, dv):
        """A slim copy of ``m`` (nn.MultiheadAttention or SlimMultiheadAttention) with the given tensors.

        The softmax scale stays the original's, and so do ``requires_grad`` and the mode.
        """
        scale = m.scale if isinstance(m, SlimMultiheadAttention) else m.head_dim ** -0.5
        slim = cls(in_w.shape[1], out_w.shape[0], heads, dqk, dv, scale, m.batch_first, m.dropout,
                   in_b is not None)
        slim.out_proj = nn.Linear(out_w.shape[1], out_w.shape[0], bias=out_b is not None)
        with torch.no_grad():
            slim.in_proj_weight = nn.Parameter(in_w.detach().clone(), requires_grad=m.in_proj_weight.requires_grad)
            if in_b is not None:
                slim.in_proj_bias = nn.Parameter(in_b.detach().clone(), requires_grad=m.in_proj_bias.requires_grad)
            slim.out_proj.weight = nn.Parameter(out_w.detach().clone(), requires_grad=m.out_proj.weight.requires_grad)
            if out_b is not None:
                slim.out_proj.bias = nn.Parameter(out_b.detach().clone(), requires_grad=m.out_proj.bias.requires_grad)
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


def slim_shifted_window_attention(input, qkv_weight, proj_weight, relative_position_bias, window_size, num_heads,
                                  shift_size, attention_dropout=0.0, dropout=0.0, qkv_bias=None, proj_bias=None,
                                  logit_scale=None, training=True, *, qk_head_dim, v_head_dim, scale):
    """torchvision's ``shifted_window_attention`` with free head widths (Swin / Swin V2).

    torchvision derives the head width and the softmax scale from the input
    width (``C // num_heads``) and writes the attention output back at width
    C, which ties heads to the residual stream.  Here q/k heads are
    ``qk_head_dim`` wide, v heads ``v_head_dim`` wide (``qkv_weight`` rows: q,
    then k, then v), the output width is ``proj_weight.shape[0]``, and
    ``scale`` is the original 1/sqrt(head dim) (unused with V2's cosine
    attention).  With the original widths it computes exactly what
    torchvision's function computes.

    Shapes: input (B, H, W, C) -> (B, H, W, proj_weight.shape[0]).
    """
    B, H, W, C = input.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(input, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    nq = num_heads * qk_head_dim
    if logit_scale is not None and qkv_bias is not None:
        qkv_bias = qkv_bias.clone()
        qkv_bias[nq : 2 * nq].zero_()
    qkv = F.linear(x, qkv_weight, qkv_bias)
    q, k, v = qkv.split([nq, nq, num_heads * v_head_dim], dim=-1)
    n, L = x.size(0), x.size(1)
    q = q.reshape(n, L, num_heads, qk_head_dim).transpose(1, 2)
    k = k.reshape(n, L, num_heads, qk_head_dim).transpose(1, 2)
    v = v.reshape(n, L, num_heads, v_head_dim).transpose(1, 2)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * scale).matmul(k.transpose(-2, -1))
    attn = attn + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for h in h_slices:
            for w in w_slices:
                attn_mask[h[0] : h[1], w[0] : w[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(n // num_windows, num_windows, num_heads, L, L)
        attn = attn + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, num_heads, L, L)
    attn = F.softmax(attn, dim=-1)
    attn = F.dropout(attn, p=attention_dropout, training=training)
    x = attn.matmul(v).transpose(1, 2).reshape(n, L, num_heads * v_head_dim)
    x = F.linear(x, proj_weight, proj_bias)
    x = F.dropout(x, p=dropout, training=training)
    C_out = x.shape[-1]
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C_out)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C_out)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


# a leaf in every trace, like torchvision's own function: re-tracing a slimmed Swin keeps it one call
torch.fx.wrap("slim_shifted_window_attention")
