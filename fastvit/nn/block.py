"""The pre-norm transformer block, timm's parameter names, with the MLP half as one fused op."""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit.nn.attention import Attention
from fastvit.nn.mlp import LayerNorm, Mlp
from fastvit._torchscript import not_scriptable


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples with probability p, scale the rest by 1 / (1 - p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    """x * gamma (timm's key: ``gamma``)."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)). x: (B, N, dim) -> (B, N, dim).

    Keys as timm's ``Block`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``ls1.gamma``, ``norm2``,
    ``mlp.fc1``, ``mlp.fc2``, ``ls2.gamma``); ``activation`` is the MLP's ("gelu", "gelu_tanh",
    "quick_gelu"). The second half is one :func:`fastvit.ops.layernorm_mlp`
    call with the residual fused, except where layer scale or active drop path sit in between.
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        eps: float = 1e-6,
        head_dim: int | None = None,
        qk_scale: float | None = None,
        mlp_hidden_dim: int | None = None,
        qk_norm: bool = False,
        proj_bias: bool = True,
        activation: str = "gelu",
    ):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, head_dim=head_dim, qk_scale=qk_scale,
                              proj_bias=proj_bias, qk_norm=qk_norm, norm_eps=eps)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_hidden_dim or int(dim * mlp_ratio), bias=proj_bias, drop=proj_drop,
                       activation=activation)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = check.last_dim(x, self.norm1.normalized_shape[0], "norm1.weight")
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), mask)))
        n, fc1, fc2 = self.norm2, self.mlp.fc1, self.mlp.fc2
        args = (n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, n.eps)
        kw = dict(dropout_p=self.mlp.drop.p if self.training else 0.0, activation=self.mlp.activation)
        if isinstance(self.ls2, nn.Identity) and (self.drop_path2.p == 0.0 or not self.training):
            return ops.layernorm_mlp(x, *args, residual=x, **kw)
        return x + self.drop_path2(self.ls2(ops.layernorm_mlp(x, *args, **kw)))
