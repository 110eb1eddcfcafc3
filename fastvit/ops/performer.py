"""Performer family: T2T-ViT's linearized single-head attention (random-feature softmax kernel)."""

from __future__ import annotations

import torch

from fastvit import backend, reference
from fastvit._autocast import autocast_dtype, autocast_off, cast
from fastvit.kernels._common import device_ok, dtype_ok
from fastvit._fx import leaf
from fastvit.ops import _checks as check

backend.register("performer_attention", "eager", reference.performer_attention)

# The Triton kernels keep a token's k, q, v rows and the (emb, emb) projection in registers.
_TRITON_MAX_EMB = 128
_TRITON_MAX_FEATURES = 128


def _triton_why_not(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p) -> str | None:
    """Why the Triton kernels cannot serve these (checked, autocast) inputs, or None. Shapes and dtypes only."""
    for name, t in (("x", x), ("w", w), ("kqv_bias", kqv_bias), ("proj_bias", proj_bias)):
        if t is None:
            continue
        reason = device_ok(t) or dtype_ok(t)
        if reason is not None:
            return f"{name}: {reason}"
    emb, m = proj_weight.shape[0], w.shape[0]
    if emb > _TRITON_MAX_EMB:
        return f"emb = {emb} > {_TRITON_MAX_EMB} (the kernels keep a token's k, q, v rows in registers)"
    if m > _TRITON_MAX_FEATURES:
        return f"m = {m} random features > {_TRITON_MAX_FEATURES}"
    B, T, dim = x.shape
    if dim == 0:  # B = 0 or T = 0 is served (empty out); a token without features is not
        return f"x has no features (shape {tuple(x.shape)})"
    if T * emb >= 2**31:
        return f"T * emb = {T * emb} >= 2**31 (int32 dropout counters)"
    return None


def _triton_call(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    from fastvit.kernels import performer as kernels

    return kernels.performer_attention(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p)


backend.register("performer_attention", "triton", _triton_call, _triton_why_not)

# CUDA backend (csrc/performer.cu through fastvit/csrc/performer.py, built and loaded on first use by fastvit._ext)
_CUDA_MAX_EMB, _CUDA_MAX_FEATURES, _CUDA_MAX_FEATURE_ELEMS = 128, 128, 4096  # csrc/performer_ops.h


def _cuda_why_not(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p) -> str | None:
    """Why the CUDA kernels cannot serve these (checked, autocast) inputs, or None."""
    reason = check.cuda_reason({"x": x, "kqv_weight": kqv_weight, "kqv_bias": kqv_bias, "w": w,
                                "proj_weight": proj_weight, "proj_bias": proj_bias})
    if reason is not None:
        return reason
    emb, m = proj_weight.shape[0], w.shape[0]
    if emb > _CUDA_MAX_EMB or m > _CUDA_MAX_FEATURES or emb * m > _CUDA_MAX_FEATURE_ELEMS:
        return (f"emb = {emb}, m = {m}: the CUDA Performer keeps (m, emb) matrices in shared memory (emb, m <= 128, "
                f"m * emb <= {_CUDA_MAX_FEATURE_ELEMS})")
    B, T, dim = x.shape
    if dim == 0:
        return f"x has no features (shape {tuple(x.shape)})"
    if B > 65535 or T * 3 * emb >= 2**31 or dim > 65535 * 64:
        return (f"B = {B} > 65535, T * 3 emb = {T * 3 * emb} >= 2**31 or dim = {dim} > {65535 * 64} "
                "(the CUDA grid's limits and 32-bit dropout counters)")
    return None


def _cuda_call(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    from fastvit.csrc import performer as cuda

    return cuda.performer_attention(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p)


backend.register("performer_attention", "cuda", _cuda_call, _cuda_why_not)


@leaf
def performer_attention(
    x: torch.Tensor,
    kqv_weight: torch.Tensor,
    kqv_bias: torch.Tensor | None,
    w: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    eps: float = 1e-8,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """T2T-ViT's ``Token_performer.single_attn``. x: (B, T, dim) -> (B, T, emb).

    ``k, q, v = split(x @ kqv_weight.T + kqv_bias, emb)`` (kqv_weight: (3 emb, dim), k first);
    ``phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m)`` with w: (m, emb);
    ``y = phi(q) (phi(k)^T v) / (phi(q) sum_t phi(k) + eps)``; output
    ``v + dropout(y @ proj_weight.T + proj_bias)`` (proj_weight: (emb, emb)) in v's dtype.
    Features, their sums and the normaliser are fp32. ``dropout_p`` applies whenever > 0.

    Backends: eager (fastvit.reference) and triton (kernels/performer.py: two forward passes that
    keep the features on chip, a fused backward; dropout fused with Philox, reproducible under
    ``torch.manual_seed`` but a different mask than ``F.dropout``'s; fp32 features stay finite while
    ``2 A + ln(T max(1, max|v|)) < 88.7`` with A the largest exponent, always true for T2T-ViT's w).
    """
    check.tensor("x", x, 3, "a 3-D token tensor (B, T, dim)")
    check.tensor("kqv_weight", kqv_weight, 2, "a 2-D weight (3 * emb, dim)")
    check.tensor("kqv_bias", kqv_bias, 1, "a 1-D bias (3 * emb,)", optional=True)
    check.tensor("w", w, 2, "the 2-D random-feature matrix (m, emb)")
    check.tensor("proj_weight", proj_weight, 2, "a 2-D weight (emb, emb)")
    check.tensor("proj_bias", proj_bias, 1, "a 1-D bias (emb,)", optional=True)
    dim = x.shape[-1]
    emb = proj_weight.shape[0]
    check.shape("proj_weight", proj_weight, (emb, emb), "(square: emb x emb)")
    check.shape("kqv_weight", kqv_weight, (3 * emb, dim), "(3 * emb, x's last dim)")
    check.shape("kqv_bias", kqv_bias, (3 * emb,))
    check.shape("w", w, (None, emb), "(m random features, emb)")
    check.shape("proj_bias", proj_bias, (emb,))
    if w.shape[0] == 0:
        raise ValueError("w must have at least one random feature (m >= 1), got shape (0, emb)")
    eps = check.positive_float("eps", eps)
    dropout_p = check.probability("dropout_p", dropout_p)
    check.same_device("x", x, kqv_weight=kqv_weight, kqv_bias=kqv_bias, w=w, proj_weight=proj_weight, proj_bias=proj_bias)
    x, kqv_weight, kqv_bias, proj_weight, proj_bias = cast(
        autocast_dtype(x), x, kqv_weight, kqv_bias, proj_weight, proj_bias
    )
    check.same_dtype("x", x, kqv_weight=kqv_weight, proj_weight=proj_weight)
    with autocast_off(x):
        return backend.dispatch("performer_attention", x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p)
