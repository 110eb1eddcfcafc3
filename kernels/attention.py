"""Flash attention for ViT in Triton: non-causal, any N, head dims 8-128 (multiples of 8), masks, strided q/k/v.

softmax(q k^T * scale + mask) v as an online-softmax kernel that never writes the N x N matrix,
forward and backward, for two layouts that share every kernel body (strides are arguments):

- ``attention``: q (B, H, Nq, D), k, v (B, H, Nk, D), any strides (views of a packed projection are
  read in place) -> o (B, H, Nq, D).
- ``attention_qkvpacked``: the qkv projection's output (B, N, 3 * H * D), last dim laid out (3, H, D),
  read in place -> o written directly as (B, N, H * D); the backward writes dqkv packed, (B, N, 3 * H * D).
  No permute copy on either side.

Kernels (grid axis 0 walks one (b, h)'s blocks so that neighbouring programs share K/V in L2; heads
and batch on axes 1 and 2; batch/head offsets in int64):

- ``_attn_fwd``: grid (cdiv(Nq, BLOCK_M), H, B). One query block against all key blocks, online
  softmax in the exp2 domain (scores scaled by scale * log2(e)), fp32 accumulators; writes o and,
  for the ``_fwd`` op only, lse (B, H, Nq) fp32: the log-sum-exp of the scaled, masked scores in base 2
  (natural lse = lse * ln 2; base 2 so that the backward recomputes P = exp2(s - lse) without a
  rounding step), -inf for a row with nothing to attend.
- Backward, recomputing P blockwise, fp32 accumulation, no atomics at all (deterministic whatever
  ``torch.are_deterministic_algorithms_enabled()`` says):
  * one pass when all keys fit one (next_pow2(Nk), BLOCK_D) tile of <= ``FUSED_BWD_MAX_TILE``
    elements (ViT's N = 197 at D = 64): ``_attn_bwd_dkdv`` with FUSED=True, grid (1, H, B). The program owns every key, so per
    query block it has whole rows: P is normalised exactly as softmax does, delta = rowsum(P * dP),
    and dQ = dS K is written directly. lse is not read.
  * two passes otherwise: ``_attn_bwd_dq`` (grid over query blocks: delta = rowsum(dO * O) inline,
    stored for the next pass, then dQ over all key blocks) and ``_attn_bwd_dkdv`` (grid over key
    blocks: dK, dV over all query blocks, reading lse and delta).
- Head dims that are not powers of two (24, 48, 72, 80, 96, ...) use BLOCK_D = the next power of two
  (at least 16, tl.dot's smallest K) with the head dim masked; sequence tails are masked on every
  load and store.

Bytes (bf16, ViT-B at N = 197): the forward reads q, k, v and writes o once (310 MB + lse), where eager
also writes and re-reads S and P (4 x 238 MB) and timm pays permute copies around SDPA; the one-pass
backward reads q, k, v, dO and writes dq, dk, dv once; the two-pass backward reads q, k, v, dO twice.

Masks (boolean, True = attend, or additive float) are read through their broadcast strides (stride 0
where broadcast; never materialised). Masked scores are -inf; a fully masked row has lse = -inf and
gives output 0 and gradient 0 (the two-pass backward reads its lse as +inf, so P = 0 there).

On GPU the launch configuration is autotuned per (Nq, Nk, D); under TRITON_INTERPRET=1 one fixed
large-tile configuration runs (``TILES`` overrides both, for tests and benchmarks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvit import reference
from fastvit._library import FusedOp, get_op, new_output, op_name, wire_autograd
from fastvit.kernels._common import autotune_configs, input_precision, interpreting, kernel_flags, wrap_triton

LOG2E = 1.4426950408889634

# The backward runs as one kernel (dQ written by the program that owns all keys: 5 matmul-equivalents, as
# FlashAttention-2, instead of the two passes' 7) when all keys fit one (next_pow2(Nk), BLOCK_D) tile of at
# most FUSED_BWD_MAX_TILE elements, at most FUSED_BWD_MAX_KEYS keys (its K, V and fp32 dK, dV stay in
# registers): 16-bit inputs Nk <= 256 at D = 64 (ViT's 197) and <= 128 at D = 80-128; fp32 (FMA dots)
# half that. The sm_90 compile report (tests/sm90.py) shows 8 warps with 16- or 32-row query blocks
# without spills there (4 warps, or 512 keys at D = 32, spill).
FUSED_BWD_MAX_TILE = 256 * 64
FUSED_BWD_MAX_TILE_FP32 = 128 * 64
FUSED_BWD_MAX_KEYS = 256
_WIDE_FUSED = 128 * 64  # a fused tile above this takes the 8-warp configs only
# Under the interpreter: the largest tile edge (cost is per program and K-step, not per element).
INTERPRETER_MAX_TILE = 256
# Test / benchmark override of the launch configuration, e.g.
# {"BLOCK_M": 16, "BLOCK_N": 16, "FUSED_BWD": False, "num_warps": 4, "num_stages": 2}; None = default.
TILES: dict | None = None


# --------------------------------------------------------------------------------------- kernels


@triton.jit
def _mask_scores(s, mask_base, offs_m, offs_n, m_ok, n_ok, smm, smn,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr,
                 TRANSPOSED: tl.constexpr):
    """Scores (exp2 domain) with the user mask and the key tail applied: -inf where masked.

    s is (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) when TRANSPOSED. MASK_KEYS_ONLY: the mask does not
    vary along queries (stride 0, e.g. key padding (B, 1, 1, N)), so one (BLOCK_N,) vector is read.
    """
    if HAS_MASK:
        if MASK_KEYS_ONLY:
            mk = tl.load(mask_base + offs_n * smn, mask=n_ok, other=0)
            if TRANSPOSED:
                mk = mk[:, None]
            else:
                mk = mk[None, :]
        elif TRANSPOSED:
            mk = tl.load(mask_base + offs_m[None, :] * smm + offs_n[:, None] * smn,
                         mask=n_ok[:, None] & m_ok[None, :], other=0)
        else:
            mk = tl.load(mask_base + offs_m[:, None] * smm + offs_n[None, :] * smn,
                         mask=m_ok[:, None] & n_ok[None, :], other=0)
        if MASK_BOOL:
            s = tl.where(mk != 0, s, float("-inf"))
        else:
            s = s + mk.to(tl.float32) * 1.4426950408889634
    if TRANSPOSED:
        s = tl.where(n_ok[:, None], s, float("-inf"))
    else:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    return s


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    smb, smh, smm, smn,
    H, Nq, Nk, D, qk_scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr,
    STORE_LSE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """o[b, h, m-block] and lse; qk_scale = scale * log2(e) (scores live in the exp2 domain)."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < D

    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    mask_base = MASK + off_b * smb + off_h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Nk
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # K^T block (BLOCK_D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        s = _mask_scores(s, mask_base, offs_m, offs_n, m_ok, n_ok, smm, smn,
                         HAS_MASK, MASK_BOOL, MASK_KEYS_ONLY, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: keep exp2 finite
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new

    attended = l_i > 0.0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]
    tl.store(O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if STORE_LSE:
        lse2 = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
        tl.store(LSE + (off_b * H + off_h) * Nq + offs_m, lse2, mask=m_ok)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, som, sod,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    smb, smh, smm, smn,
    H, Nq, Nk, D, qk_scale, sm_scale,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ for one query block over all keys; also stores delta = rowsum(dO * O) for the dK/dV pass."""
    pid_m = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < D
    md_ok = m_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + off_b * sqb + off_h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
    do = tl.load(DO + off_b * sdob + off_h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=md_ok, other=0.0)
    o = tl.load(O + off_b * sob + off_h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=md_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = (off_b * H + off_h) * Nq + offs_m
    tl.store(DELTA + row, delta, mask=m_ok)
    lse2 = tl.load(LSE + row, mask=m_ok, other=float("-inf"))
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # dead row: P = 0

    k_base = K + off_b * skb + off_h * skh
    v_base = V + off_b * svb + off_h * svh
    mask_base = MASK + off_b * smb + off_h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, Nk, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < Nk
        nd_ok = d_ok[:, None] & n_ok[None, :]
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=nd_ok, other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * svn + offs_d[:, None] * svd, mask=nd_ok, other=0.0)
        s = tl.dot(q, kt, input_precision=INPUT_PRECISION) * qk_scale
        s = _mask_scores(s, mask_base, offs_m, offs_n, m_ok, n_ok, smm, smn,
                         HAS_MASK, MASK_BOOL, MASK_KEYS_ONLY, False)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=INPUT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + off_b * sdqb + off_h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=md_ok)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, MASK,
    sqb, sqh, sqm, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdom, sdod,
    sdqb, sdqh, sdqm, sdqd,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    smb, smh, smm, smn,
    H, Nq, Nk, D, qk_scale, sm_scale, dk_off, dv_off,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, MASK_KEYS_ONLY: tl.constexpr,
    FUSED: tl.constexpr, PACKED_GRAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV for one key block over all queries (scores computed transposed, (BLOCK_N, BLOCK_M)).

    FUSED: this program holds every key (Nk <= BLOCK_N): delta is computed inline and dQ = dS K is
    written per query block (no second pass, no atomics). PACKED_GRAD: dK and dV are written into
    DQ's buffer at element offsets dk_off, dv_off with DQ's strides (DK and DV are unused).
    """
    pid_n = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Nk
    d_ok = offs_d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]

    k = tl.load(K + off_b * skb + off_h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=nd_ok, other=0.0)
    v = tl.load(V + off_b * svb + off_h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=nd_ok, other=0.0)
    q_base = Q + off_b * sqb + off_h * sqh
    do_base = DO + off_b * sdob + off_h * sdoh
    dq_base = DQ + off_b * sdqb + off_h * sdqh
    mask_base = MASK + off_b * smb + off_h * smh
    row0 = (off_b * H + off_h) * Nq

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, Nq, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < Nq
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=md_ok, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod, mask=md_ok, other=0.0)
        if not FUSED:
            lse2 = tl.load(LSE + row0 + offs_m, mask=m_ok, other=float("-inf"))
            lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # dead or tail row: P = 0
        st = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        st = _mask_scores(st, mask_base, offs_m, offs_n, m_ok, n_ok, smm, smn,
                          HAS_MASK, MASK_BOOL, MASK_KEYS_ONLY, True)
        if FUSED:  # the whole row is here: normalise it exactly as softmax does (P = 1 for one key)
            mx = tl.max(st, 0)
            pt = tl.exp2(st - tl.where(mx == float("-inf"), 0.0, mx)[None, :])
            tot = tl.sum(pt, 0)
            pt = pt / tl.where(tot > 0.0, tot, 1.0)[None, :]
        else:
            pt = tl.exp2(st - lse2[None, :])
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if FUSED:  # the whole row is here: delta = rowsum(P * dP), softmax's own backward (exact 0 for N = 1)
            delta = tl.sum(pt * dpt, 0)
        else:
            delta = tl.load(DELTA + row0 + offs_m, mask=m_ok, other=0.0)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=INPUT_PRECISION)
        if FUSED:
            dq = tl.dot(tl.trans(dst), k, input_precision=INPUT_PRECISION) * sm_scale
            tl.store(dq_base + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd, dq.to(DQ.dtype.element_ty), mask=md_ok)

    dk = dk * sm_scale
    if PACKED_GRAD:
        dk_ptrs = dq_base + dk_off + offs_n[:, None] * sdqm + offs_d[None, :] * sdqd
        dv_ptrs = dq_base + dv_off + offs_n[:, None] * sdqm + offs_d[None, :] * sdqd
    else:
        dk_ptrs = DK + off_b * sdkb + off_h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd
        dv_ptrs = DV + off_b * sdvb + off_h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, dk.to(dk_ptrs.dtype.element_ty), mask=nd_ok)
    tl.store(dv_ptrs, dv.to(dv_ptrs.dtype.element_ty), mask=nd_ok)


