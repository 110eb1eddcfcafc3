"""LayerNorm and the LayerNorm + Linear + GELU + Linear MLP."""

from __future__ import annotations

import torch
from torch import nn

from fastvit import ops, reference
from fastvit.ops import _checks as check
from fastvit._torchscript import not_scriptable


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim, computed by :func:`fastvit.ops.layer_norm` (same state_dict)."""

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(self, normalized_shape: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dim, got {self.normalized_shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)


class Mlp(nn.Module):
    """timm's ``Mlp`` parameters (``fc1``, ``fc2``) and meaning: fc2(drop(act(fc1(x)))), then drop, with
    ``activation`` one of :func:`fastvit.ops.layernorm_mlp`'s ("gelu", "gelu_tanh", "quick_gelu").

    Blocks call :func:`fastvit.ops.layernorm_mlp` with these parameters and the preceding
    LayerNorm's, so the norm, both GEMMs and the residual run as one op; ``forward`` alone is
    the unfused MLP for callers without a LayerNorm in front.
    """

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(
        self, in_features: int, hidden_features: int, out_features: int | None = None, bias: bool = True,
        drop: float = 0.0, activation: str = "gelu",
    ):
        super().__init__()
        if activation not in reference.ACTIVATIONS:
            raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(reference.apply_activation(self.fc1(x), self.activation))))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class LayerNormMLP(nn.Module):
    """LayerNorm then MLP as one op. x: (..., in_features) -> (..., out_features), plus ``residual``."""

    __prepare_scriptable__ = not_scriptable  # TorchScript: one clear error (fastvit/_torchscript.py)

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int | None = None,
        bias: bool = True,
        drop: float = 0.0,
        eps: float = 1e-6,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=eps)
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x = check.last_dim(x, self.fc1.in_features, "norm.weight")
        return ops.layernorm_mlp(
            x, self.norm.weight, self.norm.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
            eps=self.norm.eps, residual=residual, dropout_p=self.drop.p if self.training else 0.0,
        )
