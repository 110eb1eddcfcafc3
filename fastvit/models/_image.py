"""Input checks and dtype rules of fastvit's models, as FX leaf functions: a traced model keeps them
(they run with the graph, on real tensors) instead of stopping at Python control flow on shapes."""

from __future__ import annotations

import torch

from fastvit import ops
from fastvit._autocast import autocast_off
from fastvit._fx import leaf
from fastvit.models._pos_embed import posemb_sincos_table
from fastvit.models.convert import resample_pos_embed


@leaf
def check_image(x: torch.Tensor, name: str, patch_size: tuple[int, int], img_size=None, hint: str = "") -> torch.Tensor:
    """``x`` after checking it is an image batch (B, C, H, W) whose size equals ``img_size`` (``hint`` ends
    that error) or, with ``img_size`` None, is a multiple of ``patch_size``. An ``img_size`` that is not a
    multiple (SigLIP's 384 px at patch 14) leaves a remainder the patches ignore, as a stride-p conv does:
    it is cropped off."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be an image batch (B, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    (H, W), (ph, pw) = x.shape[-2:], patch_size
    exact = img_size is not None and (H, W) == tuple(img_size)
    if not exact and (H % ph or W % pw):
        raise ValueError(f"{name}'s image size {(H, W)} must be a multiple of patch_size {(ph, pw)}")
    if img_size is not None and not exact:
        raise ValueError(f"{name}'s image size {(H, W)} differs from img_size {tuple(img_size)}{hint}")
    return x[..., : H - H % ph, : W - W % pw] if H % ph or W % pw else x


@leaf
def pos_for_image(
    x: torch.Tensor, table: torch.Tensor | None, patch_size: tuple[int, int], grid_size: tuple[int, int],
    n_prefix: int, sincos: bool,
) -> torch.Tensor | None:
    """The position table for ``x``'s patch grid (``dynamic_img_size``): ``table`` (1, n_prefix + gh * gw, D)
    for the model's grid, else a new sin-cos table or the learned one resampled (bicubic, as timm)."""
    grid = (x.shape[-2] // patch_size[0], x.shape[-1] // patch_size[1])
    if table is None or grid == tuple(grid_size):
        return table
    if sincos:
        return posemb_sincos_table(grid[0], grid[1], table.shape[-1], n_prefix).to(table)
    return resample_pos_embed(table, grid, tuple(grid_size), n_prefix)


@leaf
def leading_tokens(x: torch.Tensor, name: str, patch_size: tuple[int, int], n_prefix: int, table: torch.Tensor,
                   exact: bool, hint: str = "") -> torch.Tensor:
    """The rows of a position ``table`` (L, D) that ``x``'s patches (plus ``n_prefix`` tokens) use; with
    ``exact`` the image must use them all."""
    n = n_prefix + (x.shape[-2] // patch_size[0]) * (x.shape[-1] // patch_size[1])
    if n > table.shape[0] or (exact and n != table.shape[0]):
        raise ValueError(f"{name} has {n} tokens but the position embedding has {table.shape[0]}{hint}")
    return table[:n]


@leaf
def promote(x: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    """``x`` in the promoted dtype of itself and ``others`` (None entries skipped): under autocast the
    fp32 tokens and tables keep the residual stream fp32, as in timm and vit-pytorch."""
    dtype = x.dtype
    for t in others:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return x if dtype == x.dtype else x.to(dtype)


@leaf
def pad_to_patches(x: torch.Tensor, name: str, patch_size: tuple[int, int]) -> torch.Tensor:
    """An image batch (B, C, H, W) zero-padded at the bottom / right to a multiple of ``patch_size``
    (timm's ``dynamic_img_pad``)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be an image batch (B, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    (H, W), (ph, pw) = x.shape[-2:], patch_size
    pad_h, pad_w = (ph - H % ph) % ph, (pw - W % pw) % pw
    return torch.nn.functional.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


@leaf
def layer_norm_keep_dtype(x: torch.Tensor, weight, bias, eps: float) -> torch.Tensor:
    """ops.layer_norm with the output in x's dtype also under autocast: for a LayerNorm whose output is
    the residual stream itself (``norm_pre``), which timm keeps in fp32."""
    with autocast_off(x):
        return ops.layer_norm(x, weight, bias, eps)
