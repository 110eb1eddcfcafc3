"""Attention family: non-causal scaled-dot-product attention on (B, H, N, D)."""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable

import torch

from fastvit import backend, reference
from fastvit._autocast import autocast_dtype, autocast_off, cast
from fastvit.kernels._common import device_ok, dtype_ok
from fastvit._fx import leaf
from fastvit.ops import _checks as check

backend.register("attention", "eager", reference.attention)
backend.register("attention_qkvpacked", "eager", reference.attention_qkvpacked)

# the Triton kernel's head dims: every multiple of 8 up to 128 (a tile of the next power of two, at
# least 16, with the tail masked: 48 in a 64-wide tile, SigLIP-so400m's 72 in a 128-wide one)
HEAD_DIMS = tuple(range(8, 129, 8))


def _triton_why_not(x: torch.Tensor, D: int) -> str | None:
    """Why the Triton kernel cannot serve inputs of x's device and dtype with head dim D (None: it can)."""
    reason = device_ok(x) or dtype_ok(x)
    if reason is None and D not in HEAD_DIMS:
        reason = f"head dim {D} is not one the Triton attention kernel takes (a multiple of 8 up to 128)"
    return reason


def _triton_attention(q, k, v, mask, scale, dropout_p):
    from fastvit.kernels import attention as kernels

    return kernels.attention(q, k, v, mask, scale, dropout_p)


def _triton_attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p):
    from fastvit.kernels import attention as kernels

    return kernels.attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p)


backend.register(
    "attention", "triton", _triton_attention, lambda q, k, v, mask, scale, dropout_p: _triton_why_not(q, q.shape[-1])
)
backend.register(
    "attention_qkvpacked", "triton", _triton_attention_qkvpacked,
    lambda qkv, num_heads, mask, scale, dropout_p: _triton_why_not(qkv, qkv.shape[-1] // (3 * num_heads)),
)


# CUDA backend (csrc/attention.cu through fastvit/csrc/attention.py, built and loaded on first use by
# fastvit._ext): float16 and bfloat16, head dims 1 to 128 (padded to 64 or 128 inside the kernels).
CUDA_MAX_HEAD_DIM = 128
_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def _cuda_why_not(tensors: dict, D: int, B: int, H: int) -> str | None:
    """Why the CUDA attention kernels cannot serve these inputs (None: they can)."""
    for name, t in tensors.items():
        if t is not None and t.device.type != "cuda":
            return f"{name}: the CUDA backend needs CUDA tensors, got one on {t.device}"
    x = next(iter(tensors.values()))
    if x.dtype not in _CUDA_DTYPES:
        return (f"the CUDA attention takes float16 or bfloat16, got {x.dtype} (the triton and eager backends "
                "take float32)")
    if D > CUDA_MAX_HEAD_DIM:
        return f"the CUDA attention takes head dims up to {CUDA_MAX_HEAD_DIM}, got {D}"
    if B > 65535 or H > 65535:
        return f"the CUDA attention takes at most 65535 batch entries and heads, got {B} and {H}"
    return None


def _cuda_attention(q, k, v, mask, scale, dropout_p):
    from fastvit.csrc import attention as cuda

    return cuda.attention(q, k, v, mask, scale, dropout_p)


def _cuda_attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p):
    from fastvit.csrc import attention as cuda

    return cuda.attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p)


