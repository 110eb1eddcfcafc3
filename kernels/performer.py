"""Fused Performer attention (T2T-ViT's ``Token_performer.single_attn``): Triton kernels, launchers, ops.

Meaning (fastvit.reference.performer_attention; x: (B, T, dim) -> (B, T, emb), m random features)::

    k, q, v = split(x @ kqv_weight.T + kqv_bias, emb)             # k first
    phi(u)  = exp(u @ w.T - |u|^2 / 2) / sqrt(m)                  # fp32, w: (m, emb)
    ksum    = sum_t phi(k)          (B, m)      kptv = phi(k)^T v  (B, m, emb)     # fp32
    y       = phi(q) @ kptv / (phi(q) @ ksum + eps)                                # fp32
    out     = v + dropout(y.to(v.dtype) @ proj_weight.T + proj_bias)               # v's dtype

Passes (grid, what stays on chip)
---------------------------------
Forward, two kernels plus a tiny deterministic reduction:

1. ``_kside_fwd_kernel``, grid (B, SPLIT): each program owns a contiguous range of tokens of one
   batch and loops over BLOCK_T-token tiles. Per tile: the kqv GEMM for k and v (and q when kqv is
   saved, below) with the bias, rounded to the storage dtype as the eager linear rounds it; phi(k)
   in fp32; the reductions sum_t phi(k) and phi(k)^T v accumulate in registers. Each program writes
   its fp32 partials (m + m*emb floats); ``partials.sum(1)`` gives ksum, kptv -- no atomics.
2. ``_qside_fwd_kernel``, grid (B, cdiv(T, BLOCK_T)): the kqv GEMM for q and v (or their saved
   copies), phi(q), the normaliser, y, then the proj GEMM (emb x emb, on chip) with its bias, the
   fused dropout and the v skip in the epilogue. Only ``out`` is written.

Backward, three kernels (the sums ksum, kptv come from the forward; features are recomputed):

3. ``_qside_bwd_kernel``, grid (B, SPLIT): recompute q, phi(q), D, y; dz = dropout'(g); dy = dz P;
   per-program partials of dP = dz^T y, dproj_bias, dkptv = phi(q)^T (dy / D), dksum and (only when
   w requires grad) dw; writes dq into the (B, T, 3 emb) buffer dkqv.
4. ``_kside_bwd_kernel``, grid (B, SPLIT): recompute k, v, phi(k); with the reduced dkptv, dksum:
   dk, dv (= g + phi(k) dkptv), dw partials; writes dk, dv into dkqv (for the weight gradient) and
   dx = dkqv @ kqv_weight directly (the (3 emb, dim) weight streams from L2).
5. ``_wgrad_kernel``, grid (3emb/BLOCK_O, dim/BLOCK_D, SPLITK): dkqv_weight = dkqv^T x and
   dkqv_bias = sum dkqv, split-K with per-program fp32 partials summed afterwards (deterministic).

Recompute or save kqv: re-reading x (dim wide) costs more than writing and re-reading q, v (emb wide)
when dim is large. ``_save_kqv`` saves kqv (B, T, 3 emb) from pass 1 when that moves fewer bytes:
training (fwd+bwd) when 3 dim > 8 emb, inference when dim > 5 emb. T2T-ViT-14: dim 147 recomputes,
dim 576 saves.

Bytes moved (bf16, emb 64, m 32; X = x's bytes, O = one (B, T, emb) tensor's bytes; the fp32 sums
and partials are < 1 % and left out). "eager" counts each aten op of the reference chain reading its
inputs and writing its outputs (``benchmarks/bench_performer.py`` measures it on meta tensors):

=========================  ======================  ============  ============  ============
shape                      pass                    fastvit       formula       eager chain
=========================  ======================  ============  ============  ============
B128 T3136 dim147 (recomp) forward                 287 MB        2X + O        3.53 GB
                           backward                935 MB        4X + 9O       8.12 GB
B128 T784 dim576 (saves)   forward                 193 MB        X + 6O        0.97 GB
                           backward                385 MB        2X + 12O      2.21 GB
=========================  ======================  ============  ============  ============

Per pass, recompute mode: (1) X; (2) X + O; (3) X + g + dq = X + 2O; (4) X + g + dq + dk, dv + dx
= 2X + 4O; (5) dkqv + x = X + 3O. Save mode: (1) X + 3O (kqv); (2) 2O + O; (3) q + g + dq = 3O;
(4) k, v + g + dq + dk, dv + dx = X + 6O; (5) X + 3O.

Roofline (H100 SXM: ~989 TFLOP/s dense bf16, ~3.35 TB/s): T2T-ViT-14 layer 1 (B128, T3136, dim147)
forward ~40 GFLOP (kqv GEMM computed twice, 30 GFLOP) = 40 us of math against 287 MB = 86 us of
HBM traffic: memory-bound, floor ~86 us (the unavoidable x + out alone is 169 MB = 50 us);
backward 935 MB = 280 us. Layer 2 (B128, T784, dim576): forward 193 MB = 58 us, backward 385 MB =
115 us. Expected: within ~1.5-2x of these floors, >= 3x the eager chain (which moves 5-12x the bytes
in ~35 kernels) and well under half its activation memory (eager saves fp32 features and products).

Precision
---------
GEMMs with x, kqv_weight, proj_weight run in the storage dtype with fp32 accumulation; k, q, v are
rounded to the storage dtype (as the eager linear writes them). Features, sums, normaliser, y and
all of their gradients are fp32 and w is read in fp32. The feature dots (u w^T, phi^T v, phi kptv
and their backward twins) take fp32 operands; their ``tl.dot`` precision is chosen so their error
stays below the rounding of u itself: fp32 inputs -> ``kernels._common.input_precision`` (IEEE, or
TF32 where PyTorch allows it for matmuls, as the eager reference then does); bf16 -> "tf32" (u is
exact in TF32, w's TF32 rounding is 8x below bf16's); fp16 -> "tf32x3" (TF32 is as coarse as fp16).
Long sums over tokens done with ``tl.sum`` (sum_t phi(k), the bias gradients, d ksum) accumulate in
fp64 inside a program and are stored as fp32: a sequential fp32 sum over thousands of tokens loses
~sqrt(T) ulps, more than the eager (cascade) sums. Sums through ``tl.dot`` accumulate in fp32 as
the eager GEMMs do. Deterministic: no atomics; every reduction goes through per-program partial
buffers reduced by ``torch.sum`` afterwards.

Saved for the backward (outputs of the ``_fwd`` op): ksum (B, m) and kptv (B, m, emb) in fp32, and
in save mode kqv (B, T, 3 emb) in x's dtype; everything else is recomputed.

Overflow (safe range)
---------------------
With a = u w_j^T - |u|^2/2 = |w_j|^2/2 - |u - w_j|^2/2, the exponent never exceeds max_j |w_j|^2/2,
whatever x is. Let A be the largest exponent over the tokens of a batch (k and q). Every fp32
quantity stays finite (here and in the fp32 reference) while

    2 A + ln(T * max(1, max|v|)) < 88.7      (fp32's exp limit: the normaliser is <= T e^(2A))

e.g. A < 40 at T = 3136. A sufficient condition that ignores x: max_j |w_j|^2 + ln(T max(1, |v|))
< 88.7. T2T-ViT's w is orthogonal * sqrt(m), so |w_j|^2 = m = 32: always safe. Beyond the edge the
fp32 sums overflow: the affected batches get inf/NaN, as the fp32 reference does (the summation
order differs, so at the very threshold one may overflow where the other does not). Very negative
exponents underflow to 0 as in the reference: a token with phi(q) = 0 gets y = 0 / eps = 0.

Dropout
-------
Fused: the keep mask of ``dropout(proj)`` is Philox (``tl.rand``) keyed by a seed that the caller
draws from torch's generator for x's device (``draw_seed``), plus the batch index, at counter
t * emb + e. Reproducible under ``torch.manual_seed``; the backward regenerates the same mask.
Keep when rand >= p, kept values scaled by 1 / (1 - p) (p = 1 drops everything). The mask is not
the one ``F.dropout`` draws (same distribution, different stream); ``dropout_keep_mask`` returns it.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from fastvit._library import FusedOp, draw_seed, get_op, new_output, op_name, wire_autograd
from fastvit.kernels._common import autotune_configs, bucket, input_precision, interpreting, kernel_flags, wrap_triton

FN = "performer_attention"  # emb, m <= 128 and the other limits: fastvit.ops.performer._triton_why_not

# Fixed launch configuration under the interpreter (tests may shrink it to cover tails and loops).
INTERPRETER_TILES = {"BLOCK_T": 1024, "BLOCK_K": 1024, "SPLIT": 1, "BLOCK_R": 1024, "SPLITK": 1, "BLOCK_O": 256,
                     "BLOCK_D": 1024}
# None: decide by bytes (_save_kqv); True/False: force (tests of both modes).
FORCE_SAVE_KQV: Optional[bool] = None


# ----------------------------------------------------------------------------------------------
# Triton device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _project(x_ptr, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, c0, c1, c2, E,
             HAS_BIAS: tl.constexpr, NUM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
             BLOCK_K: tl.constexpr, IP: tl.constexpr):
    """NUM (1-3) projections of a token tile, x_t @ W[c_i : c_i + E].T + b[c_i : c_i + E], each rounded to
    x's dtype as the eager linear writes it and returned in fp32 (BLOCK_T, BLOCK_E); padded columns are 0."""
    DT = x_ptr.dtype.element_ty
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    acc0 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    acc1 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    acc2 = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for k0 in range(0, DIM, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < DIM
        xt = tl.load(x_ptr + offs_t[:, None] * sx_t + offs_k[None, :] * sx_d,
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        wmask = mask_k[:, None] & mask_e[None, :]
        w0 = tl.load(wk_ptr + (c0 + offs_e)[None, :] * sw_o + offs_k[:, None] * sw_i, mask=wmask, other=0.0)
        acc0 = tl.dot(xt, w0, acc0, input_precision=IP)
        if NUM >= 2:
            w1 = tl.load(wk_ptr + (c1 + offs_e)[None, :] * sw_o + offs_k[:, None] * sw_i, mask=wmask, other=0.0)
            acc1 = tl.dot(xt, w1, acc1, input_precision=IP)
        if NUM >= 3:
            w2 = tl.load(wk_ptr + (c2 + offs_e)[None, :] * sw_o + offs_k[:, None] * sw_i, mask=wmask, other=0.0)
            acc2 = tl.dot(xt, w2, acc2, input_precision=IP)
    if HAS_BIAS:
        acc0 += tl.load(bk_ptr + (c0 + offs_e) * sb, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        if NUM >= 2:
            acc1 += tl.load(bk_ptr + (c1 + offs_e) * sb, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        if NUM >= 3:
            acc2 += tl.load(bk_ptr + (c2 + offs_e) * sb, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    return acc0.to(DT).to(tl.float32), acc1.to(DT).to(tl.float32), acc2.to(DT).to(tl.float32)


@triton.jit
def _load_kqv(kqv_b, offs_t, mask_t, c0, c1, offs_e, mask_e, E):
    """Columns [c0, c0 + E) and [c1, c1 + E) of one batch's saved (T, 3E) kqv, in fp32."""
    ptr = kqv_b + offs_t[:, None] * (3 * E) + offs_e[None, :]
    mask = mask_t[:, None] & mask_e[None, :]
    return (tl.load(ptr + c0, mask=mask, other=0.0).to(tl.float32),
            tl.load(ptr + c1, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _features(u, wt, valid, sqrt_m, FIP: tl.constexpr):
    """phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m) in fp32; 0 outside ``valid`` (tail tokens, padded features)."""
    a = tl.dot(u, wt, input_precision=FIP) - 0.5 * tl.sum(u * u, axis=1)[:, None]
    return tl.where(valid, tl.exp(a) / sqrt_m, 0.0)


@triton.jit
def _keep(seed_ptr, pid_b, offs_t, offs_e, E, p_drop):
    """Dropout keep mask of batch pid_b's (tokens, emb) tile: Philox keyed by seed + batch."""
    seed = tl.load(seed_ptr).to(tl.int64) + pid_b
    return tl.rand(seed, offs_t[:, None] * E + offs_e[None, :]) >= p_drop


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _kside_fwd_kernel(
    x_ptr, sx_b, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, w_ptr, sw_m, sw_e,
    kqv_ptr, ps_ptr, pkv_ptr,
    T, DIM, E, M, CHUNK, SPLIT, sqrt_m,
    HAS_BIAS: tl.constexpr, SAVE_KQV: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    IP: tl.constexpr, FIP: tl.constexpr,
):
    """Pass 1: partial sum_t phi(k) (m) and phi(k)^T v (m, emb) over this program's tokens; saves kqv if asked."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    wt = tl.load(w_ptr + offs_m[None, :] * sw_m + offs_e[:, None] * sw_e,
                 mask=mask_e[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    xb = x_ptr + pid_b.to(tl.int64) * sx_b
    kqv_b = kqv_ptr + pid_b.to(tl.int64) * T * 3 * E
    s_acc = tl.zeros((BLOCK_M,), tl.float64)  # token sums in fp64: long sequential sums stay exact to fp32
    kv_acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, T)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        if SAVE_KQV:
            k, v, q = _project(xb, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, 0, 2 * E, E, E,
                               HAS_BIAS, 3, BLOCK_T, BLOCK_E, BLOCK_K, IP)
            ptr = kqv_b + offs_t[:, None] * (3 * E) + offs_e[None, :]
            te = mask_t[:, None] & mask_e[None, :]
            tl.store(ptr, k.to(DT), mask=te)
            tl.store(ptr + E, q.to(DT), mask=te)
            tl.store(ptr + 2 * E, v.to(DT), mask=te)
        else:
            k, v, _unused = _project(xb, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, 0, 2 * E, 0,
                                     E, HAS_BIAS, 2, BLOCK_T, BLOCK_E, BLOCK_K, IP)
        phik = _features(k, wt, mask_t[:, None] & mask_m[None, :], sqrt_m, FIP)
        s_acc += tl.sum(phik.to(tl.float64), axis=0)
        kv_acc = tl.dot(tl.trans(phik), v, kv_acc, input_precision=FIP)
    part = pid_b * SPLIT + pid_s
    tl.store(ps_ptr + part * M + offs_m, s_acc.to(tl.float32), mask=mask_m)
    tl.store(pkv_ptr + part.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], kv_acc,
             mask=mask_m[:, None] & mask_e[None, :])


@triton.jit
def _qside_fwd_kernel(
    x_ptr, sx_b, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, w_ptr, sw_m, sw_e,
    p_ptr, sp_o, sp_i, pb_ptr, spb, ksum_ptr, kptv_ptr, kqv_ptr, seed_ptr, out_ptr,
    T, DIM, E, M, sqrt_m, eps, p_drop, drop_scale,
    HAS_BIAS: tl.constexpr, HAS_PBIAS: tl.constexpr, FROM_KQV: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    IP: tl.constexpr, FIP: tl.constexpr,
):
    """Pass 2: out = v + dropout((phi(q) kptv / (phi(q) ksum + eps)) P^T + pb) for one token tile."""
    pid_b = tl.program_id(0)
    pid_t = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if FROM_KQV:
        kqv_b = kqv_ptr + pid_b.to(tl.int64) * T * 3 * E
        q, v = _load_kqv(kqv_b, offs_t, mask_t, E, 2 * E, offs_e, mask_e, E)
    else:
        xb = x_ptr + pid_b.to(tl.int64) * sx_b
        q, v, _unused = _project(xb, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, E, 2 * E, 0, E,
                                 HAS_BIAS, 2, BLOCK_T, BLOCK_E, BLOCK_K, IP)
    wt = tl.load(w_ptr + offs_m[None, :] * sw_m + offs_e[:, None] * sw_e,
                 mask=mask_e[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    phiq = _features(q, wt, mask_t[:, None] & mask_m[None, :], sqrt_m, FIP)
    ksum = tl.load(ksum_ptr + pid_b * M + offs_m, mask=mask_m, other=0.0)
    kptv = tl.load(kptv_ptr + pid_b.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :],
                   mask=mask_m[:, None] & mask_e[None, :], other=0.0)
    d = tl.sum(phiq * ksum[None, :], axis=1) + eps
    y = tl.dot(phiq, kptv, input_precision=FIP) / d[:, None]
    pt = tl.load(p_ptr + offs_e[None, :] * sp_o + offs_e[:, None] * sp_i,
                 mask=mask_e[:, None] & mask_e[None, :], other=0.0)
    z = tl.dot(y.to(DT), pt, input_precision=IP)
    if HAS_PBIAS:
        z += tl.load(pb_ptr + offs_e * spb, mask=mask_e, other=0.0).to(tl.float32)[None, :]
    if DROPOUT:
        z = tl.where(_keep(seed_ptr, pid_b, offs_t, offs_e, E, p_drop), z * drop_scale, 0.0)
    out = v + z
    tl.store(out_ptr + pid_b.to(tl.int64) * T * E + offs_t[:, None] * E + offs_e[None, :], out.to(DT),
             mask=mask_t[:, None] & mask_e[None, :])


@triton.jit
def _qside_bwd_kernel(
    g_ptr, sg_b, sg_t, sg_e,
    x_ptr, sx_b, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, w_ptr, sw_m, sw_e,
    p_ptr, sp_o, sp_i, ksum_ptr, kptv_ptr, kqv_ptr, seed_ptr,
    dkqv_ptr, pdk_ptr, pds_ptr, pdw_ptr, pdp_ptr, pdpb_ptr,
    T, DIM, E, M, CHUNK, SPLIT, sqrt_m, eps, p_drop, drop_scale,
    HAS_BIAS: tl.constexpr, FROM_KQV: tl.constexpr, DROPOUT: tl.constexpr, NEED_DQ: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    IP: tl.constexpr, FIP: tl.constexpr,
):
    """Backward, q side: dq, and partials of dP, dpb, d kptv, d ksum, dw over this program's tokens."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    me = mask_m[:, None] & mask_e[None, :]
    wt = tl.load(w_ptr + offs_m[None, :] * sw_m + offs_e[:, None] * sw_e,
                 mask=mask_e[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    wn = tl.load(w_ptr + offs_m[:, None] * sw_m + offs_e[None, :] * sw_e, mask=me, other=0.0).to(tl.float32)
    ksum = tl.load(ksum_ptr + pid_b * M + offs_m, mask=mask_m, other=0.0)
    kptv = tl.load(kptv_ptr + pid_b.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], mask=me, other=0.0)
    pn = tl.load(p_ptr + offs_e[:, None] * sp_o + offs_e[None, :] * sp_i,
                 mask=mask_e[:, None] & mask_e[None, :], other=0.0)
    xb = x_ptr + pid_b.to(tl.int64) * sx_b
    gb = g_ptr + pid_b.to(tl.int64) * sg_b
    kqv_b = kqv_ptr + pid_b.to(tl.int64) * T * 3 * E
    dkqv_b = dkqv_ptr + pid_b.to(tl.int64) * T * 3 * E
    dk_acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), tl.float64)  # token sums in fp64 (see _kside_fwd_kernel)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    dp_acc = tl.zeros((BLOCK_E, BLOCK_E), tl.float32)
    dpb_acc = tl.zeros((BLOCK_E,), tl.float64)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, T)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        te = mask_t[:, None] & mask_e[None, :]
        if FROM_KQV:
            q = tl.load(kqv_b + offs_t[:, None] * (3 * E) + E + offs_e[None, :], mask=te, other=0.0).to(tl.float32)
        else:
            q, _u1, _u2 = _project(xb, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, E, 0, 0, E,
                                   HAS_BIAS, 1, BLOCK_T, BLOCK_E, BLOCK_K, IP)
        phiq = _features(q, wt, mask_t[:, None] & mask_m[None, :], sqrt_m, FIP)
        d = tl.sum(phiq * ksum[None, :], axis=1) + eps
        y = tl.dot(phiq, kptv, input_precision=FIP) / d[:, None]
        yc = y.to(DT)
        g = tl.load(gb + offs_t[:, None] * sg_t + offs_e[None, :] * sg_e, mask=te, other=0.0).to(tl.float32)
        if DROPOUT:
            g = tl.where(_keep(seed_ptr, pid_b, offs_t, offs_e, E, p_drop), g * drop_scale, 0.0)
        dzc = g.to(DT)  # the gradient of the proj output, in the storage dtype as eager has it
        dp_acc = tl.dot(tl.trans(dzc), yc, dp_acc, input_precision=IP)
        dpb_acc += tl.sum(dzc.to(tl.float64), axis=0)
        dy = tl.dot(dzc, pn, input_precision=IP)
        dnum = dy / d[:, None]
        dd = -tl.sum(dy * y, axis=1) / d
        dphi = tl.dot(dnum, tl.trans(kptv), input_precision=FIP) + dd[:, None] * ksum[None, :]
        gphi = dphi * phiq
        if NEED_DQ:
            dq = tl.dot(gphi, wn, input_precision=FIP) - tl.sum(gphi, axis=1)[:, None] * q
            tl.store(dkqv_b + offs_t[:, None] * (3 * E) + E + offs_e[None, :], dq.to(DT), mask=te)
        dk_acc = tl.dot(tl.trans(phiq), dnum, dk_acc, input_precision=FIP)
        ds_acc += tl.sum((phiq * dd[:, None]).to(tl.float64), axis=0)
        if NEED_W:
            dw_acc = tl.dot(tl.trans(gphi), q, dw_acc, input_precision=FIP)
    part = pid_b * SPLIT + pid_s
    tl.store(pdk_ptr + part.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], dk_acc, mask=me)
    tl.store(pds_ptr + part * M + offs_m, ds_acc.to(tl.float32), mask=mask_m)
    if NEED_W:
        tl.store(pdw_ptr + part.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], dw_acc, mask=me)
    tl.store(pdp_ptr + part.to(tl.int64) * E * E + offs_e[:, None] * E + offs_e[None, :], dp_acc,
             mask=mask_e[:, None] & mask_e[None, :])
    tl.store(pdpb_ptr + part * E + offs_e, dpb_acc.to(tl.float32), mask=mask_e)


@triton.jit
def _kside_bwd_kernel(
    g_ptr, sg_b, sg_t, sg_e,
    x_ptr, sx_b, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, w_ptr, sw_m, sw_e,
    kqv_ptr, dkptv_ptr, dksum_ptr, dkqv_ptr, dx_ptr, pdw_ptr,
    T, DIM, E, M, CHUNK, SPLIT, sqrt_m,
    HAS_BIAS: tl.constexpr, FROM_KQV: tl.constexpr, NEED_DX: tl.constexpr, STORE_DKQV: tl.constexpr,
    NEED_W: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
    IP: tl.constexpr, FIP: tl.constexpr,
):
    """Backward, k side: dk, dv; dx = [dk, dq, dv] @ kqv_weight; partial dw over this program's tokens."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    offs_e = tl.arange(0, BLOCK_E)
    mask_e = offs_e < E
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    me = mask_m[:, None] & mask_e[None, :]
    wt = tl.load(w_ptr + offs_m[None, :] * sw_m + offs_e[:, None] * sw_e,
                 mask=mask_e[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    wn = tl.load(w_ptr + offs_m[:, None] * sw_m + offs_e[None, :] * sw_e, mask=me, other=0.0).to(tl.float32)
    dkptv = tl.load(dkptv_ptr + pid_b.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], mask=me, other=0.0)
    dksum = tl.load(dksum_ptr + pid_b * M + offs_m, mask=mask_m, other=0.0)
    xb = x_ptr + pid_b.to(tl.int64) * sx_b
    gb = g_ptr + pid_b.to(tl.int64) * sg_b
    kqv_b = kqv_ptr + pid_b.to(tl.int64) * T * 3 * E
    dkqv_b = dkqv_ptr + pid_b.to(tl.int64) * T * 3 * E
    dxb = dx_ptr + pid_b.to(tl.int64) * T * DIM
    dw_acc = tl.zeros((BLOCK_M, BLOCK_E), tl.float32)
    start = pid_s * CHUNK
    end = tl.minimum(start + CHUNK, T)
    for t0 in range(start, end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < end
        te = mask_t[:, None] & mask_e[None, :]
        if FROM_KQV:
            k, v = _load_kqv(kqv_b, offs_t, mask_t, 0, 2 * E, offs_e, mask_e, E)
        else:
            k, v, _unused = _project(xb, sx_t, sx_d, wk_ptr, sw_o, sw_i, bk_ptr, sb, offs_t, mask_t, DIM, 0, 2 * E, 0,
                                     E, HAS_BIAS, 2, BLOCK_T, BLOCK_E, BLOCK_K, IP)
        phik = _features(k, wt, mask_t[:, None] & mask_m[None, :], sqrt_m, FIP)
        g = tl.load(gb + offs_t[:, None] * sg_t + offs_e[None, :] * sg_e, mask=te, other=0.0).to(tl.float32)
        dphi = tl.dot(v, tl.trans(dkptv), input_precision=FIP) + dksum[None, :]
        gphi = dphi * phik
        dk = tl.dot(gphi, wn, input_precision=FIP) - tl.sum(gphi, axis=1)[:, None] * k
        dv = g + tl.dot(phik, dkptv, input_precision=FIP)
        if NEED_W:
            dw_acc = tl.dot(tl.trans(gphi), k, dw_acc, input_precision=FIP)
        dkc = dk.to(DT)
        dvc = dv.to(DT)
        dptr = dkqv_b + offs_t[:, None] * (3 * E) + offs_e[None, :]
        if STORE_DKQV:
            tl.store(dptr, dkc, mask=te)
            tl.store(dptr + 2 * E, dvc, mask=te)
        if NEED_DX:
            dqc = tl.load(dptr + E, mask=te, other=0.0)
            for k0 in range(0, DIM, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < DIM
                wmask = mask_e[:, None] & mask_k[None, :]
                wkk = tl.load(wk_ptr + offs_e[:, None] * sw_o + offs_k[None, :] * sw_i, mask=wmask, other=0.0)
                wqq = tl.load(wk_ptr + (E + offs_e)[:, None] * sw_o + offs_k[None, :] * sw_i, mask=wmask, other=0.0)
                wvv = tl.load(wk_ptr + (2 * E + offs_e)[:, None] * sw_o + offs_k[None, :] * sw_i, mask=wmask, other=0.0)
                dx = tl.dot(dkc, wkk, input_precision=IP)
                dx = tl.dot(dqc, wqq, dx, input_precision=IP)
                dx = tl.dot(dvc, wvv, dx, input_precision=IP)
                tl.store(dxb + offs_t[:, None] * DIM + offs_k[None, :], dx.to(DT),
                         mask=mask_t[:, None] & mask_k[None, :])
    if NEED_W:
        part = pid_b * SPLIT + pid_s
        tl.store(pdw_ptr + part.to(tl.int64) * M * E + offs_m[:, None] * E + offs_e[None, :], dw_acc, mask=me)


@triton.jit
def _wgrad_kernel(
    dkqv_ptr, x_ptr, sx_b, sx_t, sx_d, pw_ptr, pb_ptr,
    N, T, DIM, E3, ROWS, N_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
    IP: tl.constexpr,
):
    """Split-K weight gradient: partial dkqv^T x (3 emb, dim) and column sums of dkqv over ROWS token rows."""
    pid_o = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < E3
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < DIM
    acc = tl.zeros((BLOCK_O, BLOCK_D), tl.float32)
    bacc = tl.zeros((BLOCK_O,), tl.float64)  # row sums in fp64 (see _kside_fwd_kernel)
    start = pid_s * ROWS
    end = tl.minimum(start + ROWS, N)
    for r0 in range(start, end, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < end
        a = tl.load(dkqv_ptr + offs_r.to(tl.int64)[:, None] * E3 + offs_o[None, :],
                    mask=mask_r[:, None] & mask_o[None, :], other=0.0)
        rb = (offs_r // T).to(tl.int64)
        rt = offs_r % T
        xt = tl.load(x_ptr + rb[:, None] * sx_b + rt[:, None] * sx_t + offs_d[None, :] * sx_d,
                     mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), xt, acc, input_precision=IP)
        if HAS_BIAS:
            bacc += tl.sum(a.to(tl.float64), axis=0)
    tl.store(pw_ptr + pid_s.to(tl.int64) * E3 * DIM + offs_o[:, None] * DIM + offs_d[None, :], acc,
             mask=mask_o[:, None] & mask_d[None, :])
    if HAS_BIAS:
        first = (offs_o * 0 + pid_d) == 0  # one writer per column block (a tensor mask: the interpreter wants one)
        tl.store(pb_ptr + pid_s * E3 + offs_o, bacc.to(tl.float32), mask=mask_o & first)


@triton.jit
def _keep_mask_kernel(seed_ptr, keep_ptr, T, E, p_drop, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """The dropout keep mask the kernels use, as int8 (B, T, E) (for tests and debugging)."""
    pid_b = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    keep = _keep(seed_ptr, pid_b, offs_t, offs_e, E, p_drop)
    tl.store(keep_ptr + pid_b.to(tl.int64) * T * E + offs_t[:, None] * E + offs_e[None, :], keep.to(tl.int8),
             mask=(offs_t < T)[:, None] & (offs_e < E)[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

_TILE_KERNELS = {
    "kside_fwd": _kside_fwd_kernel,
    "qside_fwd": _qside_fwd_kernel,
    "qside_bwd": _qside_bwd_kernel,
    "kside_bwd": _kside_bwd_kernel,
}
_TUNED: dict = {}


def _tile_configs(fp32: bool = False):
    # (BLOCK_T, BLOCK_K, warps, stages). BLOCK_T <= 128 = the chunk alignment of _split. The backward
    # kernels hold ~10 (BLOCK_T, emb) fp32 tiles: at sm_90 (tests/sm90.py's report, T2T-ViT-14's dims 147
    # and 576) every 16-bit config with 64- or 128-token tiles, or 4 warps at BLOCK_K 64, spilled in
    # _qside_bwd / _kside_bwd / _kside_fwd (24-736 stack bytes); these four spill in none of them. fp32
    # operands (FMA dots) spill more: 16-token tiles on 8 warps keep it to one kernel (_qside_bwd, 440 B),
    # where 4 warps or 32-token tiles left it with 32 registers and 5.4-5.7 KB of stack.
    table = [(16, 64, 8, 2), (16, 32, 8, 2)] if fp32 else [(32, 64, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_K": bk}, num_warps=nw, num_stages=ns) for bt, bk, nw, ns in table]


def _wgrad_configs():
    return [
        triton.Config({"BLOCK_O": bo, "BLOCK_D": bd, "BLOCK_R": br}, num_warps=nw, num_stages=ns)
        for bo, bd, br, nw, ns in [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 4),
                                   (64, 64, 32, 4, 4)]
    ]


def _tuned(name: str, fp32: bool = False):
    """The GPU entry point: the kernel autotuned over a few configurations (created lazily); the token-tile
    kernels have an fp32 list of their own, the weight-gradient GEMM one list."""
    fp32 = fp32 and name != "wgrad"
    if (name, fp32) not in _TUNED:
        if name == "wgrad":
            key = ["N_BUCKET", "DIM", "E3", "HAS_BIAS", "IP"]  # N = batch x tokens, bucketed: a new batch does not re-tune
            _TUNED[(name, fp32)] = triton.autotune(autotune_configs(_wgrad_configs()), key=key)(_wgrad_kernel)
        else:  # T (tokens per image), the widths, and every flag that changes the compiled kernel
            kernel = _TILE_KERNELS[name]
            key = ["T", "DIM", "E", "M", *kernel_flags(kernel)]
            _TUNED[(name, fp32)] = triton.autotune(autotune_configs(_tile_configs(fp32)), key=key)(kernel)
    return _TUNED[(name, fp32)]


def _fixed(device: torch.device) -> bool:
    """One fixed configuration: under the interpreter, and when tracing CPU fake tensors (no GPU to tune on)."""
    return interpreting() or device.type != "cuda"


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def _tile_meta(T: int, dim: int) -> dict:
    """The fixed configuration: one tile as large as the sequence (capped), the whole dim in one K step."""
    cap = INTERPRETER_TILES
    return {"BLOCK_T": min(cap["BLOCK_T"], _pow2(T)), "BLOCK_K": min(cap["BLOCK_K"], _pow2(dim))}


def _launch(name: str, device, grid, args, consts, fixed_meta):
    if _fixed(device):
        kernel = _wgrad_kernel if name == "wgrad" else _TILE_KERNELS[name]
        wrap_triton(kernel)[grid(fixed_meta)](*args, **consts, **fixed_meta)
    else:
        wrap_triton(_tuned(name, args[0].dtype == torch.float32))[grid](*args, **consts)


def _split(B: int, T: int, device: torch.device) -> tuple[int, int]:
    """(SPLIT, CHUNK): each (batch, split) program of the reducing kernels owns CHUNK consecutive tokens."""
    if _fixed(device):
        want, align = INTERPRETER_TILES["SPLIT"], _tile_meta(T, 16)["BLOCK_T"]
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want, align = triton.cdiv(2 * sms, B), 128
    chunk = triton.cdiv(triton.cdiv(T, max(1, want)), align) * align
    return triton.cdiv(T, chunk), chunk


def _splitk(N: int, device: torch.device) -> tuple[int, int]:
    """(SPLITK, ROWS) of the weight-gradient GEMM."""
    if _fixed(device):
        want, align = INTERPRETER_TILES["SPLITK"], min(INTERPRETER_TILES["BLOCK_R"], _pow2(N))
    else:
        want, align = min(64, triton.cdiv(N, 2048)), 64
    rows = triton.cdiv(triton.cdiv(N, max(1, want)), align) * align
    return triton.cdiv(N, rows), rows


def _feature_precision(dtype: torch.dtype) -> str:
    """tl.dot precision of the fp32 feature dots (see the module docstring)."""
    if dtype == torch.float32:
        return input_precision(dtype)
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


def _save_kqv(dim: int, emb: int, training: bool) -> bool:
    """Save kqv in pass 1 instead of re-reading x, when that moves fewer bytes (module docstring)."""
    if FORCE_SAVE_KQV is not None:
        return FORCE_SAVE_KQV
    return 3 * dim > 8 * emb if training else dim > 5 * emb


def _common(x, kqv_weight, kqv_bias, w):
    """Arguments every token-tile kernel takes first, and its shared constexprs."""
    bk = kqv_bias if kqv_bias is not None else x  # never read without HAS_BIAS
    args = (x, *x.stride(), kqv_weight, *kqv_weight.stride(), bk, kqv_bias.stride(0) if kqv_bias is not None else 0,
            w, *w.stride())
    E, M = kqv_weight.shape[0] // 3, w.shape[0]
    consts = {"HAS_BIAS": kqv_bias is not None, "BLOCK_E": _pow2(E), "BLOCK_M": _pow2(M),
              "IP": input_precision(x.dtype), "FIP": _feature_precision(x.dtype)}
    return args, consts


def _ptr(t: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
    """``t``, or a real tensor standing in for an empty one at a pointer argument the kernel never touches."""
    return t if t.numel() > 0 else dummy


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor], x: torch.Tensor):
    drop = dropout_p > 0
    if drop and seed is None:
        raise ValueError("performer_attention: dropout_p > 0 needs a seed tensor (draw_seed)")
    scale = 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
    return drop, (seed if drop else x), scale


def _forward(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, training):
    B, T, DIM = x.shape
    E, M = proj_weight.shape[0], w.shape[0]
    dev, dt = x.device, x.dtype
    save = _save_kqv(DIM, E, training)
    kqv = new_output((B, T, 3 * E), dtype=dt, device=dev) if save else x.new_empty((0,))
    if B * T == 0:  # no tokens: an empty output, and token sums of zero (as the reference gives)
        f32 = {"dtype": torch.float32, "device": dev}
        return x.new_zeros((B, T, E)), torch.zeros((B, M), **f32), torch.zeros((B, M, E), **f32), kqv
    args, consts = _common(x, kqv_weight, kqv_bias, w)
    split, chunk = _split(B, T, dev)
    ps = new_output((B, split, M), dtype=torch.float32, device=dev)
    pkv = new_output((B, split, M, E), dtype=torch.float32, device=dev)
    meta = _tile_meta(T, DIM)
    sqrt_m = math.sqrt(M)
    _launch("kside_fwd", dev, lambda META: (B, split),
            (*args, _ptr(kqv, x), ps, pkv, T, DIM, E, M, chunk, split, sqrt_m), {**consts, "SAVE_KQV": save}, meta)
    ksum, kptv = ps.sum(1), pkv.sum(1)
    drop, seed_arg, scale = _dropout_args(dropout_p, seed, x)
    out = new_output((B, T, E), dtype=dt, device=dev)
    pb = proj_bias if proj_bias is not None else proj_weight
    _launch("qside_fwd", dev, lambda META: (B, triton.cdiv(T, META["BLOCK_T"])),
            (*args, proj_weight, *proj_weight.stride(), pb, proj_bias.stride(0) if proj_bias is not None else 0,
             ksum, kptv, _ptr(kqv, x), seed_arg, out, T, DIM, E, M, sqrt_m, eps, dropout_p, scale),
            {**consts, "HAS_PBIAS": proj_bias is not None, "FROM_KQV": save, "DROPOUT": drop}, meta)
    return out, ksum, kptv, kqv


def _backward(g, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, ksum, kptv, kqv,
              need_dx, need_dkqv, need_dw):
    B, T, DIM = x.shape
    E, M = proj_weight.shape[0], w.shape[0]
    dev, dt = x.device, x.dtype
    if B * T == 0:  # no tokens: zero parameter gradients, an empty dx
        def zeros_or_empty(need, t):  # a fresh tensor each: op outputs may not alias each other
            return torch.zeros_like(t) if need and t is not None else x.new_empty((0,))

        dx = x.new_zeros((B, T, DIM)) if need_dx else x.new_empty((0,))
        return (dx, zeros_or_empty(need_dkqv, kqv_weight), zeros_or_empty(need_dkqv, kqv_bias),
                zeros_or_empty(need_dw, w), torch.zeros_like(proj_weight), zeros_or_empty(True, proj_bias))
    args, consts = _common(x, kqv_weight, kqv_bias, w)
    from_kqv = kqv.numel() > 0
    drop, seed_arg, scale = _dropout_args(dropout_p, seed, x)
    split, chunk = _split(B, T, dev)
    meta = _tile_meta(T, DIM)
    sqrt_m = math.sqrt(M)
    f32 = {"dtype": torch.float32, "device": dev}

    def empty():  # a fresh one per unused output: op outputs may not alias each other
        return x.new_empty((0,))

    need_dq = need_dx or need_dkqv
    dkqv = new_output((B, T, 3 * E), dtype=dt, device=dev) if need_dq else empty()
    pdk, pds = new_output((B, split, M, E), **f32), new_output((B, split, M), **f32)
    pdw = new_output((2, B, split, M, E), **f32) if need_dw else x.new_empty((2, 0), dtype=torch.float32)
    pdp, pdpb = new_output((B, split, E, E), **f32), new_output((B, split, E), **f32)
    gargs = (g, *g.stride())
    _launch("qside_bwd", dev, lambda META: (B, split),
            (*gargs, *args, proj_weight, *proj_weight.stride(), ksum, kptv, _ptr(kqv, x), seed_arg,
             _ptr(dkqv, x), pdk, pds, _ptr(pdw[0], pdk), pdp, pdpb,
             T, DIM, E, M, chunk, split, sqrt_m, eps, dropout_p, scale),
            {**consts, "FROM_KQV": from_kqv, "DROPOUT": drop, "NEED_DQ": need_dq, "NEED_W": need_dw}, meta)
    dx = new_output((B, T, DIM), dtype=dt, device=dev) if need_dx else empty()
    if need_dq or need_dw:
        dkptv, dksum = pdk.sum(1), pds.sum(1)
        _launch("kside_bwd", dev, lambda META: (B, split),
                (*gargs, *args, _ptr(kqv, x), dkptv, dksum, _ptr(dkqv, x), _ptr(dx, x), _ptr(pdw[1], pdk),
                 T, DIM, E, M, chunk, split, sqrt_m),
                {**consts, "FROM_KQV": from_kqv, "NEED_DX": need_dx, "STORE_DKQV": need_dkqv, "NEED_W": need_dw},
                meta)
    dW, db = empty(), empty()
    if need_dkqv:
        N = B * T
        splitk, rows = _splitk(N, dev)
        pw = new_output((splitk, 3 * E, DIM), **f32)
        pbias = new_output((splitk, 3 * E), **f32) if kqv_bias is not None else pw
        cap = INTERPRETER_TILES
        wmeta = {"BLOCK_O": min(cap["BLOCK_O"], _pow2(3 * E)), "BLOCK_D": min(cap["BLOCK_D"], _pow2(DIM)),
                 "BLOCK_R": min(cap["BLOCK_R"], _pow2(N))}
        _launch("wgrad", dev,
                lambda META: (triton.cdiv(3 * E, META["BLOCK_O"]), triton.cdiv(DIM, META["BLOCK_D"]), splitk),
                (dkqv, x, *x.stride(), pw, pbias, N, T, DIM, 3 * E, rows, bucket(N)),
                {"HAS_BIAS": kqv_bias is not None, "IP": input_precision(dt)}, wmeta)
        dW = pw.sum(0).to(kqv_weight.dtype)
        if kqv_bias is not None:
            db = pbias.sum(0).to(kqv_bias.dtype)
    dP = pdp.sum((0, 1)).to(proj_weight.dtype)
    dpb = pdpb.sum((0, 1)).to(proj_bias.dtype) if proj_bias is not None else empty()
    dw = pdw.sum((0, 1, 2)).to(w.dtype) if need_dw else empty()
    return dx, dW, db, dw, dP, dpb


# ----------------------------------------------------------------------------------------------
# torch.library ops (fastvit._library's scheme) and the entry point
# ----------------------------------------------------------------------------------------------


@triton_op(op_name(FN, "triton", "fwd"), mutates_args=())
def _fwd_op(
    x: torch.Tensor, kqv_weight: torch.Tensor, kqv_bias: Optional[torch.Tensor], w: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], eps: float, dropout_p: float,
    seed: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, ksum (B, m) fp32, kptv (B, m, emb) fp32, kqv (B, T, 3 emb) or empty): what the backward needs."""
    return _forward(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, True)


@triton_op(op_name(FN, "triton", "infer"), mutates_args=())
def _infer_op(
    x: torch.Tensor, kqv_weight: torch.Tensor, kqv_bias: Optional[torch.Tensor], w: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], eps: float, dropout_p: float,
    seed: Optional[torch.Tensor],
) -> torch.Tensor:
    return _forward(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, False)[0]


@triton_op(op_name(FN, "triton", "bwd"), mutates_args=())
def _bwd_op(
    grad_out: torch.Tensor, x: torch.Tensor, kqv_weight: torch.Tensor, kqv_bias: Optional[torch.Tensor],
    w: torch.Tensor, proj_weight: torch.Tensor, proj_bias: Optional[torch.Tensor], eps: float, dropout_p: float,
    seed: Optional[torch.Tensor], ksum: torch.Tensor, kptv: torch.Tensor, kqv: torch.Tensor,
    need_dx: bool, need_dkqv: bool, need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dkqv_weight, dkqv_bias, dw, dproj_weight, dproj_bias); the ones not asked for are empty."""
    return _backward(grad_out, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed,
                     ksum, kptv, kqv, need_dx, need_dkqv, need_dw)


def _autograd_backward(saved, grads):
    x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed = saved.inputs
    _, ksum, kptv, kqv = saved.outputs
    n = saved.needs_input_grad
    dx, dW, db, dw, dP, dpb = get_op(FN, "triton", "bwd")(
        grads[0], x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, ksum, kptv, kqv,
        n[0], n[1] or n[2], n[3],
    )
    pick = lambda need, t: t if need else None  # noqa: E731
    return (pick(n[0], dx), pick(n[1], dW), pick(n[2], db), pick(n[3], dw), pick(n[4], dP), pick(n[5], dpb),
            None, None, None)


wire_autograd(FN, "triton", num_outputs=1, backward=_autograd_backward)
_op = FusedOp(FN, "triton", num_outputs=1)


def performer_attention(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps=1e-8, dropout_p=0.0):
    """The Triton backend of ``fastvit.ops.performer_attention`` (arguments checked and autocast by the front).

    x: (B, T, dim), kqv_weight: (3 emb, dim), w: (m, emb), proj_weight: (emb, emb) -> (B, T, emb) in x's
    dtype. Dropout (``dropout_p > 0``) is fused: Philox keyed by a seed drawn here from torch's
    generator (see the module docstring).
    """
    seed = draw_seed(x.device) if dropout_p > 0 else None
    return _op(x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, float(eps), float(dropout_p), seed)


def dropout_keep_mask(seed: torch.Tensor, B: int, T: int, emb: int, dropout_p: float) -> torch.Tensor:
    """The keep mask (bool (B, T, emb)) the kernels apply to the proj output for this seed."""
    keep = torch.empty((B, T, emb), dtype=torch.int8, device=seed.device)
    bt = 64
    _keep_mask_kernel[(B, triton.cdiv(T, bt))](seed, keep, T, emb, float(dropout_p), BLOCK_T=bt, BLOCK_E=_pow2(emb))
    return keep.bool()
