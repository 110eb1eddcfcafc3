"""Embed family: ViT's patch embedding as an implicit GEMM, T2T-ViT's soft split as a gather and its
backward as a fold. Read top to bottom: index helpers, kernels, launch configuration, launchers, the
torch.library ops (fastvit._library's scheme) and the entry points fastvit/ops/embed.py calls.

patch_embed  x (B, C, H, W), weight (D, C, p, p) conv layout, or (D, p*p*C) with patch_order="hwc"
             -> (B, L (+1), D). GEMM rows are tokens m = (b, hp, wp), the reduction dim is the patch's
             features k = (c, i, j) (or (i, j, c)). Forward, one launch: grid = M/BM x D/BN tiles (N tiles
             of a row block adjacent in launch order, so the gathered A tile is re-read from L2); the A
             tile is gathered straight from the image through its real strides (NCHW, channels_last, any
             view; p is a constexpr so 16-pixel rows load as vectors), the weight is read through its own
             strides as the B operand; the epilogue adds bias and pos_embed and stores each token at its
             final row, rows with t == 0 also store their image's cls token (+ pos_embed[0]). No im2col
             tensor, no cat, no extra add. Optional LayerNorms (vit-pytorch): the pre-norm over a patch's
             K features by a statistics pass over the gathered A (Chan-merged per chunk) and A normalised
             in registers; the post-norm over D by programs that own whole rows (grid = M/BM, loop over N):
             pass 1 stores z and merges row statistics, pass 2 re-reads z (L2) and writes
             LN(z) + pos. Saved for the backward (_fwd): z with a post-norm, fp32 mean/rstd per token.
   backward  (1) dy summed over the batch ([BT, BB, BD] tiles): d pos_embed, d cls_token and the bias;
             (2) with a post-norm, its backward over whole rows -> dz and partial parameter sums;
             (3) dW: a split-M GEMM dz^T @ A over recomputed patches into an fp32 (S, D, K) buffer,
             summed in a fixed order by a finishing kernel that also applies the pre-norm's affine
             (dW = G g1 + db b1) and gives its gradients (d g1 = sum_d W G, d b1 = sum_d W db) without
             an M x K GEMM; (4) only when x needs a gradient: dz @ W scattered back into the image (the
             patches do not overlap), through the pre-norm's row backward (fp32 scratch) when there
             is one. Deterministic: every reduction has a fixed order, no atomics.
soft_split   x (B, C, H, W) -> (B, L, C*kh*kw) = F.unfold(...).transpose(1, 2): a gather, geometry
             constexpr. soft_split_layer_norm normalises each token's row in registers (BF >= F), so the
             un-normalised (B, L, C*k*k) tensor is never written; saves fp32 mean/rstd per token.
   backward  the fold: each program owns BC channels x BP pixels of one image and sums the at most
             ceil(k/s)^2 windows covering each pixel in a fixed order (no atomics). With the LayerNorm,
             a row kernel first computes per token c1 = mean(w dy), c2 = mean(w dy xhat) and the weight
             and bias partial sums; the fold then applies rstd (w dy - c1 - xhat c2) per window, xhat
             from the pixel itself: no (B, L, F) gradient tensor is written either.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fastvit._library import FusedOp, get_op, new_output, op_name, wire_autograd
from fastvit.kernels._common import autotune_configs, bucket, input_precision, interpreting, wrap_triton

# ----------------------------------------------------------------------------------------------
# Index helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _patch_cols(kk, C, PH, PW, HWC: tl.constexpr):
    """Feature index -> position (c, i, j) in the patch; features ordered (c, i, j), or (i, j, c)."""
    if HWC:
        c = kk % C
        ij = kk // C
        i = ij // PW
        j = ij % PW
    else:
        c = kk // (PH * PW)
        r = kk % (PH * PW)
        i = r // PW
        j = r % PW
    return c, i, j


@triton.jit
def _token_rows(rm, L, WP, PH, PW, sb, sh, sw):
    """Token index m = (b, t), t = (hp, wp) -> (b, t, offset of the patch's top-left pixel)."""
    b = rm // L
    t = rm % L
    hp = t // WP
    wp = t % WP
    off = b.to(tl.int64) * sb + (hp * PH).to(tl.int64) * sh + (wp * PW).to(tl.int64) * sw
    return b, t, off


@triton.jit
def _chan_merge(mean, m2, cnt, v, mask, nc):
    """Merge a chunk's values v (masked lanes excluded, nc of them valid per row) into running
    per-row (mean, M2, count) statistics (Chan et al.): exact for offset data, unlike E[x^2] - E[x]^2."""
    cmean = tl.sum(tl.where(mask, v, 0.0), axis=1) / nc
    dev = tl.where(mask, v - cmean[:, None], 0.0)
    cm2 = tl.sum(dev * dev, axis=1)
    tot = cnt + nc
    delta = cmean - mean
    mean = mean + delta * (nc / tot)
    m2 = m2 + cm2 + delta * delta * (cnt * (nc / tot))
    return mean, m2, tot


@triton.jit
def _store_tokens(y, m_mask, b, t, rn, n_mask, out_ptr, pos_ptr, cls_ptr, sob, sot, spt, spd,
                  HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr):
    """Write patch-token values y [BM, BN] (fp32) at out[b, t + has_cls] after adding pos_embed; rows
    with t == 0 also write their image's cls token (+ pos_embed[0]) at out[b, 0]."""
    if HAS_CLS:
        row = t + 1
    else:
        row = t
    mask = m_mask[:, None] & n_mask[None, :]
    if HAS_POS:
        y += tl.load(pos_ptr + row[:, None] * spt + rn[None, :] * spd, mask=mask, other=0.0).to(tl.float32)
    base = b.to(tl.int64) * sob
    tl.store(out_ptr + (base + row.to(tl.int64) * sot)[:, None] + rn[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_CLS:
        cls = tl.load(cls_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_POS:
            cls += tl.load(pos_ptr + rn * spd, mask=n_mask, other=0.0).to(tl.float32)
        first = m_mask & (t == 0)
        tile = tl.zeros_like(y) + cls[None, :]
        tl.store(out_ptr + base[:, None] + rn[None, :], tile.to(out_ptr.dtype.element_ty),
                 mask=first[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# patch_embed kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _patch_embed_fwd(
    x_ptr, w_ptr, bias_ptr, pos_ptr, cls_ptr, prew_ptr, preb_ptr, postw_ptr, postb_ptr,
    out_ptr, z_ptr, mu1_ptr, r1_ptr, mu2_ptr, r2_ptr,
    M, L, WP, C, D, K,
    sxb, sxc, sxh, sxw, swd, swc, swi, swj, spt, spd, sob, sot, szb, szt, eps, M_BUCKET,
    PH: tl.constexpr, PW: tl.constexpr, HWC: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, HAS_CLS: tl.constexpr,
    PRE_NORM: tl.constexpr, PRE_W: tl.constexpr, PRE_B: tl.constexpr,
    POST_NORM: tl.constexpr, POST_W: tl.constexpr, POST_B: tl.constexpr, SAVE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One [BM tokens, BN features] tile of the output (all N tiles of a row block with POST_NORM)."""
    pid = tl.program_id(0)
    if POST_NORM:  # the program owns whole rows: loop over N, normalise after
        n_iters = tl.cdiv(D, BN)
        pid_m = pid
        pid_n = pid * 0
    else:  # N tiles of one row block are neighbours in launch order: the gathered A tile stays in L2
        n_iters = 1
        num_n = tl.cdiv(D, BN)
        pid_m = pid // num_n
        pid_n = pid % num_n
    rm = pid_m * BM + tl.arange(0, BM)
    m_mask = rm < M
    b, t, xrow = _token_rows(rm, L, WP, PH, PW, sxb, sxh, sxw)
    rk = tl.arange(0, BK)

    if PRE_NORM:  # statistics of each patch's K features, in fp32
        mean1 = tl.zeros([BM], tl.float32)
        m2 = tl.zeros([BM], tl.float32)
        cnt = tl.zeros([BM], tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_mask = kk < K
            c, i, j = _patch_cols(kk, C, PH, PW, HWC)
            mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + xrow[:, None] + (c * sxc + i * sxh + j * sxw)[None, :], mask=mask, other=0.0)
            nc = tl.minimum(K - k0, BK).to(tl.float32)
            mean1, m2, cnt = _chan_merge(mean1, m2, cnt, a.to(tl.float32), mask, nc)
        rstd1 = tl.rsqrt(m2 / K + eps)
        if SAVE:  # (a [BM] vector condition: the interpreter rejects a scalar one broadcast into a mask)
            first = m_mask & ((rm * 0 + pid_n) == 0)
            tl.store(mu1_ptr + rm, mean1, mask=first)
            tl.store(r1_ptr + rm, rstd1, mask=first)

    if POST_NORM:
        mean2 = tl.zeros([BM], tl.float32)
        m2b = tl.zeros([BM], tl.float32)
        cnt2 = tl.zeros([BM], tl.float32)
        zrow = b.to(tl.int64) * szb + t.to(tl.int64) * szt

    for nb in range(0, n_iters):
        n0 = (pid_n + nb) * BN
        rn = n0 + tl.arange(0, BN)
        n_mask = rn < D
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            k_mask = kk < K
            c, i, j = _patch_cols(kk, C, PH, PW, HWC)
            mask = m_mask[:, None] & k_mask[None, :]
            a = tl.load(x_ptr + xrow[:, None] + (c * sxc + i * sxh + j * sxw)[None, :], mask=mask, other=0.0)
            if PRE_NORM:
                af = (a.to(tl.float32) - mean1[:, None]) * rstd1[:, None]
                if PRE_W:
                    af = af * tl.load(prew_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
                if PRE_B:
                    af = af + tl.load(preb_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
                a = tl.where(mask, af, 0.0)
            a = a.to(w_ptr.dtype.element_ty)
            wt = tl.load(w_ptr + rn[None, :] * swd + (c * swc + i * swi + j * swj)[:, None],
                         mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, wt, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if POST_NORM:
            # z (the projection, in the output dtype, as eager writes it) goes to z_ptr: the saved
            # buffer in training, the output rows themselves in inference; pass 2 reads it back.
            zmask = m_mask[:, None] & n_mask[None, :]
            zr = acc.to(z_ptr.dtype.element_ty)
            tl.store(z_ptr + zrow[:, None] + rn[None, :], zr, mask=zmask)
            nc2 = tl.minimum(D - n0, BN).to(tl.float32)
            mean2, m2b, cnt2 = _chan_merge(mean2, m2b, cnt2, zr.to(tl.float32), zmask, nc2)
        else:
            _store_tokens(acc, m_mask, b, t, rn, n_mask, out_ptr, pos_ptr, cls_ptr, sob, sot, spt, spd, HAS_POS, HAS_CLS)

    if POST_NORM:
        rstd2 = tl.rsqrt(m2b / D + eps)
        if SAVE:
            tl.store(mu2_ptr + rm, mean2, mask=m_mask)
            tl.store(r2_ptr + rm, rstd2, mask=m_mask)
        tl.debug_barrier()  # pass 1's z stores are visible to every thread of the program
        for nb in range(0, n_iters):
            rn = nb * BN + tl.arange(0, BN)
            n_mask = rn < D
            zmask = m_mask[:, None] & n_mask[None, :]
            zf = tl.load(z_ptr + zrow[:, None] + rn[None, :], mask=zmask, other=0.0).to(tl.float32)
            y = (zf - mean2[:, None]) * rstd2[:, None]
            if POST_W:
                y = y * tl.load(postw_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            if POST_B:
                y = y + tl.load(postb_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            _store_tokens(y, m_mask, b, t, rn, n_mask, out_ptr, pos_ptr, cls_ptr, sob, sot, spt, spd, HAS_POS, HAS_CLS)


@triton.jit
def _patch_dy_colsum(
    dy_ptr, dsum_ptr, dpos_ptr, dcls_ptr, B, LT, D, sdb, sdt, sdd,
    NEED_POS: tl.constexpr, NEED_CLS: tl.constexpr, BT: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr,
):
    """Sum dy (B, L', D) over the batch into dsum (L', D) fp32, and d pos_embed (pos's dtype) and
    d cls_token (row 0). A [BT, BB, BD] tile reads BB images per step: enough loads in flight."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    rt = pid_t * BT + tl.arange(0, BT)
    rb = tl.arange(0, BB)
    rd = pid_d * BD + tl.arange(0, BD)
    t_mask = rt < LT
    d_mask = rd < D
    ptrs = dy_ptr + rt.to(tl.int64)[:, None, None] * sdt + rb.to(tl.int64)[None, :, None] * sdb + rd[None, None, :] * sdd
    acc = tl.zeros([BT, BD], dtype=tl.float32)
    for b0 in range(0, B, BB):
        mask = t_mask[:, None, None] & ((b0 + rb) < B)[None, :, None] & d_mask[None, None, :]
        acc += tl.sum(tl.load(ptrs, mask=mask, other=0.0).to(tl.float32), axis=1)
        ptrs += BB * sdb
    mask = t_mask[:, None] & d_mask[None, :]
    tl.store(dsum_ptr + rt[:, None] * D + rd[None, :], acc, mask=mask)
    if NEED_POS:
        tl.store(dpos_ptr + rt[:, None] * D + rd[None, :], acc.to(dpos_ptr.dtype.element_ty), mask=mask)
    if NEED_CLS:
        tl.store(dcls_ptr + rd[None, :] + 0 * rt[:, None], acc.to(dcls_ptr.dtype.element_ty),
                 mask=mask & (rt == 0)[:, None])


@triton.jit
def _patch_post_ln_bwd(
    dy_ptr, z_ptr, mu_ptr, rstd_ptr, w_ptr, dz_ptr, part_ptr, M, L, D, sdb, sdt, sdd, NPROG,
    HAS_CLS: tl.constexpr, POST_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """Backward of the post-projection LayerNorm over whole rows: dz (M, D) in z's dtype, and per
    program the partial sums of dy * zhat (d weight), dy (d bias) and dz (the projection's d bias)."""
    pid = tl.program_id(0)
    rd = tl.arange(0, BD)
    d_mask = rd < D
    if POST_W:
        w = tl.load(w_ptr + rd, mask=d_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(d_mask, 1.0, 0.0)
    acc_w = tl.zeros([BD], dtype=tl.float32)
    acc_b = tl.zeros([BD], dtype=tl.float32)
    acc_z = tl.zeros([BD], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, BT), NPROG):
        rm = blk * BT + tl.arange(0, BT)
        m_mask = rm < M
        mask = m_mask[:, None] & d_mask[None, :]
        b = rm // L
        t = rm % L
        if HAS_CLS:
            t = t + 1
        drow = b.to(tl.int64) * sdb + t.to(tl.int64) * sdt
        g = tl.load(dy_ptr + drow[:, None] + rd[None, :] * sdd, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rm.to(tl.int64)[:, None] * D + rd[None, :], mask=mask, other=0.0).to(tl.float32)
        mu = tl.load(mu_ptr + rm, mask=m_mask, other=0.0)
        r = tl.load(rstd_ptr + rm, mask=m_mask, other=0.0)
        zhat = tl.where(mask, (z - mu[:, None]) * r[:, None], 0.0)
        wg = g * w[None, :]
        c1 = tl.sum(wg, axis=1) / D
        c2 = tl.sum(wg * zhat, axis=1) / D
        dz = (r[:, None] * (wg - c1[:, None] - zhat * c2[:, None])).to(dz_ptr.dtype.element_ty)
        tl.store(dz_ptr + rm.to(tl.int64)[:, None] * D + rd[None, :], dz, mask=mask)
        acc_w += tl.sum(g * zhat, axis=0)
        acc_b += tl.sum(g, axis=0)
        acc_z += tl.sum(tl.where(mask, dz.to(tl.float32), 0.0), axis=0)
    tl.store(part_ptr + pid * 3 * D + rd, acc_w, mask=d_mask)
    tl.store(part_ptr + pid * 3 * D + D + rd, acc_b, mask=d_mask)
    tl.store(part_ptr + pid * 3 * D + 2 * D + rd, acc_z, mask=d_mask)


@triton.jit
def _patch_dw(
    x_ptr, dz_ptr, mu1_ptr, r1_ptr, part_ptr,
    M, L, WP, C, D, K, CHUNK,
    sxb, sxc, sxh, sxw, szb, szt, szd, M_BUCKET,
    PH: tl.constexpr, PW: tl.constexpr, HWC: tl.constexpr, PRE_NORM: tl.constexpr,
    BM: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """part[s, d, k] = sum over the tokens m of split s of dz[m, d] * A[m, k], A = the recomputed patches
    (normalised without affine with PRE_NORM). Splits over M give enough programs; no atomics."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    num_d = tl.cdiv(D, BD)
    pid_k = pid % num_k
    rest = pid // num_k
    pid_d = rest % num_d
    s = rest // num_d
    rd = pid_d * BD + tl.arange(0, BD)
    rk = pid_k * BK + tl.arange(0, BK)
    d_mask = rd < D
    k_mask = rk < K
    c, i, j = _patch_cols(rk, C, PH, PW, HWC)
    xcol = c * sxc + i * sxh + j * sxw
    acc = tl.zeros([BD, BK], dtype=tl.float32)
    m_start = s * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    for m0 in range(m_start, m_end, BM):
        rm = m0 + tl.arange(0, BM)
        m_mask = rm < m_end
        b, t, xrow = _token_rows(rm, L, WP, PH, PW, sxb, sxh, sxw)
        mask = m_mask[:, None] & k_mask[None, :]
        a = tl.load(x_ptr + xrow[:, None] + xcol[None, :], mask=mask, other=0.0)
        if PRE_NORM:
            mu = tl.load(mu1_ptr + rm, mask=m_mask, other=0.0)
            r = tl.load(r1_ptr + rm, mask=m_mask, other=0.0)
            a = tl.where(mask, (a.to(tl.float32) - mu[:, None]) * r[:, None], 0.0)
        a = a.to(dz_ptr.dtype.element_ty)
        zrow = b.to(tl.int64) * szb + t.to(tl.int64) * szt
        dzt = tl.load(dz_ptr + zrow[None, :] + rd[:, None] * szd, mask=d_mask[:, None] & m_mask[None, :], other=0.0)
        acc = tl.dot(dzt, a, acc, input_precision=INPUT_PRECISION)
    tl.store(part_ptr + (s * D + rd).to(tl.int64)[:, None] * K + rk[None, :], acc,
             mask=d_mask[:, None] & k_mask[None, :])


@triton.jit
def _patch_dw_finish(
    part_ptr, w_ptr, db_ptr, prew_ptr, preb_ptr, dw_ptr, col_ptr,
    S, D, K, C, swd, swc, swi, swj,
    PH: tl.constexpr, PW: tl.constexpr, HWC: tl.constexpr, PRE_W: tl.constexpr, PRE_B: tl.constexpr,
    NEED_W: tl.constexpr, NEED_PRE_W: tl.constexpr, NEED_PRE_B: tl.constexpr,
    BD: tl.constexpr, BK: tl.constexpr,
):
    """For one [BD, BK] tile: G = sum_s part[s] in a fixed order, then dW = G * g1 + db (x) b1 (g1, b1:
    the pre-norm affine, db = sum of dz); and for the pre-norm parameters the per-tile column sums
    col[pid_d, 0, k] = sum_d W[d, k] G[d, k] (d g1) and col[pid_d, 1, k] = sum_d W[d, k] db[d] (d b1)."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    rk = pid_k * BK + tl.arange(0, BK)
    rd = pid_d * BD + tl.arange(0, BD)
    k_mask = rk < K
    d_mask = rd < D
    mask = d_mask[:, None] & k_mask[None, :]
    if NEED_W or NEED_PRE_W:
        G = tl.zeros([BD, BK], dtype=tl.float32)
        ptrs = part_ptr + rd.to(tl.int64)[:, None] * K + rk[None, :]
        for _ in range(0, S):
            G += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += D * K
    if PRE_B:
        db = tl.load(db_ptr + rd, mask=d_mask, other=0.0)
    if NEED_W:
        dw = G
        if PRE_W:
            dw = dw * tl.load(prew_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        if PRE_B:
            dw = dw + db[:, None] * tl.load(preb_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(dw_ptr + rd.to(tl.int64)[:, None] * K + rk[None, :], dw.to(dw_ptr.dtype.element_ty), mask=mask)
    if NEED_PRE_W or NEED_PRE_B:
        c, i, j = _patch_cols(rk, C, PH, PW, HWC)
        w = tl.load(w_ptr + rd[:, None] * swd + (c * swc + i * swi + j * swj)[None, :], mask=mask, other=0.0).to(tl.float32)
        if NEED_PRE_W:
            tl.store(col_ptr + pid_d * 2 * K + rk, tl.sum(w * G, axis=0), mask=k_mask)
        if NEED_PRE_B:
            tl.store(col_ptr + pid_d * 2 * K + K + rk, tl.sum(w * db[:, None], axis=0), mask=k_mask)


@triton.jit
def _patch_dx(
    dz_ptr, w_ptr, prew_ptr, dx_ptr, M, L, WP, C, D, K,
    szb, szt, szd, swd, swc, swi, swj, sgb, sgc, sgh, sgw, M_BUCKET,
    PH: tl.constexpr, PW: tl.constexpr, HWC: tl.constexpr, PRE_NORM: tl.constexpr, PRE_W: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """dA = dz @ W for a [BM tokens, BK features] tile, scattered into dx (B, C, H, W) at the patches'
    pixels (they do not overlap), or, with PRE_NORM, dA * g1 into an fp32 (M, K) scratch for the
    LayerNorm backward."""
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, BK)
    pid_m = pid // num_k
    pid_k = pid % num_k
    rm = pid_m * BM + tl.arange(0, BM)
    rk = pid_k * BK + tl.arange(0, BK)
    m_mask = rm < M
    k_mask = rk < K
    c, i, j = _patch_cols(rk, C, PH, PW, HWC)
    b = rm // L
    t = rm % L
    zrow = b.to(tl.int64) * szb + t.to(tl.int64) * szt
    wcol = c * swc + i * swi + j * swj
    acc = tl.zeros([BM, BK], dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        d_mask = rd < D
        dzt = tl.load(dz_ptr + zrow[:, None] + rd[None, :] * szd, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + rd[:, None] * swd + wcol[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(dzt, wt, acc, input_precision=INPUT_PRECISION)
    mask = m_mask[:, None] & k_mask[None, :]
    if PRE_NORM:
        if PRE_W:
            acc = acc * tl.load(prew_ptr + rk, mask=k_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(dx_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], acc, mask=mask)
    else:
        _, _, grow = _token_rows(rm, L, WP, PH, PW, sgb, sgh, sgw)
        tl.store(dx_ptr + grow[:, None] + (c * sgc + i * sgh + j * sgw)[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_pre_ln_dx(
    g_ptr, x_ptr, mu_ptr, rstd_ptr, dx_ptr, M, L, WP, C, K,
    sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    PH: tl.constexpr, PW: tl.constexpr, HWC: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
):
    """Backward of the pre-projection LayerNorm over each patch's K features (whole rows): from
    g = d(normalised patch) * g1 (fp32 scratch) and the recomputed xhat, scatter dx into the image."""
    pid = tl.program_id(0)
    rm = pid * BT + tl.arange(0, BT)
    rk = tl.arange(0, BK)
    m_mask = rm < M
    k_mask = rk < K
    mask = m_mask[:, None] & k_mask[None, :]
    c, i, j = _patch_cols(rk, C, PH, PW, HWC)
    _, _, xrow = _token_rows(rm, L, WP, PH, PW, sxb, sxh, sxw)
    xv = tl.load(x_ptr + xrow[:, None] + (c * sxc + i * sxh + j * sxw)[None, :], mask=mask, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + rm, mask=m_mask, other=0.0)
    r = tl.load(rstd_ptr + rm, mask=m_mask, other=0.0)
    xhat = tl.where(mask, (xv - mu[:, None]) * r[:, None], 0.0)
    g = tl.load(g_ptr + rm.to(tl.int64)[:, None] * K + rk[None, :], mask=mask, other=0.0)
    c1 = tl.sum(g, axis=1) / K
    c2 = tl.sum(g * xhat, axis=1) / K
    dx = r[:, None] * (g - c1[:, None] - xhat * c2[:, None])
    _, _, grow = _token_rows(rm, L, WP, PH, PW, sgb, sgh, sgw)
    tl.store(dx_ptr + grow[:, None] + (c * sgc + i * sgh + j * sgw)[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# soft_split kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _unfold_gather(x_ptr, rm, m_mask, rf, f_mask, L, OW, H, W, KH, KW, SH, SW, PADH, PADW, sxb, sxc, sxh, sxw):
    """The soft split's [BT tokens, BF features] tile: x at each window's (c, ki, kj), 0 in the padding."""
    b = rm // L
    l = rm % L
    oh = l // OW
    ow = l % OW
    c = rf // (KH * KW)
    r = rf % (KH * KW)
    ki = r // KW
    kj = r % KW
    hh = oh[:, None] * SH - PADH + ki[None, :]
    ww = ow[:, None] * SW - PADW + kj[None, :]
    inb = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W) & m_mask[:, None] & f_mask[None, :]
    ptrs = x_ptr + (b.to(tl.int64) * sxb)[:, None] + (c * sxc)[None, :] + hh * sxh + ww * sxw
    return tl.load(ptrs, mask=inb, other=0.0)


@triton.jit
def _soft_split_fwd(
    x_ptr, out_ptr, lnw_ptr, lnb_ptr, mean_ptr, rstd_ptr,
    M, L, OW, H, W, F, sxb, sxc, sxh, sxw, eps, so,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PADH: tl.constexpr, PADW: tl.constexpr,
    NORM: tl.constexpr, LN_W: tl.constexpr, LN_B: tl.constexpr, SAVE: tl.constexpr,
    BT: tl.constexpr, BF: tl.constexpr,
):
    """out (B*L, F) = the unfolded windows, rows ``so`` elements apart; with NORM, LayerNorm over each
    whole row (BF >= F)."""
    pid = tl.program_id(0)
    num_f = tl.cdiv(F, BF)
    pid_t = pid // num_f
    pid_f = pid % num_f
    rm = pid_t * BT + tl.arange(0, BT)
    rf = pid_f * BF + tl.arange(0, BF)
    m_mask = rm < M
    f_mask = rf < F
    mask = m_mask[:, None] & f_mask[None, :]
    v = _unfold_gather(x_ptr, rm, m_mask, rf, f_mask, L, OW, H, W, KH, KW, SH, SW, PADH, PADW, sxb, sxc, sxh, sxw)
    optrs = out_ptr + rm.to(tl.int64)[:, None] * so + rf[None, :]
    if NORM:
        vf = v.to(tl.float32)
        mean = tl.sum(vf, axis=1) / F
        dev = tl.where(mask, vf - mean[:, None], 0.0)
        rstd = tl.rsqrt(tl.sum(dev * dev, axis=1) / F + eps)
        y = dev * rstd[:, None]
        if LN_W:
            y = y * tl.load(lnw_ptr + rf, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        if LN_B:
            y = y + tl.load(lnb_ptr + rf, mask=f_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(optrs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE:
            tl.store(mean_ptr + rm, mean, mask=m_mask)
            tl.store(rstd_ptr + rm, rstd, mask=m_mask)
    else:
        tl.store(optrs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _soft_split_ln_bwd_rows(
    dy_ptr, x_ptr, lnw_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr, part_ptr,
    M, L, OW, H, W, F, sxb, sxc, sxh, sxw, sdb, sdl, sdf, NPROG,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PADH: tl.constexpr, PADW: tl.constexpr,
    LN_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_P: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
):
    """LayerNorm backward over whole rows of the (recomputed) soft split: the per-token scalars
    c1 = mean(w * dy), c2 = mean(w * dy * xhat) the fold needs, and per program the partial sums of
    dy * xhat and dy (d weight, d bias)."""
    pid = tl.program_id(0)
    rf = tl.arange(0, BF)
    f_mask = rf < F
    if LN_W:
        w = tl.load(lnw_ptr + rf, mask=f_mask, other=0.0).to(tl.float32)
    else:
        w = tl.where(f_mask, 1.0, 0.0)
    acc_w = tl.zeros([BF], dtype=tl.float32)
    acc_b = tl.zeros([BF], dtype=tl.float32)
    for blk in range(pid, tl.cdiv(M, BT), NPROG):
        rm = blk * BT + tl.arange(0, BT)
        m_mask = rm < M
        mask = m_mask[:, None] & f_mask[None, :]
        v = _unfold_gather(x_ptr, rm, m_mask, rf, f_mask, L, OW, H, W, KH, KW, SH, SW, PADH, PADW, sxb, sxc, sxh, sxw)
        mu = tl.load(mean_ptr + rm, mask=m_mask, other=0.0)
        r = tl.load(rstd_ptr + rm, mask=m_mask, other=0.0)
        xhat = tl.where(mask, (v.to(tl.float32) - mu[:, None]) * r[:, None], 0.0)
        drow = (rm // L).to(tl.int64) * sdb + (rm % L).to(tl.int64) * sdl
        g = tl.load(dy_ptr + drow[:, None] + rf[None, :] * sdf, mask=mask, other=0.0).to(tl.float32)
        if NEED_P:
            acc_w += tl.sum(g * xhat, axis=0)
            acc_b += tl.sum(g, axis=0)
        if NEED_DX:
            wg = g * w[None, :]
            tl.store(c1_ptr + rm, tl.sum(wg, axis=1) / F, mask=m_mask)
            tl.store(c2_ptr + rm, tl.sum(wg * xhat, axis=1) / F, mask=m_mask)
    if NEED_P:
        tl.store(part_ptr + pid * 2 * F + rf, acc_w, mask=f_mask)
        tl.store(part_ptr + pid * 2 * F + F + rf, acc_b, mask=f_mask)


@triton.jit
def _soft_split_fold(
    dy_ptr, x_ptr, dx_ptr, lnw_ptr, mean_ptr, rstd_ptr, c1_ptr, c2_ptr,
    C, H, W, L, OH, OW,
    sdb, sdl, sdf, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PADH: tl.constexpr, PADW: tl.constexpr,
    NORM: tl.constexpr, LN_W: tl.constexpr, NH: tl.constexpr, NW: tl.constexpr,
    BC: tl.constexpr, BP: tl.constexpr,
):
    """dx[b, c, h, w] = sum over the windows covering (h, w) of d(soft split)[b, l, (c, ki, kj)], each
    program owning BC channels x BP pixels of one image and visiting the at most NH x NW windows in a
    fixed order (deterministic). With NORM, the LayerNorm backward is applied per window on the fly:
    rstd_l * (w_f dy - c1_l - xhat c2_l), xhat from this very pixel."""
    pid = tl.program_id(0)
    num_p = tl.cdiv(H * W, BP)
    num_c = tl.cdiv(C, BC)
    pid_p = pid % num_p
    rest = pid // num_p
    pid_c = rest % num_c
    b = rest // num_c
    rc = pid_c * BC + tl.arange(0, BC)
    rp = pid_p * BP + tl.arange(0, BP)
    c_mask = rc < C
    p_mask = rp < H * W
    h = rp // W
    w = rp % W
    b64 = b.to(tl.int64)
    if NORM:
        xv = tl.load(x_ptr + b64 * sxb + (rc * sxc)[:, None] + (h * sxh + w * sxw)[None, :],
                     mask=c_mask[:, None] & p_mask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BC, BP], dtype=tl.float32)
    for dh in tl.static_range(NH):
        oh = (h + PADH) // SH - dh
        ki = h + PADH - oh * SH
        vh = (oh >= 0) & (oh < OH) & (ki < KH)
        for dw in tl.static_range(NW):
            ow = (w + PADW) // SW - dw
            kj = w + PADW - ow * SW
            valid = vh & (ow >= 0) & (ow < OW) & (kj < KW) & p_mask
            mask = c_mask[:, None] & valid[None, :]
            l = oh * OW + ow
            f = rc[:, None] * (KH * KW) + (ki * KW + kj)[None, :]
            g = tl.load(dy_ptr + b64 * sdb + l.to(tl.int64)[None, :] * sdl + f * sdf, mask=mask, other=0.0).to(tl.float32)
            if NORM:
                if LN_W:
                    g = g * tl.load(lnw_ptr + f, mask=mask, other=0.0).to(tl.float32)
                tok = b * L + l
                mt = tl.load(mean_ptr + tok, mask=valid, other=0.0)
                rt = tl.load(rstd_ptr + tok, mask=valid, other=0.0)
                c1 = tl.load(c1_ptr + tok, mask=valid, other=0.0)
                c2 = tl.load(c2_ptr + tok, mask=valid, other=0.0)
                xhat = (xv - mt[None, :]) * rt[None, :]
                g = tl.where(mask, rt[None, :] * (g - c1[None, :] - xhat * c2[None, :]), 0.0)
            acc += g
    tl.store(dx_ptr + b64 * sgb + (rc * sgc)[:, None] + (h * sgh + w * sgw)[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=c_mask[:, None] & p_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# Under the interpreter every kernel runs one fixed config: the largest tiles up to these caps, cut
# down to the problem (the interpreter's tl.dot is a slow numpy matmul over the padded tile, and every
# program step costs milliseconds). Tests lower the caps to cover the tail masking.
INTERPRETER_TILES = {
    "fwd": {"BM": 256, "BN": 128, "BK": 4096},
    "dw": {"BM": 256, "BD": 128, "BK": 4096},
    "dx": {"BM": 256, "BK": 4096, "BD": 128},
    "splits": 1,  # M splits of the dW GEMM
    "rows": 256,  # most rows of the whole-row kernels
    "colsum": {"BT": 64, "BD": 128},
    "finish": {"BD": 128, "BK": 4096},
    "unfold": {"BT": 128, "BF": 256},
    "fold": {"BC": 64, "BP": 1024},
}


def _interp_tiles(name: str, **dims: int) -> dict:
    """The interpreter's tiles for kernel ``name``: each cap cut to the next power of two >= its dim (min 16)."""
    caps = INTERPRETER_TILES[name]
    return {k: min(caps[k], max(16, triton.next_power_of_2(int(dims[k])))) for k in caps}


def _cfg(c: dict, warps: int, stages: int) -> triton.Config:
    return triton.Config(c, num_warps=warps, num_stages=stages)


# Autotuning keys: rows (M = batch x patches) bucketed to a power of two, so a new batch size does not
# re-tune; every flag that changes the compiled kernel.
_FWD_KEY = ["M_BUCKET", "D", "K", "HWC", "HAS_BIAS", "HAS_POS", "HAS_CLS", "PRE_NORM", "PRE_W", "PRE_B", "POST_NORM",
            "POST_W", "POST_B", "SAVE", "INPUT_PRECISION"]


@functools.cache
def _tuned(name: str):
    """The GPU entry point of a GEMM kernel: triton.autotune over a few tiles, keyed on the shape."""
    if name == "fwd":
        # 128x256 (8 warps) and 128x128x32 (4 warps) spilled at sm_90 (328 and 112 stack bytes in timm's
        # form); the vit-pytorch form with both LayerNorms fused spills in every tile, least at 128x64.
        configs = [
            _cfg({"BM": 128, "BN": 128, "BK": 64}, 8, 3),
            _cfg({"BM": 128, "BN": 64, "BK": 64}, 4, 4),
            _cfg({"BM": 64, "BN": 128, "BK": 64}, 4, 4),
            _cfg({"BM": 64, "BN": 64, "BK": 32}, 4, 3),
        ]
        return triton.autotune(autotune_configs(configs), key=_FWD_KEY)(_patch_embed_fwd)
    if name == "dw":
        configs = [
            _cfg({"BM": 64, "BD": 128, "BK": 128}, 8, 3),
            _cfg({"BM": 32, "BD": 128, "BK": 128}, 8, 4),
            _cfg({"BM": 64, "BD": 64, "BK": 128}, 4, 4),
            _cfg({"BM": 64, "BD": 128, "BK": 64}, 4, 4),
            _cfg({"BM": 32, "BD": 64, "BK": 64}, 4, 3),
        ]
        key = ["M_BUCKET", "D", "K", "HWC", "PRE_NORM", "INPUT_PRECISION"]
        return triton.autotune(autotune_configs(configs), key=key)(_patch_dw)
    if name == "dx":
        configs = [
            _cfg({"BM": 128, "BK": 128, "BD": 64}, 8, 3),
            _cfg({"BM": 128, "BK": 256, "BD": 64}, 8, 3),
            _cfg({"BM": 128, "BK": 64, "BD": 64}, 4, 4),
            _cfg({"BM": 64, "BK": 128, "BD": 64}, 4, 4),
            _cfg({"BM": 64, "BK": 64, "BD": 32}, 4, 3),
        ]
        key = ["M_BUCKET", "D", "K", "HWC", "PRE_NORM", "PRE_W", "INPUT_PRECISION"]
        return triton.autotune(autotune_configs(configs), key=key)(_patch_dx)
    raise KeyError(name)


def _launch(name: str, kernel, grid, args: tuple, consts: dict, dims: dict) -> None:
    """Launch a GEMM kernel: autotuned on a GPU, the interpreter's fixed tiles on CPU.

    ``grid`` maps the tile sizes (a dict) to the launch grid; ``dims`` the tile names to the problem's."""
    if interpreting():
        tiles = _interp_tiles(name, **dims)
        wrap_triton(kernel)[grid(tiles)](*args, **consts, **tiles)
    else:
        wrap_triton(_tuned(name))[grid](*args, **consts)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sms(device: torch.device) -> int:
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 8


def _rows_programs(M: int, BT: int, device: torch.device) -> int:
    """Programs of a grid-stride whole-row kernel: enough to fill the GPU, few partial rows to sum."""
    return max(1, min(triton.cdiv(M, BT), 4 * _sms(device)))


def _row_tile(width: int) -> tuple[int, int]:
    """(BT, BW) for kernels that hold whole rows of ``width``: BW = next power of two, BT rows fill
    8K elements on a GPU (registers), 64K under the interpreter (fewer programs)."""
    bw = max(16, triton.next_power_of_2(width))
    if interpreting():
        return max(1, min(INTERPRETER_TILES["rows"], 65536 // bw)), bw
    return max(1, min(64, 8192 // bw)), bw


def _weight_strides(weight: torch.Tensor, C: int, pw: int, hwc: bool) -> tuple[int, int, int, int]:
    """Strides of the weight along (d, c, i, j) of the patch, for conv (D, C, p, p) or hwc-linear (D, p*p*C)."""
    if hwc:
        s1 = weight.stride(1)
        return weight.stride(0), s1, pw * C * s1, C * s1
    return tuple(weight.stride())


def _empty(ref: torch.Tensor) -> torch.Tensor:
    return ref.new_empty(0)


def _dx_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dx in x's memory format (channels_last stays channels_last: coalesced scatter, no copy later)."""
    B, C, H, W = x.shape
    if x.dim() == 4 and x.stride(1) == 1 and C > 1 and not x.is_contiguous():
        return new_output((B, H, W, C), dtype=dtype, device=x.device).permute(0, 3, 1, 2)
    return new_output((B, C, H, W), dtype=dtype, device=x.device)


# ----------------------------------------------------------------------------------------------
# patch_embed launchers
# ----------------------------------------------------------------------------------------------


def patch_embed_forward(x, weight, bias, pos_embed, cls_token, pre_w, pre_b, post_w, post_b,
                        ph, pw, patch_order, pre_norm, post_norm, eps, save):
    """Launch the forward; returns (out, z, mu1, r1, mu2, r2) (saved tensors empty unless ``save``)."""
    B, C, H, W = x.shape
    D = weight.shape[0]
    hwc = patch_order == "hwc"
    WP = W // pw
    L = (H // ph) * WP
    M, K = B * L, C * ph * pw
    has_cls = cls_token is not None
    dev = x.device
    out = new_output((B, L + has_cls, D), dtype=weight.dtype, device=dev)
    swd, swc, swi, swj = _weight_strides(weight, C, pw, hwc)
    pos2 = None if pos_embed is None else pos_embed.reshape(pos_embed.shape[-2], D)
    spt, spd = (0, 0) if pos2 is None else pos2.stride()
    cls1 = None if cls_token is None else cls_token.reshape(D).contiguous()
    f32 = torch.float32
    mu1 = new_output((M,), dtype=f32, device=dev) if (save and pre_norm) else _empty(out)
    r1 = new_output((M,), dtype=f32, device=dev) if (save and pre_norm) else _empty(out)
    mu2 = new_output((M,), dtype=f32, device=dev) if (save and post_norm) else _empty(out)
    r2 = new_output((M,), dtype=f32, device=dev) if (save and post_norm) else _empty(out)
    if post_norm and save:
        z = new_output((B, L, D), dtype=weight.dtype, device=dev)
    elif post_norm:
        z = out[:, int(has_cls):]  # inference: the projection goes to the output rows, normalised in place
    else:
        z = _empty(out)
    szb, szt = (z.stride(0), z.stride(1)) if post_norm else (0, 0)

    def grid(t):
        return (triton.cdiv(M, t["BM"]) * (1 if post_norm else triton.cdiv(D, t["BN"])),)

    args = (
        x, weight, None if bias is None else bias.contiguous(), pos2, cls1,
        None if pre_w is None else pre_w.contiguous(), None if pre_b is None else pre_b.contiguous(),
        None if post_w is None else post_w.contiguous(), None if post_b is None else post_b.contiguous(),
        out, z if post_norm else None, mu1 if save and pre_norm else None, r1 if save and pre_norm else None,
        mu2 if save and post_norm else None, r2 if save and post_norm else None,
        M, L, WP, C, D, K, *x.stride(), swd, swc, swi, swj, spt, spd, out.stride(0), out.stride(1),
        szb, szt, eps, bucket(M),
    )
    consts = dict(
        PH=ph, PW=pw, HWC=hwc, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None, HAS_CLS=has_cls,
        PRE_NORM=pre_norm, PRE_W=pre_w is not None, PRE_B=pre_b is not None,
        POST_NORM=post_norm, POST_W=post_w is not None, POST_B=post_b is not None, SAVE=save,
        INPUT_PRECISION=input_precision(weight.dtype),
    )
    _launch("fwd", _patch_embed_fwd, grid, args, consts, {"BM": M, "BN": D, "BK": K})
    if not save:
        return out
    return out, (z if post_norm and save else _empty(out)), mu1, r1, mu2, r2


def _dw_splits(M: int, D: int, K: int, device: torch.device) -> int:
    """M splits of the dW GEMM: about two programs per SM over (D/128) x (K/128) tiles."""
    if interpreting():
        return INTERPRETER_TILES["splits"]
    tiles = triton.cdiv(D, 128) * triton.cdiv(K, 128)
    return max(1, min(triton.cdiv(2 * _sms(device), tiles), triton.cdiv(M, 256)))


def patch_embed_backward(dy, x, weight, bias, pos_embed, cls_token, pre_w, pre_b, post_w, post_b, z, mu1, r1, mu2, r2,
                         ph, pw, patch_order, pre_norm, post_norm, needs):
    """Gradients (dx, dW, db, d pos_embed, d cls_token, d pre_w, d pre_b, d post_w, d post_b); the ones
    not in ``needs`` come back empty."""
    need_x, need_w, need_b, need_pos, need_cls, need_pre_w, need_pre_b, need_post_w, need_post_b = needs
    B, C, H, W = x.shape
    D = weight.shape[0]
    hwc = patch_order == "hwc"
    WP = W // pw
    L = (H // ph) * WP
    M, K = B * L, C * ph * pw
    has_cls = cls_token is not None
    dev = x.device
    f32 = torch.float32
    dx, dw, db, dpos, dcls, dprew, dpreb, dpostw, dpostb = (_empty(dy) for _ in range(9))
    swd, swc, swi, swj = _weight_strides(weight, C, pw, hwc)
    pre_b_used = pre_norm and pre_b is not None
    need_dbz = need_b or (pre_b_used and (need_w or need_pre_b))  # sum over tokens of dz
    need_dz = need_x or need_w or need_dbz or need_pre_w or need_post_w or need_post_b

    # 1. sums of dy over the batch: d pos_embed, d cls_token, and (summed over the patch rows) the bias
    dysum = None
    if need_pos or need_cls or (not post_norm and need_dbz):
        LT = L + has_cls
        if interpreting():
            t = {**_interp_tiles("colsum", BT=LT, BD=D), "BB": max(2, triton.next_power_of_2(B))}
        else:
            t = {"BT": 2, "BB": 32, "BD": 128}
        dsum = new_output((LT, D), dtype=f32, device=dev)
        if need_pos:
            dpos = new_output(pos_embed.shape, dtype=pos_embed.dtype, device=dev)
        if need_cls:
            dcls = new_output(cls_token.shape, dtype=cls_token.dtype, device=dev)
        wrap_triton(_patch_dy_colsum)[(triton.cdiv(LT, t["BT"]), triton.cdiv(D, t["BD"]))](
            dy, dsum, dpos if need_pos else None, dcls if need_cls else None, B, LT, D, *dy.stride(),
            NEED_POS=need_pos, NEED_CLS=need_cls, BT=t["BT"], BB=t["BB"], BD=t["BD"], num_warps=8,
        )
        dysum = dsum[int(has_cls):].sum(0)

    # 2. dz: the gradient of the projection's output (patch rows of dy, or through the post-norm)
    dbz = None
    if post_norm and need_dz:
        bt, bd = _row_tile(D)
        nprog = _rows_programs(M, bt, dev)
        dz = new_output((M, D), dtype=weight.dtype, device=dev)
        part = new_output((nprog, 3, D), dtype=f32, device=dev)
        wrap_triton(_patch_post_ln_bwd)[(nprog,)](
            dy, z, mu2, r2, None if post_w is None else post_w.contiguous(), dz, part, M, L, D, *dy.stride(), nprog,
            HAS_CLS=has_cls, POST_W=post_w is not None, BT=bt, BD=bd, num_warps=8 if bd >= 2048 else 4,
        )
        sums = part.sum(0)
        if need_post_w:
            dpostw = sums[0].to(post_w.dtype, copy=True)
        if need_post_b:
            dpostb = sums[1].to(post_b.dtype, copy=True)
        dbz = sums[2]
        szb, szt, szd = L * D, D, 1
    else:
        dz = dy[:, int(has_cls):]
        szb, szt, szd = dz.stride()
        dbz = dysum
    if need_b:
        db = dbz.to(bias.dtype, copy=True)

    # 3. dW = dz^T @ patches (split over M, fp32 partials) and the pre-norm parameters' gradients
    if need_w or need_pre_w or (pre_norm and need_pre_b):
        S = _dw_splits(M, D, K, dev) if (need_w or need_pre_w) else 0
        chunk = triton.cdiv(M, max(S, 1))
        part = new_output((max(S, 1), D, K), dtype=f32, device=dev) if S else None
        if S:
            _launch(
                "dw", _patch_dw,
                lambda t: (S * triton.cdiv(D, t["BD"]) * triton.cdiv(K, t["BK"]),),
                (x, dz, mu1 if pre_norm else None, r1 if pre_norm else None, part, M, L, WP, C, D, K, chunk,
                 *x.stride(), szb, szt, szd, bucket(M)),
                dict(PH=ph, PW=pw, HWC=hwc, PRE_NORM=pre_norm, INPUT_PRECISION=input_precision(dz.dtype)),
                {"BM": chunk, "BD": D, "BK": K},
            )
        if need_w:
            dw = new_output(weight.shape, dtype=weight.dtype, device=dev)
        t = _interp_tiles("finish", BD=D, BK=K) if interpreting() else {"BD": 64, "BK": 64}
        grid = (triton.cdiv(K, t["BK"]), triton.cdiv(D, t["BD"]))
        col = new_output((grid[1], 2, K), dtype=f32, device=dev) if (need_pre_w or need_pre_b) else None
        wrap_triton(_patch_dw_finish)[grid](
            part, weight, dbz if pre_b_used else None,
            pre_w.contiguous() if pre_norm and pre_w is not None else None,
            pre_b.contiguous() if pre_b_used else None, dw if need_w else None, col,
            max(S, 1), D, K, C, swd, swc, swi, swj,
            PH=ph, PW=pw, HWC=hwc, PRE_W=pre_norm and pre_w is not None, PRE_B=pre_b_used,
            NEED_W=need_w, NEED_PRE_W=need_pre_w, NEED_PRE_B=need_pre_b, BD=t["BD"], BK=t["BK"], num_warps=4,
        )
        if col is not None:
            cols = col.sum(0)
            if need_pre_w:
                dprew = cols[0].to(pre_w.dtype, copy=True)
            if need_pre_b:
                dpreb = cols[1].to(pre_b.dtype, copy=True)

    # 4. dx = dz @ W scattered back into the image (through the pre-norm's backward when there is one)
    if need_x:
        dx = _dx_like(x, x.dtype)
        scratch = new_output((M, K), dtype=f32, device=dev) if pre_norm else None
        _launch(
            "dx", _patch_dx,
            lambda t: (triton.cdiv(M, t["BM"]) * triton.cdiv(K, t["BK"]),),
            (dz, weight, pre_w.contiguous() if pre_norm and pre_w is not None else None,
             scratch if pre_norm else dx, M, L, WP, C, D, K, szb, szt, szd, swd, swc, swi, swj, *dx.stride(), bucket(M)),
            dict(PH=ph, PW=pw, HWC=hwc, PRE_NORM=pre_norm, PRE_W=pre_norm and pre_w is not None,
                 INPUT_PRECISION=input_precision(dz.dtype)),
            {"BM": M, "BK": K, "BD": D},
        )
        if pre_norm:
            bt, bk = _row_tile(K)
            wrap_triton(_patch_pre_ln_dx)[(triton.cdiv(M, bt),)](
                scratch, x, mu1, r1, dx, M, L, WP, C, K, *x.stride(), *dx.stride(),
                PH=ph, PW=pw, HWC=hwc, BT=bt, BK=bk, num_warps=8 if bk >= 2048 else 4,
            )
    return dx, dw, db, dpos, dcls, dprew, dpreb, dpostw, dpostb


# ----------------------------------------------------------------------------------------------
# soft_split launchers
# ----------------------------------------------------------------------------------------------


def _split_geometry(x, kh, kw, sh, sw, ph, pw):
    B, C, H, W = x.shape
    OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    return B, C, H, W, OH, OW, OH * OW, C * kh * kw


# soft_split_layer_norm writes each token's row ROW_ALIGN elements apart and returns a (B, L, F) view:
# T2T-ViT's F = 147 (3 x 7 x 7) makes 294-byte rows, which the next Performer kernels could not load with
# 16-byte vectors or cp.async; 160-element rows are 16-byte aligned, and Triton sees the row stride
# divisible by 16. The public soft_split stays contiguous (its result is the unfold's, exactly).
ROW_ALIGN = 16


def soft_split_forward(x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype, norm, save):
    """The soft split (B, L, F), LayerNormed over F when ``norm``; (out, mean, rstd) when ``save``. With
    ``norm`` the result is a view of rows padded to a multiple of ROW_ALIGN elements."""
    B, C, H, W, OH, OW, L, F = _split_geometry(x, kh, kw, sh, sw, ph, pw)
    M = B * L
    dev = x.device
    so = -(-F // ROW_ALIGN) * ROW_ALIGN if norm else F
    out = new_output((B, L, so), dtype=out_dtype, device=dev)[..., :F]
    mean = new_output((M,), dtype=torch.float32, device=dev) if save else None
    rstd = new_output((M,), dtype=torch.float32, device=dev) if save else None
    if norm:
        bt, bf = _row_tile(F)
        if interpreting():
            bt = min(bt, INTERPRETER_TILES["unfold"]["BT"])
    elif interpreting():
        t = _interp_tiles("unfold", BT=M, BF=F)
        bt, bf = t["BT"], t["BF"]
    else:
        bt, bf = 32, min(128, max(16, triton.next_power_of_2(F)))
    grid = (triton.cdiv(M, bt) * triton.cdiv(F, bf),)
    wrap_triton(_soft_split_fwd)[grid](
        x, out, None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
        mean, rstd, M, L, OW, H, W, F, *x.stride(), eps, so,
        KH=kh, KW=kw, SH=sh, SW=sw, PADH=ph, PADW=pw, NORM=norm, LN_W=weight is not None, LN_B=bias is not None,
        SAVE=save, BT=bt, BF=bf, num_warps=8 if bt * bf >= 8192 else 4,
    )
    return (out, mean, rstd) if save else out


def soft_split_backward(dy, x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw, norm, need_x, need_w, need_b):
    """(dx, d weight, d bias) of the soft split (with its LayerNorm when ``norm``); unneeded ones empty."""
    B, C, H, W, OH, OW, L, F = _split_geometry(x, kh, kw, sh, sw, ph, pw)
    M = B * L
    dev = x.device
    dx, dw, db = (_empty(dy) for _ in range(3))
    c1 = c2 = None
    if norm and (need_x or need_w or need_b):
        bt, bf = _row_tile(F)
        nprog = _rows_programs(M, bt, dev)
        need_p = need_w or need_b
        part = new_output((nprog, 2, F), dtype=torch.float32, device=dev) if need_p else None
        if need_x:
            c1 = new_output((M,), dtype=torch.float32, device=dev)
            c2 = new_output((M,), dtype=torch.float32, device=dev)
        wrap_triton(_soft_split_ln_bwd_rows)[(nprog,)](
            dy, x, None if weight is None else weight.contiguous(), mean, rstd, c1, c2, part,
            M, L, OW, H, W, F, *x.stride(), *dy.stride(), nprog,
            KH=kh, KW=kw, SH=sh, SW=sw, PADH=ph, PADW=pw, LN_W=weight is not None, NEED_DX=need_x, NEED_P=need_p,
            BT=bt, BF=bf, num_warps=8 if bt * bf >= 8192 else 4,
        )
        if need_p:
            sums = part.sum(0)
            if need_w:
                dw = sums[0].to(weight.dtype, copy=True)
            if need_b:
                db = sums[1].to(bias.dtype, copy=True)
    if need_x:
        dx = _dx_like(x, x.dtype)
        if interpreting():
            t = _interp_tiles("fold", BC=C, BP=H * W)
            bc, bp = t["BC"], t["BP"]
        else:
            bc, bp = min(16, triton.next_power_of_2(C)), 128
        grid = (B * triton.cdiv(C, bc) * triton.cdiv(H * W, bp),)
        wrap_triton(_soft_split_fold)[grid](
            dy, x, dx, None if weight is None else weight.contiguous(), mean, rstd, c1, c2,
            C, H, W, L, OH, OW, *dy.stride(), *x.stride(), *dx.stride(),
            KH=kh, KW=kw, SH=sh, SW=sw, PADH=ph, PADW=pw, NORM=norm, LN_W=norm and weight is not None,
            NH=triton.cdiv(kh, sh), NW=triton.cdiv(kw, sw), BC=bc, BP=bp, num_warps=4,
        )
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# torch.library ops (fastvit._library's scheme): _fwd (outputs + saved), _infer, _bwd
# ----------------------------------------------------------------------------------------------

Tensor = torch.Tensor
Opt = Tensor | None


@torch.library.triton_op(op_name("patch_embed", "triton", "fwd"), mutates_args=())
def _patch_embed_fwd_op(
    x: Tensor, weight: Tensor, bias: Opt, pos_embed: Opt, cls_token: Opt,
    pre_weight: Opt, pre_bias: Opt, post_weight: Opt, post_bias: Opt,
    patch_h: int, patch_w: int, patch_order: str, pre_norm: bool, post_norm: bool, eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, z, mu1, rstd1, mu2, rstd2): z = the projection before the post-norm (saved with one),
    mu/rstd the pre- and post-norm statistics (fp32, per token); empty where unused."""
    return patch_embed_forward(x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias,
                               patch_h, patch_w, patch_order, pre_norm, post_norm, eps, save=True)


@torch.library.triton_op(op_name("patch_embed", "triton", "infer"), mutates_args=())
def _patch_embed_infer_op(
    x: Tensor, weight: Tensor, bias: Opt, pos_embed: Opt, cls_token: Opt,
    pre_weight: Opt, pre_bias: Opt, post_weight: Opt, post_bias: Opt,
    patch_h: int, patch_w: int, patch_order: str, pre_norm: bool, post_norm: bool, eps: float,
) -> Tensor:
    return patch_embed_forward(x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight, post_bias,
                               patch_h, patch_w, patch_order, pre_norm, post_norm, eps, save=False)


@torch.library.triton_op(op_name("patch_embed", "triton", "bwd"), mutates_args=())
def _patch_embed_bwd_op(
    dy: Tensor, x: Tensor, weight: Tensor, bias: Opt, pos_embed: Opt, cls_token: Opt,
    pre_weight: Opt, pre_bias: Opt, post_weight: Opt, post_bias: Opt,
    z: Tensor, mu1: Tensor, rstd1: Tensor, mu2: Tensor, rstd2: Tensor,
    patch_h: int, patch_w: int, patch_order: str, pre_norm: bool, post_norm: bool, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (x, weight, bias, pos_embed, cls_token, pre/post-norm weight and bias); empty where
    ``needs`` is False."""
    return patch_embed_backward(dy, x, weight, bias, pos_embed, cls_token, pre_weight, pre_bias, post_weight,
                                post_bias, z, mu1, rstd1, mu2, rstd2, patch_h, patch_w, patch_order, pre_norm,
                                post_norm, needs)


def _patch_embed_autograd(saved, grads):
    inputs = saved.inputs
    _, z, mu1, r1, mu2, r2 = saved.outputs
    needs = [bool(n) for n in saved.needs_input_grad[:9]]
    got = get_op("patch_embed", "triton", "bwd")(grads[0], *inputs[:9], z, mu1, r1, mu2, r2, *inputs[9:14], needs)
    return (*(g if n else None for g, n in zip(got, needs)), *([None] * (len(inputs) - 9)))


wire_autograd("patch_embed", "triton", 1, _patch_embed_autograd)
_patch_embed_op = FusedOp("patch_embed", "triton", 1)


@torch.library.triton_op(op_name("soft_split", "triton", "fwd"), mutates_args=())
def _soft_split_fwd_op(x: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Tensor:
    """The soft split; nothing else is saved (the backward needs only x's geometry)."""
    return soft_split_forward(x, None, None, kh, kw, sh, sw, ph, pw, 0.0, x.dtype, norm=False, save=False)


@torch.library.triton_op(op_name("soft_split", "triton", "infer"), mutates_args=())
def _soft_split_infer_op(x: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Tensor:
    return soft_split_forward(x, None, None, kh, kw, sh, sw, ph, pw, 0.0, x.dtype, norm=False, save=False)


@torch.library.triton_op(op_name("soft_split", "triton", "bwd"), mutates_args=())
def _soft_split_bwd_op(dy: Tensor, x: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int) -> Tensor:
    """The fold: dx (x's shape and memory format) = the sum of every window's gradient over its pixels."""
    return soft_split_backward(dy, x, None, None, None, None, kh, kw, sh, sw, ph, pw, False, True, False, False)[0]


def _soft_split_autograd(saved, grads):
    x, *geometry = saved.inputs
    return (get_op("soft_split", "triton", "bwd")(grads[0], x, *geometry), *([None] * len(geometry)))


wire_autograd("soft_split", "triton", 1, _soft_split_autograd)
_soft_split_op = FusedOp("soft_split", "triton", 1)


@torch.library.triton_op(op_name("soft_split_layer_norm", "triton", "fwd"), mutates_args=())
def _ssln_fwd_op(
    x: Tensor, weight: Opt, bias: Opt, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, eps: float,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out, mean, rstd): the normalised soft split and each token's fp32 statistics."""
    return soft_split_forward(x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype, norm=True, save=True)


@torch.library.triton_op(op_name("soft_split_layer_norm", "triton", "infer"), mutates_args=())
def _ssln_infer_op(
    x: Tensor, weight: Opt, bias: Opt, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, eps: float,
    out_dtype: torch.dtype,
) -> Tensor:
    return soft_split_forward(x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype, norm=True, save=False)


@torch.library.triton_op(op_name("soft_split_layer_norm", "triton", "bwd"), mutates_args=())
def _ssln_bwd_op(
    dy: Tensor, x: Tensor, weight: Opt, bias: Opt, mean: Tensor, rstd: Tensor,
    kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, d weight, d bias); empty where ``needs`` is False."""
    return soft_split_backward(dy, x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw, True, *needs)


def _ssln_autograd(saved, grads):
    x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype = saved.inputs
    _, mean, rstd = saved.outputs
    needs = [bool(n) for n in saved.needs_input_grad[:3]]
    got = get_op("soft_split_layer_norm", "triton", "bwd")(grads[0], x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw, needs)
    return (*(g if n else None for g, n in zip(got, needs)), *([None] * 8))


wire_autograd("soft_split_layer_norm", "triton", 1, _ssln_autograd)
_ssln_op = FusedOp("soft_split_layer_norm", "triton", 1)


# ----------------------------------------------------------------------------------------------
# Entry points for fastvit/ops/embed.py (arguments exactly as fastvit.reference takes them)
# ----------------------------------------------------------------------------------------------


def patch_embed(x, weight, bias, patch_size, pos_embed=None, cls_token=None, *, patch_order="chw",
                pre_norm=False, pre_norm_weight=None, pre_norm_bias=None,
                post_norm=False, post_norm_weight=None, post_norm_bias=None, norm_eps=1e-5):
    ph, pw = patch_size
    return _patch_embed_op(x, weight, bias, pos_embed, cls_token, pre_norm_weight, pre_norm_bias, post_norm_weight,
                           post_norm_bias, ph, pw, patch_order, pre_norm, post_norm, float(norm_eps))


def soft_split(x, kernel_size, stride, padding):
    return _soft_split_op(x, *kernel_size, *stride, *padding)


def soft_split_layer_norm(x, kernel_size, stride, padding, weight=None, bias=None, eps=1e-5, *, out_dtype=None):
    return _ssln_op(x, weight, bias, *kernel_size, *stride, *padding, float(eps), out_dtype or x.dtype)
