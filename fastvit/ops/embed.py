"""Embed family: ViT's non-overlapping patch embedding and T2T-ViT's overlapping soft split."""

from __future__ import annotations

import torch

from fastvit import backend, reference
from fastvit._autocast import autocast_dtype, autocast_off, cast
from fastvit._fx import leaf
from fastvit.ops import _checks as check

backend.add_function("soft_split_layer_norm", "embed")
backend.register("patch_embed", "eager", reference.patch_embed)
backend.register("soft_split", "eager", reference.soft_split)
backend.register("soft_split_layer_norm", "eager", reference.soft_split_layer_norm)

PATCH_ORDERS = ("chw", "hwc")
# The LayerNorm fusions hold a whole row (a patch's features, a token's D, a window's C*k*k) in one tile.
MAX_ROW = 16384


@leaf
def patch_embed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    patch_size: int | tuple[int, int],
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    *,
    patch_order: str = "chw",
    pre_norm: bool = False,
    pre_norm_weight: torch.Tensor | None = None,
    pre_norm_bias: torch.Tensor | None = None,
    post_norm: bool = False,
    post_norm_weight: torch.Tensor | None = None,
    post_norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
) -> torch.Tensor:
    """Patch embedding as one op. x: (B, C, H, W) -> (B, L (+1), D), L = (H / p) * (W / p).

    Means ``conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)`` with a conv-layout weight
    (D, C, p, p), then the cls token (``(D,)``, ``(1, D)`` or ``(1, 1, D)``, expanded over the batch)
    in front, then ``+ pos_embed`` (``(L', D)`` or ``(1, L', D)``, L' = number of tokens including the
    cls token). H and W must be multiples of the patch size.

    vit-pytorch's form: ``patch_order="hwc"`` takes a linear weight (D, p*p*C) over
    ``rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)")`` patches; ``pre_norm=True`` applies a
    LayerNorm over each patch's C*p*p features first (``pre_norm_weight``/``pre_norm_bias``: (C*p*p,)
    in the patch order, or None), ``post_norm=True`` one over D after the projection (``post_norm_*``:
    (D,) or None), both with ``norm_eps`` and fp32 statistics; cls and pos come after the norms.

    Under autocast the GEMM operands (and cls/pos) take the autocast dtype, x too unless a pre-norm
    takes it as given; the result is in the GEMM dtype.
    """
    check.tensor("x", x, 4, "a 4-D image batch (B, C, H, W)")
    if patch_order not in PATCH_ORDERS:
        raise ValueError(f"patch_order must be one of {PATCH_ORDERS}, got {patch_order!r}")
    hwc = patch_order == "hwc"
    check.tensor("weight", weight, 2 if hwc else 4,
                 "a linear weight (D, p*p*C) for patch_order='hwc'" if hwc else "a conv-layout weight (D, C, p, p)")
    check.tensor("bias", bias, 1, "a 1-D bias (D,)", optional=True)
    check.tensor("pos_embed", pos_embed, (2, 3), "(L, D) or (1, L, D)", optional=True)
    check.tensor("cls_token", cls_token, (1, 2, 3), "(D,), (1, D) or (1, 1, D)", optional=True)
    ph, pw = check.pair("patch_size", patch_size, minimum=1)
    B, C, H, W = x.shape
    D = weight.shape[0]
    K = C * ph * pw
    if hwc:
        check.shape("weight", weight, (D, K), "(D, patch height * patch width * x's channels)")
    else:
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
    for flag, name, n, t_w, t_b in (("pre_norm", "pre_norm", K, pre_norm_weight, pre_norm_bias),
                                    ("post_norm", "post_norm", D, post_norm_weight, post_norm_bias)):
        on = pre_norm if flag == "pre_norm" else post_norm
        if not isinstance(on, bool):
            raise TypeError(f"{flag} must be a bool, got {type(on).__name__}")
        for suffix, t in (("weight", t_w), ("bias", t_b)):
            if t is not None and not on:
                raise ValueError(f"{name}_{suffix} was given but {flag}=False: pass {flag}=True to apply that LayerNorm")
            check.tensor(f"{name}_{suffix}", t, 1, f"a 1-D tensor ({n},)", optional=True)
            check.shape(f"{name}_{suffix}", t, (n,), "(the patch features C*p*p)" if flag == "pre_norm" else "(D)")
    norm_eps = check.positive_float("norm_eps", norm_eps)
    check.same_device("x", x, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token,
                      pre_norm_weight=pre_norm_weight, pre_norm_bias=pre_norm_bias,
                      post_norm_weight=post_norm_weight, post_norm_bias=post_norm_bias)
    dt = autocast_dtype(x)
    if dt is not None:
        weight, bias, pos_embed, cls_token = cast(dt, weight, bias, pos_embed, cls_token)
        if not pre_norm:
            x = x.to(dt)
    else:
        check.same_dtype("x", x, weight=weight)
    opts = {}
    if hwc or pre_norm or post_norm:  # the default call keeps the plain signature
        opts = dict(patch_order=patch_order, pre_norm=pre_norm, pre_norm_weight=pre_norm_weight,
                    pre_norm_bias=pre_norm_bias, post_norm=post_norm, post_norm_weight=post_norm_weight,
                    post_norm_bias=post_norm_bias, norm_eps=norm_eps)
    with autocast_off(x):
        return backend.dispatch("patch_embed", x, weight, bias, (ph, pw), pos_embed, cls_token, **opts)


