"""MLP family in Triton: LayerNorm, and LayerNorm -> fc1 + GELU -> fc2 (+ residual), forward and backward.

Read top to bottom: the jitted kernels, the launchers (flatten to rows, pick tiles and grids), then
the torch.library ops (``_fwd`` / ``_infer`` / ``_bwd`` per function) and their autograd wiring.

Kernels
-------
- ``_ln_fwd_kernel``: BLOCK_M rows per program, the whole row in registers (BLOCK_C = next pow2 of C).
  Mean and variance come from the registers in two passes (plus one correction of the mean), so
  data at mean 1000 keeps its precision; fp32 mean/rstd are saved for the backward.
- ``_ln_bwd_kernel``: a fixed number P of programs, each looping over row blocks (pid, pid + P, ...):
  dx per row, and dW/dB accumulated per program in fp32 and stored to a (P, C) partial buffer that
  is summed afterwards -- deterministic, no atomics, and blocked sums (not one long sequential sum).
- ``_mm_kernel``: one tiled GEMM ``C[m, n] = sum_k A[m, k] B[n, k]`` on any strides (so X @ W^T,
  dY @ W and dY^T @ X are the same kernel), fp32 accumulation, grouped tile order, optional split-K
  into an fp32 partial buffer, and constexpr epilogues:
  1 = + bias, then the activation (ACT: exact erf GELU, tanh GELU or QuickGELU; optionally also
  storing the pre-activation),
  2 = + bias (+ residual, read on its own strides, stored in the output dtype),
  3 = * act'(pre-activation) (dGELU and its variants), with the column sums of the result (fc1's bias gradient) and,
      in the pid_n == 0 programs after the main loop, the column sums of A (fc2's bias gradient),
      both into per-row-block fp32 partial buffers.

layernorm_mlp, M = rows, C -> H -> C_out, GEMM dtype g:
  forward: LN writes h = LN(x) in g once (h is also what fc1's weight gradient needs), fc1 writes
  GELU(h W1^T + b1) and, when training, the pre-activation (saved; see below), fc2 writes
  out = act W2^T + b2 (+ residual).
  backward: dA = (dY W2) * GELU'(pre) (+ db1, db2 partials), dW2 = dY^T act, dW1 = dA^T h
  (split-K over rows when the tile grid would leave SMs idle), dh = dA W1 (written in g, as eager
  does), then the LN backward as one kernel (dx and the dW/dB partials). The LN backward is not in
  the dh GEMM's epilogue: that needs whole rows per program (BLOCK_N >= C = 768-1024 at ViT sizes),
  a tile too large for the registers.
  Determinism: no atomics anywhere; every reduction across programs goes through an fp32 partial
  buffer (per program, per row block or per split) summed afterwards by torch in a fixed order.

Pre-activation saved rather than recomputed: the backward needs both GELU'(pre) (dGELU epilogue)
and act = GELU(pre) (operand of dW2). Saving pre costs one M x H write in the forward and one read
in the backward (~0.2 ms at ViT-B, bf16, batch 256, at 3.35 TB/s); recomputing it is a whole extra
GEMM (M x C x H, ~0.25 ms at peak and more in practice), and recomputing act from pre inside dW2's
main loop puts erf on C_out / BLOCK_M copies of every element in the GEMM's critical path. Eager
PyTorch saves the same two M x H tensors (fc1's output for GELU's backward, GELU's output for fc2's).

Dropout (dropout_p > 0) is not fused: the launcher in fastvit/ops/mlp.py hands such calls to the
eager reference (documented there); these ops are the dropout-free path.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastvit._library import FusedOp, get_op, new_output, op_name, wire_autograd
from fastvit.kernels._common import autotune_configs, bucket, input_precision, interpreting, wrap_triton

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
# the ``activation`` names of fastvit.ops.layernorm_mlp -> the kernels' ACT code
ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "quick_gelu": 2}


@triton.jit
def _ln_fwd_kernel(
    X, W, B, Y, MEAN, RSTD,
    M, C, stride_xm, stride_xc, stride_ym, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = (x - mean) * rstd * w + b over rows of x (M, C); y contiguous rows (stride_ym)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < M
    cmask = cols < C
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    # One correction of the mean (the rounding error of the first sum), then the variance of the
    # centred data: no E[x^2] - E[x]^2 cancellation at large offsets.
    mean += tl.sum(xc, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(
    X, W, DY, MEAN, RSTD, DX, DW_PART, DB_PART,
    M, C, stride_xm, stride_xc, stride_dym, stride_dyc, stride_dxm,
    HAS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = rstd * (w*dy - mean(w*dy) - xhat * mean(w*dy*xhat)); per-program partial dW = sum dy*xhat, dB = sum dy."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    num_blocks = tl.cdiv(M, BLOCK_M)
    for blk in range(pid, num_blocks, nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_xm + cols[None, :] * stride_xc, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dym + cols[None, :] * stride_dyc, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / C
        c2 = tl.sum(wdy, axis=1) / C
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dxm + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        db_acc += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * C + cols, dw_acc, mask=cmask)
    tl.store(DB_PART + pid * C + cols, db_acc, mask=cmask)


@triton.jit
def _act(x, ACT: tl.constexpr):
    """ACT 0: exact erf GELU, 1: tanh-approximated GELU, 2: QuickGELU x * sigmoid(1.702 x)."""
    if ACT == 0:
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT1_2))
    elif ACT == 1:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + _tanh(u))
    else:
        return x * tl.sigmoid(1.702 * x)


@triton.jit
def _dact(x, ACT: tl.constexpr):
    """The derivative of _act at x."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _SQRT1_2))
        pdf = tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
        return cdf + x * pdf
    elif ACT == 1:
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t = _tanh(u)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
    else:
        sg = tl.sigmoid(1.702 * x)
        return sg + 1.702 * x * sg * (1.0 - sg)