backend.register(
    "attention", "cuda", _cuda_attention,
    lambda q, k, v, mask, scale, dropout_p: _cuda_why_not(
        {"q": q, "k": k, "v": v, "mask": mask}, q.shape[-1], q.shape[0], q.shape[1]),
)
backend.register(
    "attention_qkvpacked", "cuda", _cuda_attention_qkvpacked,
    lambda qkv, num_heads, mask, scale, dropout_p: _cuda_why_not(
        {"qkv": qkv, "mask": mask}, qkv.shape[-1] // (3 * num_heads), qkv.shape[0], num_heads),
)


# Callbacks (q, k, mask, scale) that the attention fronts call with each call's checked inputs, innermost
# last (fastvit.viz's attention maps). A plain list: torch.compile guards on it without a graph break.
_OBSERVERS: list[Callable] = []


@contextlib.contextmanager
def observing(callback: Callable):
    """While active, every :func:`attention` / :func:`attention_qkvpacked` call first passes its q, k
    (B, H, N, D) views, mask and scale to ``callback`` (the innermost one when nested); the op itself
    runs as usual, on its backend."""
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def _check_mask_scale_dropout(mask, scale, dropout_p, target: tuple[int, int, int, int]) -> float:
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (bool or float) or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
            raise TypeError(f"mask must be boolean (True = attend) or an additive float tensor, got {mask.dtype}")
        try:
            ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mask must broadcast to (B, H, Nq, Nk) = {target}, got shape {tuple(mask.shape)}")
        check.no_grad_required("mask", mask, "additive masks are not differentiable in fastvit")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite float or None (= head_dim ** -0.5), got {scale!r}")
    return check.probability("dropout_p", dropout_p)


@leaf
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v. q: (B, H, Nq, D), k, v: (B, H, Nk, D) -> (B, H, Nq, D).

    Means ``F.scaled_dot_product_attention`` (non-causal), with ``scale`` defaulting to D ** -0.5.
    ``mask`` broadcasts to (B, H, Nq, Nk) (key padding: (B, 1, 1, Nk)); boolean True = attend, or
    an additive float mask (not differentiable). A query row with nothing to attend gives output 0
    and gradient 0. ``dropout_p`` drops attention probabilities whenever it is > 0: pass 0 in eval.
    q, k, v may be strided views (e.g. of a packed qkv projection).

    Backends: "triton" (fastvit.kernels.attention: flash attention, forward and backward, head dims
    8, 16, ..., 128, float16/bfloat16/float32) and "cuda" (csrc/attention.cu: the same on mma.sync
    tensor cores, head dims 1 to 128, float16/bfloat16) do not fuse dropout: with ``dropout_p > 0``
    they run the eager reference (torch's RNG), so they stay usable in training. Inputs a backend
    does not take run on the next one under "auto" and raise under an explicit choice.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check.tensor(name, t, 4, "a 4-D tensor (B, H, N, D)")
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    check.shape("k", k, (B, H, None, D), "(q's batch, heads and head dim)")
    check.shape("v", v, (B, H, Nk, D), "(k's batch, heads and length, q's head dim)")
    if D == 0:  # no tokens is fine (empty in, empty out; no key: rows fully masked), no head dim is not
        raise ValueError(f"q, k and v must have a head dim >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    dropout_p = _check_mask_scale_dropout(mask, scale, dropout_p, (B, H, Nq, Nk))
    check.same_device("q", q, k=k, v=v, mask=mask)
    q, k, v = cast(autocast_dtype(q), q, k, v)
    check.same_dtype("q", q, k=k, v=v)
    if _OBSERVERS:
        _OBSERVERS[-1](q, k, mask, scale)
    with autocast_off(q):
        return backend.dispatch("attention", q, k, v, mask, None if scale is None else float(scale), dropout_p)


@leaf
def attention_qkvpacked(
    qkv: torch.Tensor,
    num_heads: int,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention on the qkv projection's output. qkv: (B, N, 3 * H * D) -> (B, N, H * D).

    The last dim is laid out (3, H, D) as timm's and vit-pytorch's ``qkv`` Linear writes it; the
    result is ready for the output projection. Means :func:`attention` on the (B, H, N, D) views
    with the heads merged back; ``mask``, ``scale`` and ``dropout_p`` as there. The "triton" backend
    reads q, k, v in place from ``qkv`` and writes the result, and the backward's dqkv, packed (no
    permute copies); dropout and unsupported inputs as in :func:`attention`.
    """
    check.tensor("qkv", qkv, 3, "a 3-D packed projection (B, N, 3 * heads * head_dim)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    B, N, width = qkv.shape
    if width == 0 or width % (3 * num_heads):
        raise ValueError(f"qkv's last dim ({width}) must be 3 * num_heads * head_dim with num_heads = {num_heads}")
    dropout_p = _check_mask_scale_dropout(mask, scale, dropout_p, (B, int(num_heads), N, N))
    check.same_device("qkv", qkv, mask=mask)
    (qkv,) = cast(autocast_dtype(qkv), qkv)
    if _OBSERVERS:
        q, k, _ = qkv.unflatten(-1, (3, int(num_heads), -1)).permute(2, 0, 3, 1, 4).unbind(0)
        _OBSERVERS[-1](q, k, mask, scale)
    with autocast_off(qkv):
        return backend.dispatch(
            "attention_qkvpacked", qkv, int(num_heads), mask, None if scale is None else float(scale), dropout_p
        )
