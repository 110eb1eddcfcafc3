"""CUDA backend of the performer family: the Python side of the ops csrc/bindings_performer.cpp registers.

``fastvit::performer_attention_cuda_{fwd,infer,bwd}`` have the schemas and meaning of their Triton twins
(kernels/performer.py); the forward always saves the kqv projection (B, T, 3 emb) next to the fp32 sums
ksum (B, m) and kptv (B, m, emb). This module gives them fake implementations and autograd, and is
imported by ``fastvit._ext.load()``.

The kernels (csrc/performer.cu, bodies in csrc/performer_kernel.h) take float32, float16 and bfloat16,
any dim, emb and m up to 128 with m * emb <= 4096 (T2T-ViT: emb 64, m 32). Dropout is fused with the
Triton kernels' Philox stream: the same seed gives the same mask on both backends.
"""

from __future__ import annotations

import torch

from fastvit import _ext
from fastvit._library import FusedOp, draw_seed, get_op, op_name, wire_autograd

_ext.load()  # the ops must exist before their fakes and autograd are registered

FN = "performer_attention"
MAX_EMB, MAX_FEATURES, MAX_FEATURE_ELEMS = 128, 128, 4096  # csrc/performer_ops.h


@torch.library.register_fake(op_name(FN, "cuda", "fwd"))
def _fwd_fake(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed):
    B, T, _ = x.shape
    E, m = proj_weight.shape[0], w.shape[0]
    f32 = torch.float32
    return (x.new_empty((B, T, E)), x.new_empty((B, m), dtype=f32), x.new_empty((B, m, E), dtype=f32),
            x.new_empty((B, T, 3 * E)))


@torch.library.register_fake(op_name(FN, "cuda", "infer"))
def _infer_fake(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed):
    B, T, _ = x.shape
    return x.new_empty((B, T, proj_weight.shape[0]))


@torch.library.register_fake(op_name(FN, "cuda", "bwd"))
def _bwd_fake(grad_out, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, ksum, kptv, kqv,
              need_dx, need_dkqv, need_dw):
    def like(t, need):
        return t.new_empty(t.shape) if need and t is not None else x.new_empty((0,))

    return (like(x, need_dx), like(kqv_weight, need_dkqv), like(kqv_bias, need_dkqv), like(w, need_dw),
            like(proj_weight, True), like(proj_bias, True))


def _backward(saved, grads):
    x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed = saved.inputs
    _, ksum, kptv, kqv = saved.outputs
    n = saved.needs_input_grad
    dx, dW, db, dw, dP, dpb = get_op(FN, "cuda", "bwd")(
        grads[0], x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, ksum, kptv, kqv,
        n[0], n[1] or n[2], n[3],
    )
    pick = lambda need, t: t if need else None  # noqa: E731
    return (pick(n[0], dx), pick(n[1], dW), pick(n[2], db), pick(n[3], dw), pick(n[4], dP), pick(n[5], dpb),
            None, None, None)


wire_autograd(FN, "cuda", num_outputs=1, backward=_backward)
_op = FusedOp(FN, "cuda", num_outputs=1)


def performer_attention(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    """CUDA Performer attention, fastvit.reference.performer_attention's meaning (arguments checked and
    autocast by the front). x: (B, T, dim) -> (B, T, emb); dropout fused (Philox, Triton's stream)."""
    seed = draw_seed(x.device) if dropout_p > 0 else None
    return _op(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, float(eps), float(dropout_p), seed)
