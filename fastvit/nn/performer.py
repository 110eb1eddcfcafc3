"""T2T-ViT's Token_performer, with the official parameter names."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvit import ops
from fastvit.ops import _checks as check
from fastvit.nn.embed import SoftSplit
from fastvit.nn.mlp import LayerNorm
from fastvit._torchscript import not_scriptable


class TokenPerformer(nn.Module):
    """Performer token transformer of T2T-ViT. x: (B, T, dim) -> (B, T, in_dim).

    ``x = performer_attention(norm1(x))`` (v skip inside), then ``x + mlp(norm2(x))``. Keys match
    the official ``Token_performer`` (``kqv``, ``proj``, ``norm1``, ``norm2``, ``mlp.0``, ``mlp.2``,
    ``w``); ``w`` is a parameter with requires_grad=False, as official.
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(self, dim: int, in_dim: int, head_cnt: int = 1, kernel_ratio: float = 0.5, dp1: float = 0.1, dp2: float = 0.1):
        super().__init__()
        self.emb = in_dim * head_cnt
        self.kqv = nn.Linear(dim, 3 * self.emb)
        self.dp = nn.Dropout(dp1)
        self.proj = nn.Linear(self.emb, self.emb)
        self.head_cnt = head_cnt
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(self.emb)
        self.epsilon = 1e-8
        self.mlp = nn.Sequential(
            nn.Linear(self.emb, self.emb), nn.GELU(), nn.Linear(self.emb, self.emb), nn.Dropout(dp2)
        )
        self.m = int(self.emb * kernel_ratio)
        w = nn.init.orthogonal_(torch.randn(self.m, self.emb)) * math.sqrt(self.m)
        self.w = nn.Parameter(w, requires_grad=False)

    def single_attn(self, x: torch.Tensor) -> torch.Tensor:
        return ops.performer_attention(
            x, self.kqv.weight, self.kqv.bias, self.w, self.proj.weight, self.proj.bias,
            eps=self.epsilon, dropout_p=self.dp.p if self.training else 0.0,
        )

    def forward(self, x: torch.Tensor, split: SoftSplit | None = None) -> torch.Tensor:
        """x: (B, T, dim) tokens; or, with ``split``, the (B, C, H, W) map that ``split`` unfolds into
        them: the soft split and ``norm1`` then run as one op (``soft_split_layer_norm``), which
        never writes the un-normalised tokens."""
        if split is None:
            x = self.norm1(check.last_dim(x, self.norm1.normalized_shape[0], "norm1.weight"))
        else:
            n = self.norm1
            x = ops.soft_split_layer_norm(x, split.kernel_size, split.stride, split.padding, n.weight, n.bias, n.eps)
        x = self.single_attn(x)
        fc1, fc2, drop = self.mlp[0], self.mlp[2], self.mlp[3]
        args = (self.norm2.weight, self.norm2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.norm2.eps)
        if self.training and drop.p > 0:
            # The official MLP drops only its output, so its dropout cannot use the op's (which
            # also drops the hidden activations): add the residual after it.
            return x + drop(ops.layernorm_mlp(x, *args))
        return ops.layernorm_mlp(x, *args, residual=x)
