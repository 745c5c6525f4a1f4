"""A small Vision Transformer for 28x28 / 32x32 images.

Pre-norm encoder blocks (``x + attn(norm1(x))``, ``x + mlp(norm2(x))``), a
learned class token and positional embedding, a final LayerNorm and a linear
head on the class token.  Module names follow timm (``patch_embed.proj``,
``blocks.i.attn.qkv``/``proj``, ``blocks.i.mlp.fc1``/``fc2``, ``norm``,
``head``).

Attention comes in two flavours:

* ``"manual"``: timm-style hand-written attention.  The reshape sizes for the
  head split use the python ints ``self.heads`` / ``self.head_dim`` so they are
  literals in a ``torch.fx`` graph (only batch and token counts are read from
  the tensor), which lets a pruning compiler rewrite them.
* ``"torch"``: ``nn.MultiheadAttention(dim, heads, batch_first=True)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["PatchEmbed", "Attention", "TorchAttention", "Mlp", "Block", "VisionTransformer", "vit_small"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens via a strided convolution.

    Args:
        in_channels: Input image channels.
        dim: Token width.
        patch_size: Patch side length (kernel size and stride).
    """

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed patches.

        Args:
            x: Images of shape (B, C, H, W).

        Returns:
            Tokens of shape (B, (H / p) * (W / p), dim).
        """
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm-style multi-head self-attention written out by hand.

    Args:
        dim: Token width.
        heads: Number of heads; must divide ``dim``.
        qkv_bias: Whether the fused qkv projection has a bias.
    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the tokens.

        Args:
            x: Tokens of shape (B, N, dim).

        Returns:
            Tokens of shape (B, N, dim).
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
        return self.proj(x)


class TorchAttention(nn.Module):
    """Self-attention through ``nn.MultiheadAttention`` (batch first).

    Args:
        dim: Token width.
        heads: Number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Self-attention over the tokens.

        Args:
            x: Tokens of shape (B, N, dim).

        Returns:
            Tokens of shape (B, N, dim).
        """
        return self.mha(x, x, x, need_weights=False)[0]


class Mlp(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: Input/output width.
        hidden: Hidden width.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP.

        Args:
            x: Tensor of shape (..., dim).

        Returns:
            Tensor of shape (..., dim).
        """
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer encoder block.

    Args:
        dim: Token width.
        heads: Number of attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        attention: ``"manual"`` (:class:`Attention`) or ``"torch"``
            (:class:`TorchAttention`).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, attention: str = "manual"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attention == "manual":
            self.attn: nn.Module = Attention(dim, heads)
        elif attention == "torch":
            self.attn = TorchAttention(dim, heads)
        else:
            raise ValueError(f"attention must be 'manual' or 'torch', got {attention!r}")
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Args:
            x: Tokens of shape (B, N, dim).

        Returns:
            Tokens of shape (B, N, dim).
        """
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier with a class token.

    Args:
        img_size: Input height/width; must be divisible by ``patch_size``.
        in_channels: Input image channels.
        num_classes: Number of output logits.
        patch_size: Patch side length.
        dim: Token width.
        depth: Number of encoder blocks.
        heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        attention: ``"manual"`` or ``"torch"``; see :class:`Block`.
    """

    def __init__(self, img_size: int = 32, in_channels: int = 3, num_classes: int = 10, patch_size: int = 4,
                 dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0,
                 attention: str = "manual"):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, attention) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute logits.

        Args:
            x: Images of shape (B, in_channels, img_size, img_size).

        Returns:
            Logits of shape (B, num_classes).
        """
        x = self.patch_embed(x)
        B = x.shape[0]
        cls = self.cls_token.expand(B, -1, -1)
        x = torch.cat((cls, x), dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_small(img_size: int = 32, in_channels: int = 3, num_classes: int = 10, patch_size: int = 4,
              dim: int = 192, depth: int = 6, heads: int = 3, mlp_ratio: float = 4.0,
              attention: str = "manual") -> VisionTransformer:
    """Small ViT (patch 4, dim 192, depth 6, 3 heads) for CIFAR / Fashion-MNIST.

    Args:
        img_size: Input height/width (use 28 for Fashion-MNIST, 32 for CIFAR).
        in_channels: Input image channels.
        num_classes: Number of output logits.
        patch_size: Patch side length.
        dim: Token width.
        depth: Number of encoder blocks.
        heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        attention: ``"manual"`` (hand-written, timm-style) or ``"torch"``
            (``nn.MultiheadAttention``).

    Returns:
        A freshly initialised :class:`VisionTransformer`.
    """
    return VisionTransformer(img_size, in_channels, num_classes, patch_size, dim, depth, heads, mlp_ratio,
                             attention)
