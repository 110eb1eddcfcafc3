"""Fixed position-embedding tables: 2-D sin-cos (big_vision / vit-pytorch) and 1-D sinusoid (T2T-ViT)."""

from __future__ import annotations

import torch


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """2-D sin-cos table as vit-pytorch's ``posemb_sincos_2d``: (h * w, dim), rows in row-major grid order.

    Columns are ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``w_i = temperature ** -(i / (dim/4 - 1))``.
    """
    if dim % 4 or dim < 8:
        raise ValueError(f"dim must be a multiple of 4 and at least 8 for the 2-D sin-cos position embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(dim // 4) / (dim // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype)


def posemb_sincos_table(h: int, w: int, dim: int, n_prefix: int = 0) -> torch.Tensor:
    """timm's fixed ``pos_embed='sincos'`` layout: (1, n_prefix + h * w, dim), zero rows for the prefix
    tokens, then :func:`posemb_sincos_2d`."""
    table = posemb_sincos_2d(h, w, dim)
    return torch.cat([table.new_zeros(n_prefix, dim), table]).unsqueeze(0)


def get_sinusoid_encoding(n_position: int, d_hid: int) -> torch.Tensor:
    """T2T-ViT's 1-D sinusoid table: (1, n_position, d_hid), float32.

    ``table[0, p, 2i] = sin(p / 10000 ** (2i / d_hid))``, ``table[0, p, 2i + 1] = cos(...)`` (same angle),
    computed in float64 as the official numpy code does.
    """
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(d_hid, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / d_hid)
    table = angle.clone()
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.to(torch.float32).unsqueeze(0)
