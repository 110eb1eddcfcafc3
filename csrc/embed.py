"""CUDA backend of the embed family: the Python side of the ops csrc/bindings_embed.cpp registers.

``fastvit::patch_embed_cuda_{fwd,infer,bwd}``, ``fastvit::soft_split_cuda_{fwd,infer,bwd}`` and
``fastvit::soft_split_layer_norm_cuda_{fwd,infer,bwd}`` have the schemas and meaning of their Triton twins
(kernels/embed.py). This module gives them fake implementations and autograd, and is imported by
``fastvit._ext.load()``.

The kernels (csrc/embed.cu, csrc/embed_split.cu; bodies in csrc/embed_kernel.h) take float32, float16 and
bfloat16: patch_embed as an implicit GEMM (mma.sync tensor cores for float16 / bfloat16, CUDA cores for
float32) with bias, cls token and pos_embed in the epilogue and vit-pytorch's optional LayerNorms; the soft
split as a gather, its backward as a deterministic fold, the LayerNorm fused so the un-normalised tokens are
never written.
"""

from __future__ import annotations

import torch

from fastvit import _ext
from fastvit._library import FusedOp, get_op, op_name, wire_autograd

_ext.load()  # the ops must exist before their fakes and autograd are registered

ROW_ALIGN = 16  # soft_split_layer_norm's rows are this many elements apart (csrc/embed_ops.h: kRowAlign)