@triton.jit
def _tanh(u):
    # tanh(u) = 2 sigmoid(2u) - 1: stable for large |u| (sigmoid saturates to 0 or 1)
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def _mm_epilogue(
    out, offs_m64, mmask, offs_n, split, pid_m, N, Cp, BIAS, AUX, RES, PSUM_OUT,
    stride_cs, stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, HAS_RES: tl.constexpr,
    COLSUM_OUT: tl.constexpr, ACT: tl.constexpr,
):
    """The GEMM epilogue on the accumulator columns offs_n (see _mm_kernel)."""
    nmask = offs_n < N
    offs_n64 = offs_n.to(tl.int64)
    cmask = mmask[:, None] & nmask[None, :]
    if EPILOGUE == 1 or EPILOGUE == 2:
        if HAS_BIAS:
            out = out + tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if EPILOGUE == 1:
        if STORE_AUX:
            tl.store(AUX + offs_m64[:, None] * stride_xm + offs_n64[None, :] * stride_xn,
                     out.to(AUX.dtype.element_ty), mask=cmask)
        out = _act(out, ACT)
    if EPILOGUE == 2:
        if HAS_RES:
            res = tl.load(RES + offs_m64[:, None] * stride_rm + offs_n64[None, :] * stride_rn, mask=cmask, other=0.0)
            out = out + res.to(tl.float32)
    if EPILOGUE == 3:
        pre = tl.load(AUX + offs_m64[:, None] * stride_xm + offs_n64[None, :] * stride_xn, mask=cmask, other=0.0)
        pre = pre.to(tl.float32)
        out = out * _dact(pre, ACT)
    tl.store(Cp + split * stride_cs + offs_m64[:, None] * stride_cm + offs_n64[None, :] * stride_cn,
             out.to(Cp.dtype.element_ty), mask=cmask)
    if COLSUM_OUT:
        colsum = tl.sum(tl.where(cmask, out, 0.0), axis=0)
        tl.store(PSUM_OUT + pid_m * N + offs_n, colsum, mask=nmask)


