"""Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit._torchscript import not_scriptable


class Attention(nn.Module):
    """Multi-head self-attention. x: (B, N, dim) -> (B, N, dim).

    ``head_dim`` defaults to dim // num_heads (set it for vit-pytorch's ``dim_head``); ``qk_scale``
    defaults to head_dim ** -0.5. ``mask`` is passed to :func:`fastvit.ops.attention` (broadcast to
    (B, heads, N, N); True = attend).
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        head_dim: int | None = None,
        qk_scale: float | None = None,
        proj_bias: bool = True,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}), or give head_dim")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = qk_scale if qk_scale is not None else head_dim**-0.5
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.qk_norm = qk_norm
        if qk_norm:  # timm's qk_norm: a LayerNorm over each head's q and k (keys attn.q_norm, attn.k_norm)
            from fastvit.nn.mlp import LayerNorm

            self.q_norm = LayerNorm(head_dim, eps=norm_eps)
            self.k_norm = LayerNorm(head_dim, eps=norm_eps)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = self.attn_drop.p if self.training else 0.0
        x = check.last_dim(x, self.qkv.in_features, "qkv.weight")
        if not self.qk_norm:
            o = ops.attention_qkvpacked(self.qkv(x), self.num_heads, mask=mask, scale=self.scale, dropout_p=p)
            return self.proj_drop(self.proj(o))
        B, N, _ = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = ops.attention(self.q_norm(q), self.k_norm(k), v, mask=mask, scale=self.scale, dropout_p=p)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, H * D)))