# ------------------------------------------------------------------------------ launch configs

_tuned: dict[tuple[str, bool, bool], triton.runtime.Autotuner] = {}


def _configs(kind: str, fp32: bool = False, wide: bool = False) -> list[triton.Config]:
    """Autotuning candidates. fp32 inputs (exact "ieee" dots run on FMA units, not tensor cores, and
    compile slowly at large tiles) get a few small tiles only; a wide fused backward tile (more than
    128 x 64 keys x head dim) the 8-warp configs that do not spill."""
    C = triton.Config
    if kind == "dkdv_fused":  # BLOCK_N is fixed by the launcher (>= Nk)
        if wide:
            table = [(16, 8, 2), (32, 8, 2)]
        else:
            table = [(16, 4, 2)] if fp32 else [(16, 4, 2), (16, 8, 2), (32, 4, 2), (32, 8, 2), (64, 8, 2), (32, 4, 3)]
        return [C({"BLOCK_M": m}, num_warps=w, num_stages=s) for m, w, s in table]
    if fp32:
        table = [(32, 32, 4, 2), (16, 32, 4, 2)]
    elif kind == "fwd":
        table = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                 (64, 128, 4, 2), (64, 32, 4, 4), (128, 32, 4, 4)]
    elif kind == "dq":
        table = [(64, 64, 4, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3), (128, 32, 8, 3)]
    elif kind == "dkdv":
        table = [(64, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 3), (32, 32, 4, 2)]
    else:
        raise ValueError(kind)
    return [C({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


# (BLOCK_M, BLOCK_N, warps) that spilled at head dim 128 (BLOCK_D = 128) in 16-bit at sm_90 (tests/sm90.py):
# the forward's 128x64 on 4 warps (24-96 stack bytes) and 128x128 with a mask (8), dK/dV's 64x64 on 4 warps
# (24-32). At D <= 64 none of them spills, so they stay in the lists and are dropped per launch.
_SPILL_AT_D128 = {"fwd": {(128, 64, 4), (128, 128, 8)}, "dkdv": {(64, 64, 4)}}


def _pruner(kind: str):
    """early_config_prune for ``kind``: without the configs that spill at BLOCK_D = 128 in 16-bit (never all)."""
    bad = _SPILL_AT_D128.get(kind, set())

    def prune(configs, named_args, **kwargs):
        if kwargs.get("BLOCK_D", 0) < 128 or named_args["Q"].dtype == torch.float32:
            return configs
        keep = [c for c in configs if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps) not in bad]
        return keep or configs

    return prune


_KERNELS = {"fwd": _attn_fwd, "dq": _attn_bwd_dq, "dkdv": _attn_bwd_dkdv, "dkdv_fused": _attn_bwd_dkdv}


def block_d(D: int) -> int:
    """The head-dim tile: the next power of two, at least 16 (tl.dot's smallest K); the tail is masked."""
    return max(16, triton.next_power_of_2(D))


def _tile(n: int) -> int:
    return max(16, min(INTERPRETER_MAX_TILE, triton.next_power_of_2(n)))


def _fused_bwd(Nk: int, D: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    if TILES is not None and "FUSED_BWD" in TILES:
        return bool(TILES["FUSED_BWD"])
    if interpreting():
        return triton.next_power_of_2(Nk) <= INTERPRETER_MAX_TILE
    most = FUSED_BWD_MAX_TILE_FP32 if dtype == torch.float32 else FUSED_BWD_MAX_TILE
    keys = max(16, triton.next_power_of_2(Nk))
    return keys <= FUSED_BWD_MAX_KEYS and keys * block_d(D) <= most


def _launch(kind: str, Nq: int, Nk: int, dtype: torch.dtype, D: int = 64):
    """(kernel, meta-parameters) for one launch: ``TILES`` if set, else one large tile under the
    interpreter, else the autotuned kernel (keyed on Nq, Nk, D). The fused backward's BLOCK_N is
    always next_pow2(Nk): its program owns every key."""
    fixed = {"BLOCK_N": max(16, triton.next_power_of_2(Nk))} if kind == "dkdv_fused" else {}
    if TILES is not None or interpreting():
        meta = {"BLOCK_M": _tile(Nq), "BLOCK_N": _tile(Nk)} if interpreting() else {"BLOCK_M": 64, "BLOCK_N": 64}
        meta.update({k: TILES[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in (TILES or {})})
        return _KERNELS[kind], {**meta, **fixed}
    wide = kind == "dkdv_fused" and fixed["BLOCK_N"] * block_d(D) > _WIDE_FUSED
    tuned_key = (kind, dtype == torch.float32, wide)
    if tuned_key not in _tuned:  # built lazily: the interpreter has no driver to autotune with
        kernel = _KERNELS[kind]  # keyed on the lengths, the head dim and every flag (mask kind, ...) of the kernel
        configs = autotune_configs(_configs(*tuned_key))
        _tuned[tuned_key] = triton.autotune(configs=configs, key=["Nq", "Nk", "D", *kernel_flags(kernel)],
                                            prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)
    return _tuned[tuned_key], fixed


# ------------------------------------------------------------------------------------ launchers


def _mask_args(mask: torch.Tensor | None, B: int, H: int, Nq: int, Nk: int, like: torch.Tensor):
    """(pointer tensor, broadcast (b, h, m, n) strides, constexpr flags): read through stride 0 where broadcast."""
    if mask is None:
        return like, (0, 0, 0, 0), {"HAS_MASK": False, "MASK_BOOL": False, "MASK_KEYS_ONLY": False}
    strides = tuple(mask.expand(B, H, Nq, Nk).stride())
    flags = {"HAS_MASK": True, "MASK_BOOL": mask.dtype == torch.bool, "MASK_KEYS_ONLY": strides[2] == 0 or Nq == 1}
    return (mask.view(torch.uint8) if mask.dtype == torch.bool else mask), strides, flags


def _forward(q, k, v, o, o_strides, lse, mask, scale):
    """Launch the forward on (B, H, N, D) views q, k, v; o is written through ``o_strides`` (b, h, n, d)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if B * H * Nq == 0:
        return
    if Nk == 0:  # no key to attend: every row is fully masked (output 0, lse -inf)
        o.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return
    mptr, ms, mask_flags = _mask_args(mask, B, H, Nq, Nk, q)
    kernel, meta = _launch("fwd", Nq, Nk, q.dtype)
    grid = lambda META: (triton.cdiv(Nq, META["BLOCK_M"]), H, B)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, o, lse, mptr,
        *q.stride(), *k.stride(), *v.stride(), *o_strides, *ms,
        H, Nq, Nk, D, scale * LOG2E,
        STORE_LSE=lse is not None, **mask_flags,
        INPUT_PRECISION=input_precision(q.dtype), BLOCK_D=block_d(D), **meta,
    )


def _backward(do, q, k, v, o, o_strides, lse, mask, scale, grads):
    """Launch the backward. ``grads`` = (dq, dq_strides, dk, dk_strides, dv, dv_strides, dk_off, dv_off):
    with dk = dv = None, dK and dV go into dq's buffer at element offsets dk_off, dv_off (packed)."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dq_strides, dk, dk_strides, dv, dv_strides, dk_off, dv_off = grads
    if B * H * Nq * Nk == 0:  # no query or no key: every gradient is 0 (dq holds dk, dv too when packed)
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return
    packed = dk is None
    mptr, ms, mask_flags = _mask_args(mask, B, H, Nq, Nk, q)
    common = dict(**mask_flags, INPUT_PRECISION=input_precision(q.dtype), BLOCK_D=block_d(D))
    fused = _fused_bwd(Nk, D, q.dtype)
    delta = None  # the fused kernel computes delta inline
    if not fused:
        delta = new_output((B, H, Nq), dtype=torch.float32, device=q.device)
        kernel, meta = _launch("dq", Nq, Nk, q.dtype)
        grid = lambda META: (triton.cdiv(Nq, META["BLOCK_M"]), H, B)  # noqa: E731
        wrap_triton(kernel)[grid](
            q, k, v, o, do, lse, delta, dq, mptr,
            *q.stride(), *k.stride(), *v.stride(), *o_strides, *do.stride(), *dq_strides, *ms,
            H, Nq, Nk, D, scale * LOG2E, scale, **common, **meta,
        )
    kernel, meta = _launch("dkdv_fused" if fused else "dkdv", Nq, Nk, q.dtype, D)
    grid = lambda META: (triton.cdiv(Nk, META["BLOCK_N"]), H, B)  # noqa: E731
    wrap_triton(kernel)[grid](
        q, k, v, do, lse, delta, dq, dk, dv, mptr,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq_strides,
        *dk_strides, *dv_strides, *ms,
        H, Nq, Nk, D, scale * LOG2E, scale, dk_off, dv_off,
        FUSED=fused, PACKED_GRAD=packed, **common, **meta,
    )


def _scale(scale: float | None, D: int) -> float:
    return D**-0.5 if scale is None else float(scale)


# ------------------------------------------------------------------------ ops: (B, H, N, D) layout


def _attention_forward(q, k, v, mask, scale, with_lse: bool):
    B, H, Nq, D = q.shape
    o = new_output((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = new_output((B, H, Nq), dtype=torch.float32, device=q.device) if with_lse else None
    _forward(q, k, v, o, o.stride(), lse, mask, scale)
    return o, lse


@torch.library.triton_op(op_name("attention", "triton", "fwd"), mutates_args=())
def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o (B, H, Nq, D), lse (B, H, Nq) fp32: base-2 log-sum-exp of the log2(e)-scaled masked scores
    (natural lse = lse * ln 2), -inf for rows with nothing to attend)."""
    return _attention_forward(q, k, v, mask, scale, True)


@torch.library.triton_op(op_name("attention", "triton", "infer"), mutates_args=())
def _attention_infer(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    return _attention_forward(q, k, v, mask, scale, False)[0]


@torch.library.triton_op(op_name("attention", "triton", "bwd"), mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    mask: torch.Tensor | None, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv), contiguous, in q's dtype."""
    dq = new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    grads = (dq, dq.stride(), dk, dk.stride(), dv, dv.stride(), 0, 0)
    _backward(do, q, k, v, o, o.stride(), lse, mask, scale, grads)
    return dq, dk, dv


def _attention_backward(saved, grads):
    q, k, v, mask, scale = saved.inputs
    o, lse = saved.outputs
    dq, dk, dv = get_op("attention", "triton", "bwd")(grads[0], q, k, v, o, lse, mask, scale)
    need = saved.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None)


wire_autograd("attention", "triton", num_outputs=1, backward=_attention_backward, save_outputs=True)
_attention_op = FusedOp("attention", "triton", num_outputs=1)


# --------------------------------------------------------------- ops: packed qkv (B, N, 3 * H * D)


def _unpack(qkv: torch.Tensor, num_heads: int):
    """(B, H, N, D) views q, k, v of the packed projection (no copy)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _packed_out_strides(B: int, N: int, H: int, D: int, width: int) -> tuple[int, int, int, int]:
    """(b, h, n, d) strides of a contiguous (B, N, width) buffer whose last dim holds (H, D) blocks."""
    return (N * width, D, width, 1)


def _qkvpacked_forward(qkv, num_heads, mask, scale, with_lse: bool):
    q, k, v = _unpack(qkv, num_heads)
    B, H, N, D = q.shape
    o = new_output((B, N, H * D), dtype=qkv.dtype, device=qkv.device)
    lse = new_output((B, H, N), dtype=torch.float32, device=qkv.device) if with_lse else None
    _forward(q, k, v, o, _packed_out_strides(B, N, H, D, H * D), lse, mask, scale)
    return o, lse


@torch.library.triton_op(op_name("attention_qkvpacked", "triton", "fwd"), mutates_args=())
def _qkvpacked_fwd(
    qkv: torch.Tensor, num_heads: int, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (o (B, N, H * D), lse (B, H, N) fp32, base 2 as in ``attention_triton_fwd``)."""
    return _qkvpacked_forward(qkv, num_heads, mask, scale, True)


@torch.library.triton_op(op_name("attention_qkvpacked", "triton", "infer"), mutates_args=())
def _qkvpacked_infer(qkv: torch.Tensor, num_heads: int, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return _qkvpacked_forward(qkv, num_heads, mask, scale, False)[0]


@torch.library.triton_op(op_name("attention_qkvpacked", "triton", "bwd"), mutates_args=())
def _qkvpacked_bwd(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None,
    num_heads: int, scale: float,
) -> torch.Tensor:
    """-> dqkv (B, N, 3 * H * D), written packed. do, o: (B, N, H * D), any strides for do."""
    q, k, v = _unpack(qkv, num_heads)
    B, H, N, D = q.shape
    dqkv = new_output((B, N, 3 * H * D), dtype=qkv.dtype, device=qkv.device)
    strides = _packed_out_strides(B, N, H, D, 3 * H * D)
    do4 = do.unflatten(-1, (H, D)).transpose(1, 2)
    o_strides = (o.stride(0), D * o.stride(2), o.stride(1), o.stride(2))
    grads = (dqkv, strides, None, strides, None, strides, H * D, 2 * H * D)
    _backward(do4, q, k, v, o, o_strides, lse, mask, scale, grads)
    return dqkv


def _qkvpacked_backward(saved, grads):
    qkv, num_heads, mask, scale = saved.inputs
    o, lse = saved.outputs
    dqkv = get_op("attention_qkvpacked", "triton", "bwd")(grads[0], qkv, o, lse, mask, num_heads, scale)
    return (dqkv if saved.needs_input_grad[0] else None, None, None, None)


wire_autograd("attention_qkvpacked", "triton", num_outputs=1, backward=_qkvpacked_backward, save_outputs=True)
_qkvpacked_op = FusedOp("attention_qkvpacked", "triton", num_outputs=1)


# ------------------------------------------------------------------------------- public entries


def attention(q, k, v, mask=None, scale=None, dropout_p=0.0):
    """Triton flash attention, fastvit.reference.attention's meaning. q: (B, H, Nq, D), k, v: (B, H, Nk, D).

    ``dropout_p > 0`` is not fused: it runs the eager reference (torch's RNG, reproducible under
    ``torch.manual_seed``), so explicit "triton" stays usable in training with attention dropout.
    """
    if dropout_p > 0:
        return reference.attention(q, k, v, mask, scale, dropout_p)
    return _attention_op(q, k, v, mask, _scale(scale, q.shape[-1]))


def attention_qkvpacked(qkv, num_heads, mask=None, scale=None, dropout_p=0.0):
    """Triton flash attention on the packed projection. qkv: (B, N, 3 * H * D) -> (B, N, H * D).

    q, k, v are read in place from qkv and the output is written as (B, N, H * D), forward and
    backward (dqkv packed) alike. ``dropout_p > 0`` runs the eager reference, as :func:`attention`.
    """
    if dropout_p > 0:
        return reference.attention_qkvpacked(qkv, num_heads, mask, scale, dropout_p)
    D = qkv.shape[-1] // (3 * num_heads)
    return _qkvpacked_op(qkv, num_heads, mask, _scale(scale, D))