@triton.jit
def _mm_kernel(
    A, B, Cp, BIAS, AUX, RES, PSUM_OUT, PSUM_A,
    M, N, K, K_PER_SPLIT, M_BUCKET, K_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk,
    stride_cs, stride_cm, stride_cn,
    stride_xm, stride_xn, stride_rm, stride_rn,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_AUX: tl.constexpr, HAS_RES: tl.constexpr,
    COLSUM_OUT: tl.constexpr, COLSUM_A: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EPILOGUE_SUBTILE: tl.constexpr,
):
    """C[m, n] = epilogue(sum_k A[m, k] * B[n, k]) for k in this program's split (program_id(1)).

    A is cast to B's dtype for tl.dot (B is always in the GEMM dtype); the accumulator is fp32.
    EPILOGUE: 0 plain, 1 bias + activation ACT (pre-activation to AUX if STORE_AUX), 2 bias (+ RES),
    3 times ACT'(AUX). COLSUM_OUT: column sums of the epilogue's result to PSUM_OUT[pid_m, :];
    COLSUM_A: column sums of A's rows (pid_n == 0 programs) to PSUM_A[pid_m, :]. M_BUCKET and K_BUCKET
    (M's and K's power-of-two buckets) are autotuning keys only.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: GROUP_M row tiles share their B column tiles in L2.
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < M
    # Rows / columns past the end read valid (repeated) data and are dropped at the store: no M/N
    # masks in the main loop.
    ram = (offs_m % M).to(tl.int64)
    rbn = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    k_lo = split * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)

    kk64 = (k_lo + offs_k).to(tl.int64)
    a_ptrs = A + ram[:, None] * stride_am + kk64[None, :] * stride_ak
    b_ptrs = B + kk64[:, None] * stride_bk + rbn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        kmask = offs_k < k_hi - k
        a = tl.load(a_ptrs, mask=kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None], other=0.0)
        acc = tl.dot(a.to(b.dtype), b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    offs_m64 = offs_m.to(tl.int64)
    if EPILOGUE_SUBTILE:
        # Two column halves, one after the other: the epilogue's temporaries (pre-activation,
        # residual, erf) cover half the tile, which keeps wide tiles out of register spills.
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        acc0, acc1 = tl.split(halves)
        offs_n0 = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
        _mm_epilogue(acc0, offs_m64, mmask, offs_n0, split, pid_m, N, Cp, BIAS, AUX, RES, PSUM_OUT,
                     stride_cs, stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn,
                     EPILOGUE, HAS_BIAS, STORE_AUX, HAS_RES, COLSUM_OUT, ACT)
        _mm_epilogue(acc1, offs_m64, mmask, offs_n0 + BLOCK_N // 2, split, pid_m, N, Cp, BIAS, AUX, RES, PSUM_OUT,
                     stride_cs, stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn,
                     EPILOGUE, HAS_BIAS, STORE_AUX, HAS_RES, COLSUM_OUT, ACT)
    else:
        _mm_epilogue(acc, offs_m64, mmask, offs_n, split, pid_m, N, Cp, BIAS, AUX, RES, PSUM_OUT,
                     stride_cs, stride_cm, stride_cn, stride_xm, stride_xn, stride_rm, stride_rn,
                     EPILOGUE, HAS_BIAS, STORE_AUX, HAS_RES, COLSUM_OUT, ACT)
    if COLSUM_A:
        # After the main loop (which stays free of it): the pid_n == 0 programs re-read their A
        # rows, mostly from L2, and store their column sums.
        if pid_n == 0:
            for k in range(0, K, BLOCK_K):
                kk = k + offs_k
                kmask = kk < K
                a = tl.load(A + offs_m64[:, None] * stride_am + kk.to(tl.int64)[None, :] * stride_ak,
                            mask=mmask[:, None] & kmask[None, :], other=0.0)
                tl.store(PSUM_A + pid_m * K + kk, tl.sum(a.to(tl.float32), axis=0), mask=kmask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

# Under the interpreter (about 3 ms per program per K-step, whatever the tile) the launchers take the
# largest tiles; tests set these to exercise the small-tile / split-K / multi-iteration paths:
# {"mm": (BM, BN, BK), "split_k": S, "ln_rows": rows per block, "ln_programs": P}.
INTERPRET_OVERRIDES: dict = {}

# Rows per program block of the dGELU GEMM: its per-row-block partial sums are sized by it, so
# every autotuned config of that GEMM uses this BLOCK_M.
_PSUM_BLOCK_M = 128


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 4
    return _num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device())


def _mm_configs(fixed_block_m: int | None, fp32: bool):
    """GPU tile configs: Hopper-friendly bf16/fp16 tiles, or smaller ones for fp32 operands."""
    if fp32:  # TF32 wgmma, or FMA for "ieee": smaller K tiles and footprints
        shapes = [(128, 128, 32, 3, 8), (128, 64, 32, 3, 4), (64, 128, 32, 3, 4), (64, 64, 32, 4, 4)]
    else:
        shapes = [  # (BM, BN, BK, stages, warps)
            (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 4), (128, 128, 64, 4, 8),
            (64, 256, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 32, 4, 4), (64, 128, 32, 4, 4),
        ]
    if fixed_block_m == _PSUM_BLOCK_M and not fp32:
        # The column-sum epilogues (dGELU + fc1 bias grad) hold more live registers: at sm_90 the
        # 128x256/8-warp, 128x128/4-warp and BK=32 tiles spill (8-136 stack bytes); these two do not.
        shapes = [(128, 128, 64, 4, 8), (128, 64, 64, 4, 4)]
    elif fixed_block_m is not None:
        shapes = [s for s in shapes if s[0] == fixed_block_m]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in shapes
    ]


# Rows (M, and K = rows for the weight gradients) follow the batch: bucketed, so a new batch size does not
# re-tune. Every flag that changes the compiled kernel is part of the key.
_KEY = ["M_BUCKET", "N", "K_BUCKET", "EPILOGUE", "HAS_BIAS", "STORE_AUX", "HAS_RES", "COLSUM_OUT", "COLSUM_A",
        "INPUT_PRECISION", "ACT", "EPILOGUE_SUBTILE"]


@functools.lru_cache(maxsize=None)
def _mm_autotuned(fixed_block_m: int | None, fp32: bool):
    """The GPU entry point: _mm_kernel autotuned over the config list (built once per list, on first use)."""
    return triton.autotune(configs=autotune_configs(_mm_configs(fixed_block_m, fp32)), key=_KEY)(_mm_kernel)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _mm(
    a, a_strides, b, b_strides, c, c_strides, M, N, K, *, epilogue=0, bias=None, aux=None, aux_strides=(0, 0),
    res=None, res_strides=(0, 0), store_aux=False, psum_out=None, psum_a=None, split=1, act=0,
):
    """Launch _mm_kernel. c_strides = (split, m, n); a, b strides = (m, k), (n, k)."""
    dummy = c
    align = 16 if interpreting() else 256
    k_per_split = K if split == 1 else triton.cdiv(triton.cdiv(K, split), align) * align
    args = (
        a, b, c, dummy if bias is None else bias, dummy if aux is None else aux, dummy if res is None else res,
        dummy if psum_out is None else psum_out, dummy if psum_a is None else psum_a,
        M, N, K, k_per_split, bucket(M), bucket(K), *a_strides, *b_strides, *c_strides, *aux_strides, *res_strides,
    )
    flags = dict(
        EPILOGUE=epilogue, HAS_BIAS=bias is not None, STORE_AUX=store_aux, HAS_RES=res is not None,
        COLSUM_OUT=psum_out is not None, COLSUM_A=psum_a is not None, INPUT_PRECISION=input_precision(b.dtype),
        ACT=act,
    )
    if interpreting():
        bm, bn, bk = INTERPRET_OVERRIDES.get("mm") or (_pow2(M, 16, 512), _pow2(N, 16, 256), _pow2(K, 16, 256))
        if psum_out is not None or psum_a is not None:
            bm = _psum_block_m(M)
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split)
        wrap_triton(_mm_kernel)[grid](
            *args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPILOGUE_SUBTILE=epilogue != 0 and bn >= 32
        )
    else:
        fixed = _PSUM_BLOCK_M if (psum_out is not None or psum_a is not None) else None

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)

        kernel = _mm_autotuned(fixed, b.dtype == torch.float32)
        wrap_triton(kernel)[grid](*args, **flags, EPILOGUE_SUBTILE=epilogue != 0)


def _psum_block_m(M: int) -> int:
    """BLOCK_M of GEMMs with per-row-block partial sums (fixed on GPU).

    The interpreter reduces a tile over its rows with numpy's sequential (not pairwise) sum along
    axis 0, where a GPU reduces in a tree: 64-row blocks keep the interpreted sums as accurate.
    """
    if not interpreting():
        return _PSUM_BLOCK_M
    if INTERPRET_OVERRIDES.get("mm"):
        return INTERPRET_OVERRIDES["mm"][0]
    return _pow2(M, 16, 64)


SPLIT_K_MAX, SPLIT_K_MIN_ROWS, SPLIT_K_TARGET_EFFICIENCY = 16, 1024, 0.85


def wave_efficiency(units: int, slots: int) -> float:
    """The fraction of ``slots`` (blocks the GPU runs at once) busy over the waves ``units`` blocks take."""
    return units / (-(-units // slots) * slots)


def wave_split_k(tiles: int, K: int, slots: int) -> int:
    """Slices of a weight-gradient GEMM's K (= rows): the smallest split whose wave efficiency reaches
    0.85 (fewest fp32 partials), else the most efficient, with >= 1024 rows a slice and <= 16 slices.
    ViT-B's dW (144 tiles of 128 x 128, 132 SMs): 1 slice runs 2 waves at 0.55, 4 slices 5 waves at
    0.87. The same rule as csrc/mlp_split_k.h (a test compares them)."""
    if tiles <= 0 or slots <= 0:
        return 1
    most = max(1, min(SPLIT_K_MAX, K // SPLIT_K_MIN_ROWS))
    best, best_eff = 1, wave_efficiency(tiles, slots)
    for s in range(1, most + 1):
        eff = wave_efficiency(tiles * s, slots)
        if eff >= SPLIT_K_TARGET_EFFICIENCY:
            return s
        if eff > best_eff + 1e-9:
            best, best_eff = s, eff
    return best


def _split_k(tiles_m: int, tiles_n: int, K: int, ref: torch.Tensor) -> int:
    """Split a weight-gradient GEMM's K (= rows) for the waves to fill the GPU (one 128 x 128 block
    per SM: the bf16 configs' pipelines take 128-180 KB of shared memory)."""
    if interpreting():
        return INTERPRET_OVERRIDES.get("split_k", 1)
    return wave_split_k(tiles_m * tiles_n, K, _sms(ref))