def _split_args(x, kernel_size, stride, padding):
    check.tensor("x", x, 4, "a 4-D feature map (B, C, H, W)")
    kh, kw = check.pair("kernel_size", kernel_size, minimum=1)
    sh, sw = check.pair("stride", stride, minimum=1)
    pad_h, pad_w = check.pair("padding", padding, minimum=0)
    H, W = x.shape[-2:]
    if H + 2 * pad_h < kh or W + 2 * pad_w < kw:
        raise ValueError(
            f"kernel_size {(kh, kw)} is larger than x's padded size {(H + 2 * pad_h, W + 2 * pad_w)}"
        )
    return (kh, kw), (sh, sw), (pad_h, pad_w)


@leaf
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
    k, s, p = _split_args(x, kernel_size, stride, padding)
    return backend.dispatch("soft_split", x, k, s, p)


@leaf
def soft_split_layer_norm(
    x: torch.Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """T2T-ViT's soft split followed by the LayerNorm over each token's features, as one op.
    x: (B, C, H, W), weight, bias: (C * kh * kw,) or None -> (B, L, C * kh * kw).

    Means ``layer_norm(soft_split(x, kernel_size, stride, padding), weight, bias, eps)`` (the next
    Token_performer's ``norm1``) with fp32 statistics; the output is in x's dtype, or the autocast
    dtype under autocast. The fused kernel never writes the un-normalised tokens, and writes each
    token's row 16-element aligned: its result is a view (``.contiguous()`` for a dense copy).
    """
    k, s, p = _split_args(x, kernel_size, stride, padding)
    F = x.shape[1] * k[0] * k[1]
    check.tensor("weight", weight, 1, f"a 1-D tensor ({F},)", optional=True)
    check.tensor("bias", bias, 1, f"a 1-D tensor ({F},)", optional=True)
    check.shape("weight", weight, (F,), "(x's channels * kernel height * kernel width)")
    check.shape("bias", bias, (F,), "(x's channels * kernel height * kernel width)")
    eps = check.positive_float("eps", eps)
    check.same_device("x", x, weight=weight, bias=bias)
    # No GEMM operand to cast: autocast stays on and each backend writes the autocast dtype.
    return backend.dispatch("soft_split_layer_norm", x, k, s, p, weight, bias, eps)


# ----------------------------------------------------------------------------------------------
# Triton backend (kernels/embed.py, imported on first use so that fastvit imports without triton)
# ----------------------------------------------------------------------------------------------


def _triton_reason(*tensors: torch.Tensor | None) -> str | None:
    from fastvit.kernels._common import device_ok, dtype_ok

    for t in tensors:
        if t is not None:
            reason = device_ok(t) or dtype_ok(t)
            if reason is not None:
                return reason
    return None


def _patch_embed_why_not(x, weight, bias, patch_size, pos_embed=None, cls_token=None, *, patch_order="chw",
                         pre_norm=False, pre_norm_weight=None, pre_norm_bias=None, post_norm=False,
                         post_norm_weight=None, post_norm_bias=None, norm_eps=1e-5):
    reason = _triton_reason(x, weight, bias, pos_embed, cls_token, pre_norm_weight, pre_norm_bias,
                            post_norm_weight, post_norm_bias)
    if reason is not None:
        return reason
    K = x.shape[1] * patch_size[0] * patch_size[1]
    if pre_norm and K > MAX_ROW:
        return f"the fused pre-norm holds a patch's {K} features in one tile (at most {MAX_ROW})"
    if post_norm and weight.shape[0] > MAX_ROW:
        return f"the fused post-norm's backward holds a token's {weight.shape[0]} features in one tile (at most {MAX_ROW})"
    return None


def _patch_embed_triton(*args, **kwargs):
    from fastvit.kernels import embed

    return embed.patch_embed(*args, **kwargs)


def _soft_split_why_not(x, kernel_size, stride, padding):
    return _triton_reason(x)


def _soft_split_triton(x, kernel_size, stride, padding):
    from fastvit.kernels import embed

    return embed.soft_split(x, kernel_size, stride, padding)


def _ssln_why_not(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5):
    reason = _triton_reason(x, weight, bias)
    if reason is not None:
        return reason
    F = x.shape[1] * kernel_size[0] * kernel_size[1]
    if F > MAX_ROW:
        return f"the fused LayerNorm holds a token's {F} features in one tile (at most {MAX_ROW})"
    return None


def _ssln_triton(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5):
    from fastvit.kernels import embed

    out_dtype = autocast_dtype(x) or x.dtype
    with autocast_off(x):
        return embed.soft_split_layer_norm(x, kernel_size, stride, padding, weight, bias, eps, out_dtype=out_dtype)


backend.register("patch_embed", "triton", _patch_embed_triton, _patch_embed_why_not)
backend.register("soft_split", "triton", _soft_split_triton, _soft_split_why_not)
backend.register("soft_split_layer_norm", "triton", _ssln_triton, _ssln_why_not)


# ----------------------------------------------------------------------------------------------
# CUDA backend (csrc/embed*.cu through fastvit/csrc/embed.py, built and loaded on first use by fastvit._ext)
# ----------------------------------------------------------------------------------------------

_CUDA_MAX_WIDTH = 65535 * 64  # 64-wide tiles on the grid's second dim (csrc/embed_ops.h)


def _patch_embed_cuda_why_not(x, weight, bias, patch_size, pos_embed=None, cls_token=None, *, patch_order="chw",
                              pre_norm=False, pre_norm_weight=None, pre_norm_bias=None, post_norm=False,
                              post_norm_weight=None, post_norm_bias=None, norm_eps=1e-5):
    reason = check.cuda_reason({"x": x, "weight": weight, "bias": bias, "pos_embed": pos_embed, "cls_token": cls_token,
                           "pre_norm_weight": pre_norm_weight, "pre_norm_bias": pre_norm_bias,
                           "post_norm_weight": post_norm_weight, "post_norm_bias": post_norm_bias})
    if reason is not None:
        return reason
    if x.dtype != weight.dtype:  # only a pre-norm under autocast keeps x's dtype
        return (f"the CUDA patch_embed reads x in the weight's dtype; x is {x.dtype} and the weight {weight.dtype} "
                "(a pre-norm under autocast)")
    K = x.shape[1] * patch_size[0] * patch_size[1]
    if max(K, weight.shape[0]) > _CUDA_MAX_WIDTH or (x.shape[2] // patch_size[0]) * (x.shape[3] // patch_size[1]) >= 2**30:
        return (f"the CUDA patch_embed takes C*p*p and D up to {_CUDA_MAX_WIDTH} and fewer than 2**30 tokens per image, "
                f"got {K}, {weight.shape[0]}")
    return None


def _patch_embed_cuda(*args, **kwargs):
    from fastvit.csrc import embed as cuda

    return cuda.patch_embed(*args, **kwargs)


def _soft_split_cuda_why_not(x, kernel_size, stride, padding):
    return check.cuda_reason({"x": x})


def _soft_split_cuda(x, kernel_size, stride, padding):
    from fastvit.csrc import embed as cuda

    return cuda.soft_split(x, kernel_size, stride, padding)


def _ssln_cuda_why_not(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5):
    reason = check.cuda_reason({"x": x, "weight": weight, "bias": bias})
    if reason is not None:
        return reason
    out_dtype = autocast_dtype(x) or x.dtype
    if out_dtype != x.dtype and not (x.dtype == torch.float32 and out_dtype in (torch.float16, torch.bfloat16)):
        return f"the CUDA soft_split_layer_norm writes x's dtype or, from float32, float16 / bfloat16; not {x.dtype} -> {out_dtype}"
    return None


def _ssln_cuda(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5):
    from fastvit.csrc import embed as cuda

    out_dtype = autocast_dtype(x) or x.dtype
    with autocast_off(x):
        return cuda.soft_split_layer_norm(x, kernel_size, stride, padding, weight, bias, eps, out_dtype=out_dtype)


backend.register("patch_embed", "cuda", _patch_embed_cuda, _patch_embed_cuda_why_not)
backend.register("soft_split", "cuda", _soft_split_cuda, _soft_split_cuda_why_not)
backend.register("soft_split_layer_norm", "cuda", _ssln_cuda, _ssln_cuda_why_not)
