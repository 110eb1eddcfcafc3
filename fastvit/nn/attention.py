"""Multi-head self-attention with timm's parameter names (``qkv``, ``proj``)."""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit._torchscript import not_scriptable
from fastvit.nn.mlp import LayerNorm, Mlp


class Attention(nn.Module):
    """Multi-head self-attention. x: (B, N, dim) -> (B, N, dim).

    ``head_dim`` defaults to dim // num_heads (set it for vit-pytorch's ``dim_head``); ``qk_scale``
    defaults to head_dim ** -0.5. ``mask`` is passed to :func:`fastvit.ops.attention` (broadcast to
    (B, heads, N, N); True = attend).
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)
    _fv_attention_layer = True  # a softmax self-attention layer calling fastvit's attention op (fastvit.viz)

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


class AttentionPoolLatent(nn.Module):
    """timm's attention-pool head (``global_pool='map'``, SigLIP): a learned latent query attends to all
    tokens, then a LayerNorm + MLP residual. x: (B, N, dim) -> (B, dim) (``pool='token'``) or
    (B, latent_len, dim) (``pool=''``).

    Keys as timm's ``AttentionPoolLatent``: ``latent``, ``q``, ``kv``, ``proj``, ``norm``, ``mlp.fc1``,
    ``mlp.fc2``. The attention is :func:`fastvit.ops.attention` (latent_len queries against N keys) and
    the MLP half one :func:`fastvit.ops.layernorm_mlp` call with the residual fused.
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        latent_len: int = 1,
        pool: str = "token",
        eps: float = 1e-6,
        activation: str = "gelu",
        drop: float = 0.0,
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if pool not in ("token", "avg", ""):
            raise ValueError(f"pool must be 'token', 'avg' or '', got {pool!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent_len = latent_len
        self.pool = pool
        self.latent = nn.Parameter(torch.zeros(1, latent_len, dim))
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.norm = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), activation=activation)
        nn.init.trunc_normal_(self.latent, std=dim**-0.5, a=-2 * dim**-0.5, b=2 * dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check.last_dim(x, self.kv.in_features, "kv.weight")
        B, N, C = x.shape
        H, D, L = self.num_heads, self.head_dim, self.latent_len
        q = self.q(self.latent).reshape(1, L, H, D).transpose(1, 2).expand(B, -1, -1, -1)  # one query set for all
        k, v = self.kv(x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        o = ops.attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = self.proj_drop(self.proj(o))
        n, fc1, fc2 = self.norm, self.mlp.fc1, self.mlp.fc2
        x = ops.layernorm_mlp(x, n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, n.eps, residual=x,
                              activation=self.mlp.activation)
        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x