def _ln_blocks(M: int, C: int, ref: torch.Tensor, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_C, num_warps) for the LayerNorm kernels."""
    block_c = triton.next_power_of_2(C)
    if interpreting():
        # At most 64 rows per block: the interpreter's column sums (dW, dB) are sequential over rows.
        rows = INTERPRET_OVERRIDES.get("ln_rows") or max(1, min(triton.next_power_of_2(M), 64, 32768 // block_c))
        return rows, block_c, 4
    rows = max(1, min(16 if backward else 32, 4096 // block_c))
    warps = 4 if rows * block_c <= 4096 else 8
    return rows, block_c, warps


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim): a view where the strides allow it (non-contiguous rows stay uncopied)."""
    return t.reshape(-1, t.shape[-1])


def _ln_forward(x2, weight, bias, eps, y2, mean, rstd):
    M, C = x2.shape
    if M == 0:
        return
    bm, bc, warps = _ln_blocks(M, C, x2, backward=False)
    store_stats = mean is not None
    wrap_triton(_ln_fwd_kernel)[(triton.cdiv(M, bm),)](
        x2, weight if weight is not None else x2, bias if bias is not None else x2, y2,
        mean if store_stats else y2, rstd if store_stats else y2,
        M, C, x2.stride(0), x2.stride(1), y2.stride(0), eps,
        HAS_W=weight is not None, HAS_B=bias is not None, STORE_STATS=store_stats,
        BLOCK_M=bm, BLOCK_C=bc, num_warps=warps,
    )


