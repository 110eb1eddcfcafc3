"""CUDA backend of the attention family: the Python side of the ops csrc/bindings_attention.cpp registers.

``fastvit::attention_cuda_{fwd,infer,bwd}`` and ``fastvit::attention_qkvpacked_cuda_{fwd,infer,bwd}`` have
the schemas and meaning of their Triton twins (kernels/attention.py): the forward saves the base-2
log-sum-exp (B, H, Nq) fp32, -inf for a row with nothing to attend; the packed ops read q, k, v in
place from the (B, N, 3 * H * D) projection and write o (B, N, H * D) and dqkv packed. This module gives
them fake implementations and autograd, and is imported by ``fastvit._ext.load()``.

The kernels (csrc/attention.cu, bodies in csrc/attention_kernel.h; on sm_90 those of
csrc/attention_sm90.cu, see :func:`kernel`) take float16 and bfloat16, head dims 1 to 128, any
sequence length, masks through their broadcast strides. Dropout is not fused: with
``dropout_p > 0`` the entries below run the eager reference (torch's RNG), as the Triton backend does.
"""

from __future__ import annotations

import torch

from fastvit import _ext, reference
from fastvit._library import FusedOp, get_op, op_name, wire_autograd

_ext.load()  # the ops must exist before their fakes and autograd are registered


def _scale(scale: float | None, D: int) -> float:
    return D**-0.5 if scale is None else float(scale)


# ------------------------------------------------------------------------ (B, H, N, D) layout


@torch.library.register_fake(op_name("attention", "cuda", "fwd"))
def _attention_fwd_fake(q, k, v, mask, scale):
    B, H, Nq, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.register_fake(op_name("attention", "cuda", "infer"))
def _attention_infer_fake(q, k, v, mask, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake(op_name("attention", "cuda", "bwd"))
def _attention_bwd_fake(do, q, k, v, o, lse, mask, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_backward(saved, grads):
    q, k, v, mask, scale = saved.inputs
    o, lse = saved.outputs
    dq, dk, dv = get_op("attention", "cuda", "bwd")(grads[0], q, k, v, o, lse, mask, scale)
    need = saved.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None)


wire_autograd("attention", "cuda", num_outputs=1, backward=_attention_backward, save_outputs=True)
_attention = FusedOp("attention", "cuda", num_outputs=1)


def attention(q, k, v, mask=None, scale=None, dropout_p=0.0):
    """CUDA flash attention, fastvit.reference.attention's meaning. q: (B, H, Nq, D), k, v: (B, H, Nk, D)
    -> (B, H, Nq, D). ``dropout_p > 0`` runs the eager reference."""
    if dropout_p > 0:
        return reference.attention(q, k, v, mask, scale, dropout_p)
    return _attention(q, k, v, mask, _scale(scale, q.shape[-1]))


# --------------------------------------------------------------- packed qkv (B, N, 3 * H * D)


@torch.library.register_fake(op_name("attention_qkvpacked", "cuda", "fwd"))
def _qkvpacked_fwd_fake(qkv, num_heads, mask, scale):
    B, N, width = qkv.shape
    return qkv.new_empty((B, N, width // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.register_fake(op_name("attention_qkvpacked", "cuda", "infer"))
def _qkvpacked_infer_fake(qkv, num_heads, mask, scale):
    B, N, width = qkv.shape
    return qkv.new_empty((B, N, width // 3))


@torch.library.register_fake(op_name("attention_qkvpacked", "cuda", "bwd"))
def _qkvpacked_bwd_fake(do, qkv, o, lse, mask, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _qkvpacked_backward(saved, grads):
    qkv, num_heads, mask, scale = saved.inputs
    o, lse = saved.outputs
    dqkv = get_op("attention_qkvpacked", "cuda", "bwd")(grads[0], qkv, o, lse, mask, num_heads, scale)
    return (dqkv if saved.needs_input_grad[0] else None, None, None, None)


wire_autograd("attention_qkvpacked", "cuda", num_outputs=1, backward=_qkvpacked_backward, save_outputs=True)
_qkvpacked = FusedOp("attention_qkvpacked", "cuda", num_outputs=1)


def attention_qkvpacked(qkv, num_heads, mask=None, scale=None, dropout_p=0.0):
    """CUDA flash attention on the packed projection. qkv: (B, N, 3 * H * D) -> (B, N, H * D), read and
    written without permute copies (dqkv too). ``dropout_p > 0`` runs the eager reference."""
    if dropout_p > 0:
        return reference.attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p)
    D = qkv.shape[-1] // (3 * num_heads)
    return _qkvpacked(qkv, num_heads, mask, _scale(scale, D))



def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor | None = None) -> str:
    """The kernel that serves (q, k, v) (B, H, N, D) CUDA tensors on their device, the forward's, or with
    ``dout`` (q's shape) the backward's: ``"sm90_tma_wgmma"`` (csrc/attention_sm90.cu: TMA, wgmma, warp
    specialisation; needs an sm_90 GPU, an sm_90a image in the build, and q, k, v (and dout) with unit
    feature stride, a head dim that is a multiple of 8, 16-byte aligned starts and 16-byte multiple
    strides) or ``"sm80_mma_sync"``.
    ``FASTVIT_ATTENTION_SM90=0`` in the environment picks the latter everywhere; it is read at every call."""
    for name, t in (("q", q), ("k", k), ("v", v), ("dout", dout)):
        if t is not None and not t.is_cuda:
            raise ValueError(f"kernel: {name} must be a CUDA tensor, got one on {t.device}")
    return torch.ops.fastvit.attention_cuda_kernel(q, k, v, dout)