def _empty(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return t.new_empty((0,), dtype=dtype)


def _dx_like(x: torch.Tensor) -> torch.Tensor:
    """dx in x's memory format, as the C++ side allocates it (channels_last stays channels_last)."""
    B, C, H, W = x.shape
    if x.stride(1) == 1 and C > 1 and not x.is_contiguous():
        return x.new_empty((B, H, W, C)).permute(0, 3, 1, 2)
    return x.new_empty((B, C, H, W))


# ------------------------------------------------------------------------------------- patch_embed


def _tokens(x, weight, cls_token, patch_h, patch_w):
    B, _, H, W = x.shape
    L = (H // patch_h) * (W // patch_w)
    return B, L, L + (cls_token is not None), weight.shape[0]


@torch.library.register_fake(op_name("patch_embed", "cuda", "fwd"))
def _patch_embed_fwd_fake(x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias,
                          patch_h, patch_w, patch_order, pre_norm, post_norm, eps):
    B, L, LT, D = _tokens(x, weight, cls_token, patch_h, patch_w)
    f32 = torch.float32
    stats = (B * L,) if pre_norm else (0,)
    post = (B * L,) if post_norm else (0,)
    z = weight.new_empty((B, L, D)) if post_norm else _empty(weight)
    return (weight.new_empty((B, LT, D)), z, x.new_empty(stats, dtype=f32), x.new_empty(stats, dtype=f32),
            x.new_empty(post, dtype=f32), x.new_empty(post, dtype=f32))


@torch.library.register_fake(op_name("patch_embed", "cuda", "infer"))
def _patch_embed_infer_fake(x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias,
                            patch_h, patch_w, patch_order, pre_norm, post_norm, eps):
    B, _, LT, D = _tokens(x, weight, cls_token, patch_h, patch_w)
    return weight.new_empty((B, LT, D))


@torch.library.register_fake(op_name("patch_embed", "cuda", "bwd"))
def _patch_embed_bwd_fake(dy, x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias,
                          z, mu1, rstd1, mu2, rstd2, patch_h, patch_w, patch_order, pre_norm, post_norm, needs):
    params = (weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias)
    out = [_dx_like(x) if needs[0] else _empty(dy)]
    for need, p in zip(needs[1:], params):
        out.append(p.new_empty(p.shape) if need and p is not None else _empty(dy))
    return tuple(out)


def _patch_embed_backward(saved, grads):
    inputs = saved.inputs
    _, z, mu1, r1, mu2, r2 = saved.outputs
    needs = [bool(n) for n in saved.needs_input_grad[:9]]
    got = get_op("patch_embed", "cuda", "bwd")(grads[0], *inputs[:9], z, mu1, r1, mu2, r2, *inputs[9:14], needs)
    return (*(g if n else None for g, n in zip(got, needs)), *([None] * (len(inputs) - 9)))


wire_autograd("patch_embed", "cuda", 1, _patch_embed_backward)
_patch_embed = FusedOp("patch_embed", "cuda", 1)


def patch_embed(x, weight, bias, patch_size, pos_embed=None, cls_token=None, *, patch_order="chw",
                pre_norm=False, pre_norm_weight=None, pre_norm_bias=None,
                post_norm=False, post_norm_weight=None, post_norm_bias=None, norm_eps=1e-5):
    """CUDA patch embedding, fastvit.reference.patch_embed's meaning (arguments checked by the front).
    x: (B, C, H, W) -> (B, L (+1), D)."""
    ph, pw = patch_size
    return _patch_embed(x, weight, bias, pos_embed, cls_token, pre_norm_weight, pre_norm_bias, post_norm_weight,
                        post_norm_bias, ph, pw, patch_order, pre_norm, post_norm, float(norm_eps))


# ---------------------------------------------------------------------------------------------- soft split


def _windows(x, kh, kw, sh, sw, ph, pw):
    B, C, H, W = x.shape
    L = ((H + 2 * ph - kh) // sh + 1) * ((W + 2 * pw - kw) // sw + 1)
    return B, L, C * kh * kw


@torch.library.register_fake(op_name("soft_split", "cuda", "fwd"))
def _soft_split_fwd_fake(x, kh, kw, sh, sw, ph, pw):
    return x.new_empty(_windows(x, kh, kw, sh, sw, ph, pw))


@torch.library.register_fake(op_name("soft_split", "cuda", "infer"))
def _soft_split_infer_fake(x, kh, kw, sh, sw, ph, pw):
    return x.new_empty(_windows(x, kh, kw, sh, sw, ph, pw))


@torch.library.register_fake(op_name("soft_split", "cuda", "bwd"))
def _soft_split_bwd_fake(dy, x, kh, kw, sh, sw, ph, pw):
    return _dx_like(x)


def _soft_split_backward(saved, grads):
    x, *geometry = saved.inputs
    return (get_op("soft_split", "cuda", "bwd")(grads[0], x, *geometry), *([None] * len(geometry)))


wire_autograd("soft_split", "cuda", 1, _soft_split_backward)
_soft_split = FusedOp("soft_split", "cuda", 1)


def soft_split(x, kernel_size, stride, padding):
    """CUDA soft split (unfold). x: (B, C, H, W) -> (B, L, C * kh * kw), contiguous."""
    return _soft_split(x, *kernel_size, *stride, *padding)


def _ssln_out(x, kh, kw, sh, sw, ph, pw, out_dtype):
    B, L, F = _windows(x, kh, kw, sh, sw, ph, pw)
    so = -(-F // ROW_ALIGN) * ROW_ALIGN
    return torch.empty_strided((B, L, F), (L * so, so, 1), dtype=out_dtype, device=x.device)


@torch.library.register_fake(op_name("soft_split_layer_norm", "cuda", "fwd"))
def _ssln_fwd_fake(x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype):
    B, L, _ = _windows(x, kh, kw, sh, sw, ph, pw)
    f32 = torch.float32
    return _ssln_out(x, kh, kw, sh, sw, ph, pw, out_dtype), x.new_empty((B * L,), dtype=f32), x.new_empty((B * L,), dtype=f32)


@torch.library.register_fake(op_name("soft_split_layer_norm", "cuda", "infer"))
def _ssln_infer_fake(x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype):
    return _ssln_out(x, kh, kw, sh, sw, ph, pw, out_dtype)


@torch.library.register_fake(op_name("soft_split_layer_norm", "cuda", "bwd"))
def _ssln_bwd_fake(dy, x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw, needs):
    return (_dx_like(x) if needs[0] else _empty(x),
            weight.new_empty(weight.shape) if needs[1] else _empty(x),
            bias.new_empty(bias.shape) if needs[2] else _empty(x))


def _ssln_backward(saved, grads):
    x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype = saved.inputs
    _, mean, rstd = saved.outputs
    needs = [bool(n) for n in saved.needs_input_grad[:3]]
    got = get_op("soft_split_layer_norm", "cuda", "bwd")(grads[0], x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw,
                                                         needs)
    return (*(g if n else None for g, n in zip(got, needs)), *([None] * 8))


wire_autograd("soft_split_layer_norm", "cuda", 1, _ssln_backward)
_ssln = FusedOp("soft_split_layer_norm", "cuda", 1)


def soft_split_layer_norm(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5, *, out_dtype=None):
    """CUDA soft split + LayerNorm. x: (B, C, H, W) -> (B, L, C * kh * kw) in ``out_dtype`` (x's by
    default), a view of 16-element aligned rows; the un-normalised tokens are never written."""
    return _ssln(x, weight, bias, *kernel_size, *stride, *padding, float(eps), out_dtype or x.dtype)