def _ln_backward(dy2, x2, weight, mean, rstd, dx2):
    """dx into dx2; returns the fp32 (dW, dB) sums over rows."""
    M, C = x2.shape
    bm, bc, warps = _ln_blocks(M, C, x2, backward=True)
    blocks = triton.cdiv(M, bm)
    if interpreting():
        P = INTERPRET_OVERRIDES.get("ln_programs") or blocks
    else:
        P = 4 * _sms(x2)
    P = max(1, min(P, blocks))
    dw_part = torch.empty((P, C), dtype=torch.float32, device=x2.device)  # every row written
    db_part = torch.empty((P, C), dtype=torch.float32, device=x2.device)
    wrap_triton(_ln_bwd_kernel)[(P,)](
        x2, weight if weight is not None else x2, dy2, mean, rstd, dx2, dw_part, db_part,
        M, C, x2.stride(0), x2.stride(1), dy2.stride(0), dy2.stride(1), dx2.stride(0),
        HAS_W=weight is not None, BLOCK_M=bm, BLOCK_C=bc, num_warps=warps,
    )
    return dw_part.sum(0), db_part.sum(0)


# ---------------------------------------------------------------------------------------------
# layer_norm ops
# ---------------------------------------------------------------------------------------------


def _ln_run(x, weight, bias, eps, out_dtype, stats):
    C = x.shape[-1]
    if C == 0:  # rows without features: an empty result (statistics 0, never read)
        M = torch.Size(x.shape[:-1]).numel()
        zeros = torch.zeros((M,), dtype=torch.float32, device=x.device) if stats else None
        return x.new_empty(x.shape, dtype=out_dtype), zeros, None if zeros is None else zeros.clone()
    x2 = _rows(x)
    M = x2.shape[0]
    y = new_output(x.shape, dtype=out_dtype, device=x.device)
    mean = new_output((M,), dtype=torch.float32, device=x.device) if stats else None
    rstd = new_output((M,), dtype=torch.float32, device=x.device) if stats else None
    _ln_forward(x2, weight, bias, eps, y.view(M, C), mean, rstd)
    return y, mean, rstd


