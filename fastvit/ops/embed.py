"""Embed family: ViT's non-overlapping patch embedding and T2T-ViT's overlapping soft split."""

from __future__ import annotations

import torch

from fastvit import backend, reference
from fastvit._autocast import autocast_dtype, autocast_off, cast
from fastvit.ops import _checks as check

backend.register("patch_embed", "eager", reference.patch_embed)
backend.register("soft_split", "eager", reference.soft_split)


def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int | tuple[int, int],
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch embedding as one op. x: (B, C, H, W), weight: (D, C, p, p) -> (B, L (+1), D).

    Means ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)``, then the cls token
    (``(D,)``, ``(1, D)`` or ``(1, 1, D)``, expanded over the batch) in front, then ``+ pos_embed``
    (``(L', D)`` or ``(1, L', D)``, L' = number of tokens including the cls token). H and W must be
    multiples of the patch size. Under autocast the result is in the autocast dtype.
    """
    check.tensor("x", x, 4, "a 4-D image batch (B, C, H, W)")
    check.tensor("weight", weight, 4, "a conv-layout weight (D, C, p, p)")
    check.tensor("bias", bias, 1, "a 1-D bias (D,)", optional=True)
    check.tensor("pos_embed", pos_embed, (2, 3), "(L, D) or (1, L, D)", optional=True)
    check.tensor("cls_token", cls_token, (1, 2, 3), "(D,), (1, D) or (1, 1, D)", optional=True)
    ph, pw = check.pair("patch_size", patch_size, minimum=1)
    B, C, H, W = x.shape
    D = weight.shape[0]
    check.shape("weight", weight, (D, C, ph, pw), "(D, x's channels, patch height, patch width)")
    if H % ph or W % pw:
        raise ValueError(f"x's image size {(H, W)} must be a multiple of patch_size {(ph, pw)}")
    check.shape("bias", bias, (D,))
    if cls_token is not None and tuple(cls_token.shape) not in ((D,), (1, D), (1, 1, D)):
        raise ValueError(f"cls_token must have shape ({D},), (1, {D}) or (1, 1, {D}), got {tuple(cls_token.shape)}")
    L = (H // ph) * (W // pw) + (cls_token is not None)
    if pos_embed is not None and tuple(pos_embed.shape) not in ((L, D), (1, L, D)):
        raise ValueError(
            f"pos_embed must have shape ({L}, {D}) or (1, {L}, {D}) ({L} tokens"
            f"{' with the cls token' if cls_token is not None else ''}), got {tuple(pos_embed.shape)}"
        )
    check.same_device("x", x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    dt = autocast_dtype(x)
    if dt is not None:
        x, weight, bias, pos_embed, cls_token = cast(dt, x, weight, bias, pos_embed, cls_token)
    check.same_dtype("x", x, weight=weight)
    with autocast_off(x):
        return backend.dispatch("patch_embed", x, weight, bias, (ph, pw), pos_embed, cls_token)


def soft_split(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
) -> torch.Tensor:
    """T2T-ViT's overlapping soft split. x: (B, C, H, W) -> (B, L, C * kh * kw).

    Means ``F.unfold(x, kernel_size, stride=stride, padding=padding).transpose(1, 2)``: token
    features ordered (c, ki, kj), tokens in row-major window order. Keeps x's dtype.
    """
    check.tensor("x", x, 4, "a 4-D feature map (B, C, H, W)")
    kh, kw = check.pair("kernel_size", kernel_size, minimum=1)
    sh, sw = check.pair("stride", stride, minimum=1)
    pad_h, pad_w = check.pair("padding", padding, minimum=0)
    H, W = x.shape[-2:]
    if H + 2 * pad_h < kh or W + 2 * pad_w < kw:
        raise ValueError(
            f"kernel_size {(kh, kw)} is larger than x's padded size {(H + 2 * pad_h, W + 2 * pad_w)}"
        )
    return backend.dispatch("soft_split", x, (kh, kw), (sh, sw), (pad_h, pad_w))