@torch.library.triton_op(op_name("layer_norm", "triton", "fwd"), mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim: (y in out_dtype, mean (rows,) fp32, rstd (rows,) fp32)."""
    return _ln_run(x, weight, bias, eps, out_dtype, stats=True)


@torch.library.triton_op(op_name("layer_norm", "triton", "infer"), mutates_args=())
def _layer_norm_infer(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
) -> torch.Tensor:
    """LayerNorm over the last dim, saving nothing: y in out_dtype."""
    return _ln_run(x, weight, bias, eps, out_dtype, stats=False)[0]


@torch.library.triton_op(op_name("layer_norm", "triton", "bwd"), mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
    mean: torch.Tensor, rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dW in weight's dtype, dB in bias's dtype); (0,)-shaped placeholders for absent params."""
    C = x.shape[-1]
    if C == 0:  # no features: empty dx, and the (0,) gradients of the (0,) parameters
        def grad(p):
            return p.new_zeros((0,)) if p is not None else x.new_empty((0,))

        return x.new_empty(x.shape), grad(weight), grad(bias)
    x2, dy2 = _rows(x), _rows(dy)
    dx = new_output(x.shape, dtype=x.dtype, device=x.device)
    dw, db = _ln_backward(dy2, x2, weight, mean, rstd, dx.view(-1, C))
    dw = dw.to(weight.dtype) if weight is not None else x.new_empty((0,))
    db = db.to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, dw, db


def _layer_norm_backward(saved, grads):
    x, weight, bias, eps, out_dtype = saved.inputs
    _, mean, rstd = saved.outputs
    dx, dw, db = get_op("layer_norm", "triton", "bwd")(grads[0], x, weight, bias, mean, rstd)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None


wire_autograd("layer_norm", "triton", num_outputs=1, backward=_layer_norm_backward)
_layer_norm = FusedOp("layer_norm", "triton", num_outputs=1)


def layer_norm(x, weight, bias, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dim in Triton. x: (..., C), weight/bias (C,) or None -> x's shape in out_dtype."""
    return _layer_norm(x, weight, bias, float(eps), out_dtype)


# ---------------------------------------------------------------------------------------------
# layernorm_mlp ops
# ---------------------------------------------------------------------------------------------


def _mlp_forward(x, ln_w, ln_b, w1, b1, w2, b2, eps, residual, training, act_code):
    C, H, C_out = x.shape[-1], w1.shape[0], w2.shape[0]
    gd = w1.dtype
    x2 = _rows(x)
    M = x2.shape[0]
    dev = x.device
    out_dtype = residual.dtype if residual is not None else gd
    out = new_output((*x.shape[:-1], C_out), dtype=out_dtype, device=dev)
    h = new_output((M, C), dtype=gd, device=dev)
    act = new_output((M, H), dtype=gd, device=dev)
    pre = new_output((M, H), dtype=gd, device=dev) if training else None
    mean = new_output((M,), dtype=torch.float32, device=dev) if training else None
    rstd = new_output((M,), dtype=torch.float32, device=dev) if training else None
    if M > 0:
        _ln_forward(x2, ln_w, ln_b, eps, h, mean, rstd)
        _mm(h, (h.stride(0), h.stride(1)), w1, (w1.stride(0), w1.stride(1)), act, (0, act.stride(0), act.stride(1)),
            M, H, C, epilogue=1, bias=b1, aux=pre, aux_strides=(H, 1), store_aux=training, act=act_code)
        out2 = out.view(M, C_out)
        res2 = _rows(residual) if residual is not None else None
        _mm(act, (act.stride(0), act.stride(1)), w2, (w2.stride(0), w2.stride(1)), out2,
            (0, out2.stride(0), out2.stride(1)), M, C_out, H, epilogue=2, bias=b2, res=res2,
            res_strides=(res2.stride(0), res2.stride(1)) if res2 is not None else (0, 0))
    return out, h, pre, act, mean, rstd


@torch.library.triton_op(op_name("layernorm_mlp", "triton", "fwd"), mutates_args=())
def _layernorm_mlp_fwd(
    x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
    eps: float, residual: torch.Tensor | None, activation: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, h = LN(x) (M, C), pre-activation (M, H), act(pre) (M, H), mean, rstd (M,) fp32); ``activation``
    is an ACT_CODES value.

    h, pre and act are in the GEMM dtype (fc1_weight's); out in residual's dtype, else the GEMM dtype.
    """
    return _mlp_forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, True, activation)


@torch.library.triton_op(op_name("layernorm_mlp", "triton", "infer"), mutates_args=())
def _layernorm_mlp_infer(
    x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
    eps: float, residual: torch.Tensor | None, activation: int = 0,
) -> torch.Tensor:
    """fc2(act(fc1(LN(x)))) (+ residual), saving nothing."""
    return _mlp_forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, False,
                        activation)[0]


def _param_grad(part: torch.Tensor, p: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor:
    """Sum fp32 per-block partials into p's dtype, or a (0,) placeholder when p is absent."""
    if p is None:
        return ref.new_empty((0,))
    return part.sum(0).to(p.dtype)


def _wgrad(g, g_strides, X, x_strides, M_out, N_out, K, weight):
    """weight-shaped grad = sum_k g[k, m] X[k, n] (split-K into fp32 partials when the grid is small)."""
    split = _split_k(triton.cdiv(M_out, 128), triton.cdiv(N_out, 128), K, g)
    if split == 1:
        dw = new_output((M_out, N_out), dtype=weight.dtype, device=weight.device)
        _mm(g, g_strides, X, x_strides, dw, (0, dw.stride(0), dw.stride(1)), M_out, N_out, K)
        return dw
    part = torch.empty((split, M_out, N_out), dtype=torch.float32, device=weight.device)  # every split written
    _mm(g, g_strides, X, x_strides, part, (part.stride(0), part.stride(1), part.stride(2)), M_out, N_out, K, split=split)
    return part.sum(0).to(weight.dtype)


@torch.library.triton_op(op_name("layernorm_mlp", "triton", "bwd"), mutates_args=())
def _layernorm_mlp_bwd(
    dy: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor, fc1_bias: torch.Tensor | None, fc2_weight: torch.Tensor, fc2_bias: torch.Tensor | None,
    h: torch.Tensor, pre: torch.Tensor, act: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
    activation: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d ln_weight, d ln_bias, d fc1_weight, d fc1_bias, d fc2_weight, d fc2_bias), each in its input's
    dtype; absent parameters get (0,)-shaped placeholders. dy: (..., C_out), any strides (stride 0 too)."""
    w1, w2 = fc1_weight, fc2_weight
    C, H, C_out = x.shape[-1], w1.shape[0], w2.shape[0]
    gd = w1.dtype
    dev = x.device
    dy2 = _rows(dy)
    M = dy2.shape[0]
    sdy = (dy2.stride(0), dy2.stride(1))

    # dA = (dY W2) * act'(pre), with db1 (column sums of dA) and db2 (column sums of dY) per row block.
    dA = new_output((M, H), dtype=gd, device=dev)
    bm = _psum_block_m(M)
    nblk = max(1, triton.cdiv(M, bm))
    p_db1 = torch.zeros((nblk, H), dtype=torch.float32, device=dev)  # zeros: M == 0 launches nothing
    p_db2 = torch.zeros((nblk, C_out), dtype=torch.float32, device=dev)
    if M > 0:
        _mm(dy2, sdy, w2, (w2.stride(1), w2.stride(0)), dA, (0, dA.stride(0), dA.stride(1)), M, H, C_out,
            epilogue=3, aux=pre, aux_strides=(pre.stride(0), pre.stride(1)), psum_out=p_db1, psum_a=p_db2,
            act=activation)
    # dW2 = dY^T act, dW1 = dA^T h (K = rows).
    dw2 = _wgrad(dy2, (sdy[1], sdy[0]), act, (act.stride(1), act.stride(0)), C_out, H, M, w2)
    dw1 = _wgrad(dA, (dA.stride(1), dA.stride(0)), h, (h.stride(1), h.stride(0)), H, C, M, w1)
    # dh = dA W1, then the LayerNorm backward.
    dh = new_output((M, C), dtype=gd, device=dev)
    if M > 0:
        _mm(dA, (dA.stride(0), dA.stride(1)), w1, (w1.stride(1), w1.stride(0)), dh, (0, dh.stride(0), dh.stride(1)),
            M, C, H)
    dx = new_output(x.shape, dtype=x.dtype, device=dev)
    dlnw, dlnb = _ln_backward(dh, _rows(x), ln_weight, mean, rstd, dx.view(-1, C))
    return (
        dx,
        dlnw.to(ln_weight.dtype) if ln_weight is not None else x.new_empty((0,)),
        dlnb.to(ln_bias.dtype) if ln_bias is not None else x.new_empty((0,)),
        dw1, _param_grad(p_db1, fc1_bias, x), dw2, _param_grad(p_db2, fc2_bias, x),
    )


def _layernorm_mlp_backward(saved, grads):
    x, ln_w, ln_b, w1, b1, w2, b2, eps, residual, activation = saved.inputs
    _, h, pre, act, mean, rstd = saved.outputs
    dy = grads[0]
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = get_op("layernorm_mlp", "triton", "bwd")(
        dy, x, ln_w, ln_b, w1, b1, w2, b2, h, pre, act, mean, rstd, activation
    )

    def opt(g, p):
        return g if p is not None else None

    # d(residual) = d(out): autograd takes the incoming gradient as it is (stride 0 included).
    return (dx, opt(dlnw, ln_w), opt(dlnb, ln_b), dw1, opt(db1, b1), dw2, opt(db2, b2), None,
            dy if residual is not None else None, None)


wire_autograd("layernorm_mlp", "triton", num_outputs=1, backward=_layernorm_mlp_backward)
_layernorm_mlp = FusedOp("layernorm_mlp", "triton", num_outputs=1)


def layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps: float, residual=None,
                  activation: str = "gelu"):
    """fc2(act(fc1(LN(x)))) (+ residual) in Triton, no dropout; ``activation`` one of ACT_CODES.
    x: (..., C) -> (..., C_out)."""
    return _layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), residual,
                          ACT_CODES[activation])
