// Flash attention block bodies (forward, backward and their two helpers), written once for two
// executors: the CUDA kernels of csrc/attention.cu (nvcc: every function here is __device__) and the
// host warp emulator of csrc/attention_emulate.cpp (g++: plain host functions, each CUDA thread a
// coroutine), which lets the CPU tests run this exact code, fragment layouts and all.
//
// A body takes an executor context `cx` that provides what differs between the two:
//   cx.tid()                   thread index in the block (0 .. kThreads - 1)
//   cx.sync()                  __syncthreads()
//   cx.shfl_xor(v, m)          __shfl_xor_sync(0xffffffff, v, m) on a float
//   cx.template mma<T>(d, a, b) d += A B with one mma.sync.m16n8k16.row.col.f32.{f16,bf16} (fp32 accumulate)
//   cx.smem()                  the block's dynamic shared memory (16-byte aligned)
//
// Tiles: 64 queries x 64 keys per step, 4 warps of 16 rows each; head dims padded to DP = 64 or 128 in
// shared memory (zero-filled, as are the rows past the sequence end). Fragments follow the PTX ISA's
// m16n8k16 layouts, with g = lane / 4 and t = lane % 4:
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g + 8, 2t..), a[2] = (g, 2t + 8..), a[3] = (g + 8, 2t + 8..)
//   B (16 x 8, k x n):      b[0] = (k = 2t..2t+1, n = g), b[1] = (k = 2t + 8.., n = g)
//   C (16 x 8, fp32):       c[0..1] = (g, 2t..2t+1), c[2..3] = (g + 8, 2t..2t+1)
// so two neighbouring C tiles (16 x 16) of P or dS are an A fragment of the next product as they are
// (FlashAttention-2's register reuse). Softmax runs in the exp2 domain: scores are multiplied by
// scale * log2(e), the saved lse is base 2 (the Triton kernels' meaning).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_common.h"

namespace fastvit {
namespace attention {

constexpr int kBlockM = 64;   // queries per tile
constexpr int kBlockN = 64;   // keys per tile
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr float kLog2e = 1.4426950408889634f;

enum class MaskKind : int { none = 0, boolean = 1, f32 = 2, f16 = 3, bf16 = 4 };

// A (B, H, N, D) operand read through element strides (batch, head, token, feature). vec8: the
// feature stride is 1 and every other stride, D and the start are 16-byte multiples, so rows are
// read 8 elements at a time.
struct Operand {
  const void* ptr;
  int64_t sb, sh, sn, sd;
  bool vec8;
};

// A (B, H, N, D) output written through element strides.
struct Output {
  void* ptr;
  int64_t sb, sh, sn, sd;
};

// A mask read through its broadcast (b, h, query, key) strides: 0 where it broadcasts.
struct Mask {
  const void* ptr;
  int64_t sb, sh, sm, sn;
  MaskKind kind;
};

struct FwdParams {
  Operand q, k, v;
  Output o;
  float* lse;  // (B, H, Nq) fp32, or nullptr (inference)
  Mask mask;
  int B, H, Nq, Nk, D;
  float scale_log2;  // scale * log2(e)
};

struct BwdParams {
  Operand q, k, v, o, dout;
  const float* lse;  // (B, H, Nq), as the forward wrote it
  float* delta;      // (B, H, delta_ld) workspace: rowsum(dO * O), 0 past Nq
  float* lse_pad;    // sm90: (B, H, delta_ld) workspace: lse with -inf read as +inf, +inf past Nq; else nullptr
  int delta_ld;      // row stride of delta and lse_pad: Nq, or for sm90 Nq rounded up to kBlockM
  float* dq_acc;     // (splits, B, H, Nq, D) fp32 workspace, or nullptr when plan_bwd says none is needed
  Output dq, dk, dv;
  Mask mask;
  int B, H, Nq, Nk, D;
  float scale, scale_log2;
  int splits;         // CTAs per (b, h): each owns a contiguous run of key blocks
  int blocks_per_split;
  int dq_smem_rows;   // > 0: dQ accumulates in shared memory (fp32, Nq rows), not in dq_acc
  bool sm90;          // the Hopper backward (attention_sm90.cu, 128-key blocks) runs, not bwd_block
};

// The head dims the kernels take: 1 .. kMaxHeadDim, padded inside to 64 or 128.
constexpr int kMaxHeadDim = 128;

// The padded head dim a kernel instantiation serves D with (64 or 128); 0 when D is not served.
inline int padded_head_dim(int D) { return D < 1 ? 0 : D <= 64 ? 64 : D <= kMaxHeadDim ? 128 : 0; }

// Shared memory bytes of each body (row strides padded by 8 elements: conflict-free fragment reads;
// the backward's optional fp32 dQ rows padded by 4).
template <int DP>
constexpr int fwd_smem_bytes() { return 3 * kBlockM * (DP + 8) * 2; }
template <int DP>
constexpr int bwd_smem_bytes(int dq_rows) {
  return 4 * kBlockM * (DP + 8) * 2 + kBlockM * (kBlockN + 8) * 2 + 2 * kBlockM * 4 + dq_rows * (DP + 4) * 4;
}
inline int bwd_smem_bytes_for(int D, int dq_rows) {
  return padded_head_dim(D) == 64 ? bwd_smem_bytes<64>(dq_rows) : bwd_smem_bytes<128>(dq_rows);
}

// How the backward splits each (b, h)'s key blocks over CTAs: one CTA per (b, h) walks all key blocks
// and accumulates dQ in a fixed order, in shared memory when all its rows fit next to the tiles with
// two CTAs per SM (ViT's N = 197 at D = 64), else in an fp32 workspace; only when B * H CTAs cannot fill
// the GPU are the key blocks split further, each split writing an fp32 dQ partial that dq_reduce sums
// in split order. Deterministic either way (no atomics).
struct BwdPlan {
  int splits, blocks_per_split;
  int64_t dq_acc_elems;  // fp32 workspace elements (0: none)
  int dq_smem_rows;      // > 0: dQ accumulates in shared memory
  int delta_ld;          // BwdParams::delta_ld
};

// sm90: the plan of the Hopper backward, whose key blocks are 128 keys, whose dQ accumulates in the
// workspace (its shared memory holds K, V, two Q / dO stages and dS), and whose delta and lse rows are
// padded to whole 64-query blocks (its producer copies a block's 256 bytes of each with one bulk copy).
inline BwdPlan plan_bwd(int B, int H, int Nq, int Nk, int D, int num_sms, int smem_per_sm, bool sm90 = false) {
  const int block_n = sm90 ? 2 * kBlockN : kBlockN;
  const int nkb = (Nk + block_n - 1) / block_n;
  const int64_t bh = int64_t(B) * H;
  int splits = 1;
  const int64_t want = 2 * int64_t(num_sms);  // two CTAs per SM of work at least
  if (bh < want) splits = int((want + bh - 1) / bh);
  // bound the workspace (256 MiB of fp32 partials)
  const int64_t per_split = bh * Nq * D;
  const int64_t cap = (int64_t(256) << 20) / 4;
  while (splits > 1 && int64_t(splits) * per_split > cap) --splits;
  if (splits > nkb) splits = nkb;
  if (splits < 1) splits = 1;
  const int per = (nkb + splits - 1) / splits;
  splits = (nkb + per - 1) / per;  // no empty split
  BwdPlan plan{splits, per, 0, 0, sm90 ? (Nq + kBlockM - 1) / kBlockM * kBlockM : Nq};
  if (!sm90 && splits == 1 && nkb > 1 && 2 * (bwd_smem_bytes_for(D, Nq) + 1024) <= smem_per_sm)
    plan.dq_smem_rows = Nq;
  else if (splits > 1 || nkb > 1)
    plan.dq_acc_elems = int64_t(splits) * per_split;
  return plan;
}

// Fragments from row-major shared-memory tiles (row stride ld elements, a multiple of 8, so every 8-element
// row segment is 16-byte aligned and the 8 rows of an 8 x 8 matrix fall in distinct banks), one ldmatrix.x4
// each; every lane of the warp must take part.
//
// The A fragment of the 16 x 16 block at (row0, col0): matrices (rows +0, cols +0), (+8, +0), (+0, +8), (+8, +8).
template <class Cx>
FV_FN void ld_a(Cx& cx, uint32_t (&a)[4], const uint16_t* s, int ld, int row0, int col0) {
  const int lane = cx.tid() % 32;
  cx.template ldmatrix_x4<false>(a, s + (row0 + lane % 16) * ld + col0 + (lane / 16) * 8);
}

// The B fragments (k x n = 16 x 8) of two neighbouring n tiles from a tile that holds n as rows and k
// as columns (K in S = Q K^T): b0 from rows n0 .. n0 + 7, b1 from rows n0 + 8 .., columns k0 .. k0 + 15.
template <class Cx>
FV_FN void ld_b_rows(Cx& cx, uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* s, int ld, int n0, int k0) {
  const int lane = cx.tid() % 32;
  uint32_t r[4];
  cx.template ldmatrix_x4<false>(r, s + (n0 + (lane / 16) * 8 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// The same from a tile that holds k as rows and n as columns (V in O += P V), read transposed: b0 from
// columns n0 .. n0 + 7, b1 from n0 + 8 .., rows k0 .. k0 + 15.
template <class Cx>
FV_FN void ld_b_cols(Cx& cx, uint32_t (&b0)[2], uint32_t (&b1)[2], const uint16_t* s, int ld, int k0, int n0) {
  const int lane = cx.tid() % 32;
  uint32_t r[4];
  cx.template ldmatrix_x4<true>(r, s + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + n0 + (lane / 16) * 8);
  b0[0] = r[0], b0[1] = r[1], b1[0] = r[2], b1[1] = r[3];
}

// Rows row0 .. row0 + 63 of (b, h)'s (N, D) slice into a (64, DP) tile with row stride DP + 8; rows
// past n_rows and features past D are zero.
template <int DP, class Cx>
FV_FN void load_tile(Cx& cx, uint16_t* s, const Operand& g, int b, int h, int row0, int n_rows, int D) {
  constexpr int LD = DP + 8;
  const uint16_t* base = static_cast<const uint16_t*>(g.ptr) + b * g.sb + h * g.sh;
  if (g.vec8) {
    for (int i = cx.tid(); i < kBlockM * (DP / 8); i += kThreads) {
      const int r = i / (DP / 8), c = (i % (DP / 8)) * 8, row = row0 + r;
      if (row < n_rows && c < D)
        copy16(s + r * LD + c, base + row * g.sn + c);
      else
        zero16(s + r * LD + c);
    }
  } else {
    for (int i = cx.tid(); i < kBlockM * DP; i += kThreads) {
      const int r = i / DP, c = i % DP, row = row0 + r;
      s[r * LD + c] = (row < n_rows && c < D) ? base[row * g.sn + c * g.sd] : uint16_t(0);
    }
  }
}

// A tile's rows read ahead into registers (the vec8 path): issued before a tile's math, written to
// shared memory after it, so the global loads' latency hides behind the MMAs.
template <int DP>
struct Prefetch {
  static constexpr int kPerThread = kBlockN * (DP / 8) / kThreads;  // 16-byte chunks per thread
  alignas(16) uint16_t regs[kPerThread][8];

  template <class Cx>
  FV_FN void fetch(Cx& cx, const Operand& g, int b, int h, int row0, int n_rows, int D) {
    const uint16_t* base = static_cast<const uint16_t*>(g.ptr) + b * g.sb + h * g.sh;
    for (int i = 0; i < kPerThread; ++i) {
      const int e = cx.tid() + i * kThreads, r = e / (DP / 8), c = (e % (DP / 8)) * 8, row = row0 + r;
      if (row < n_rows && c < D)
        copy16(regs[i], base + row * g.sn + c);
      else
        zero16(regs[i]);
    }
  }

  template <class Cx>
  FV_FN void commit(Cx& cx, uint16_t* s) const {
    for (int i = 0; i < kPerThread; ++i) {
      const int e = cx.tid() + i * kThreads, r = e / (DP / 8), c = (e % (DP / 8)) * 8;
      copy16(s + r * (DP + 8) + c, regs[i]);
    }
  }
};

// Two neighbouring C tiles (16 x 8 each, columns n and n + 8) rounded to T as the A fragment (16 x 16) of
// the next product, FlashAttention-2's register reuse.
template <class T>
FV_FN void a_from_c(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// The mask's additive term for score (row, col) in the exp2 domain: 0 or -inf for a boolean mask.
FV_FN float mask_term(const Mask& m, int b, int h, int row, int col) {
  const int64_t off = b * m.sb + h * m.sh + row * m.sm + col * m.sn;
  switch (m.kind) {
    case MaskKind::boolean: return static_cast<const uint8_t*>(m.ptr)[off] ? 0.f : -INFINITY;
    case MaskKind::f32: return static_cast<const float*>(m.ptr)[off] * kLog2e;
    case MaskKind::f16: return Elem<__half>::to_float(static_cast<const uint16_t*>(m.ptr)[off]) * kLog2e;
    case MaskKind::bf16: return Elem<__nv_bfloat16>::to_float(static_cast<const uint16_t*>(m.ptr)[off]) * kLog2e;
    default: return 0.f;
  }
}

FV_FN void store(const Output& o, int b, int h, int row, int col, uint16_t bits) {
  static_cast<uint16_t*>(o.ptr)[b * o.sb + h * o.sh + row * o.sn + col * o.sd] = bits;
}

// ----------------------------------------------------------------------------------------------
// forward: one CTA per (64-query block, h, b)
// ----------------------------------------------------------------------------------------------

template <class T, int DP, class Cx>
FV_FN void fwd_block(Cx& cx, const FwdParams& p, int mb, int h, int b) {
  constexpr int LD = DP + 8, KS = DP / 16, DT = DP / 8;
  uint16_t* sQ = reinterpret_cast<uint16_t*>(cx.smem());
  uint16_t* sK = sQ + kBlockM * LD;
  uint16_t* sV = sK + kBlockN * LD;
  const int tid = cx.tid(), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int m0 = mb * kBlockM, r0 = warp * 16 + g;
  const int rows[2] = {m0 + r0, m0 + r0 + 8};

  load_tile<DP>(cx, sQ, p.q, b, h, m0, p.Nq, p.D);
  cx.sync();
  uint32_t qa[KS][4];
  for (int ks = 0; ks < KS; ++ks) ld_a(cx, qa[ks], sQ, LD, warp * 16, ks * 16);
  float acc[DT][4];
  for (int dt = 0; dt < DT; ++dt)
    for (int i = 0; i < 4; ++i) acc[dt][i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  const bool ahead = p.k.vec8 && p.v.vec8;
  Prefetch<DP> nk, nv;
  if (ahead) {
    nk.fetch(cx, p.k, b, h, 0, p.Nk, p.D);
    nv.fetch(cx, p.v, b, h, 0, p.Nk, p.D);
  }
  for (int n0 = 0; n0 < p.Nk; n0 += kBlockN) {
    cx.sync();  // every warp is done with the previous K, V tiles
    if (ahead) {
      nk.commit(cx, sK);
      nv.commit(cx, sV);
    } else {
      load_tile<DP>(cx, sK, p.k, b, h, n0, p.Nk, p.D);
      load_tile<DP>(cx, sV, p.v, b, h, n0, p.Nk, p.D);
    }
    cx.sync();
    if (ahead && n0 + kBlockN < p.Nk) {  // the next tiles' loads fly while this one's MMAs run
      nk.fetch(cx, p.k, b, h, n0 + kBlockN, p.Nk, p.D);
      nv.fetch(cx, p.v, b, h, n0 + kBlockN, p.Nk, p.D);
    }
    float s[8][4];
    for (int nt = 0; nt < 8; ++nt)
      for (int i = 0; i < 4; ++i) s[nt][i] = 0.f;
    for (int ks = 0; ks < KS; ++ks)
      for (int nt = 0; nt < 8; nt += 2) {
        uint32_t bk0[2], bk1[2];
        ld_b_rows(cx, bk0, bk1, sK, LD, nt * 8, ks * 16);
        cx.template mma<T>(s[nt], qa[ks], bk0);
        cx.template mma<T>(s[nt + 1], qa[ks], bk1);
      }
    for (int nt = 0; nt < 8; ++nt)
      for (int i = 0; i < 4; ++i) {
        const int row = rows[i / 2], col = n0 + nt * 8 + 2 * t + (i & 1);
        float x = s[nt][i] * p.scale_log2;
        if (col >= p.Nk)
          x = -INFINITY;
        else if (p.mask.kind != MaskKind::none && row < p.Nq)
          x += mask_term(p.mask, b, h, row, col);
        s[nt][i] = x;
      }
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
      for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, cx.shfl_xor(mx, 1));
      mx = fmaxf(mx, cx.shfl_xor(mx, 2));
      const float m_new = fmaxf(row_max[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far stays 0, not NaN
      const float alpha = exp2f(row_max[r] - m_use);
      row_max[r] = m_new;
      row_sum[r] *= alpha;
      for (int dt = 0; dt < DT; ++dt) {
        acc[dt][2 * r] *= alpha;
        acc[dt][2 * r + 1] *= alpha;
      }
      for (int nt = 0; nt < 8; ++nt)
        for (int j = 0; j < 2; ++j) {
          const float e = exp2f(s[nt][2 * r + j] - m_use);
          s[nt][2 * r + j] = e;
          row_sum[r] += e;
        }
    }
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t pa[4];
      a_from_c<T>(pa, s[2 * kk], s[2 * kk + 1]);
      for (int dt = 0; dt < DT; dt += 2) {
        uint32_t bv0[2], bv1[2];
        ld_b_cols(cx, bv0, bv1, sV, LD, kk * 16, dt * 8);
        cx.template mma<T>(acc[dt], pa, bv0);
        cx.template mma<T>(acc[dt + 1], pa, bv1);
      }
    }
  }
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += cx.shfl_xor(l, 1);
    l += cx.shfl_xor(l, 2);
    const float inv = l > 0.f ? 1.f / l : 0.f;  // nothing to attend: output 0
    const int row = rows[r];
    if (row < p.Nq) {
      for (int dt = 0; dt < DT; ++dt)
        for (int j = 0; j < 2; ++j) {
          const int col = dt * 8 + 2 * t + j;
          if (col < p.D) store(p.o, b, h, row, col, Elem<T>::from_float(acc[dt][2 * r + j] * inv));
        }
      if (p.lse != nullptr && t == 0)
        p.lse[(int64_t(b) * p.H + h) * p.Nq + row] = l > 0.f ? row_max[r] + log2f(l) : -INFINITY;
    }
  }
}

// ----------------------------------------------------------------------------------------------
// backward
// ----------------------------------------------------------------------------------------------

// delta[b, h, i] = sum_d dO[i, d] * O[i, d] in fp32 (0 for the padding rows i >= Nq), and lse_pad when
// there is one: one warp per row of delta_ld, kWarps rows per CTA.
template <class T, class Cx>
FV_FN void delta_block(Cx& cx, const BwdParams& p, int64_t block) {
  const int warp = cx.tid() / 32, lane = cx.tid() % 32;
  const int64_t rows = int64_t(p.B) * p.H * p.delta_ld;
  const int64_t r = block * kWarps + warp;
  const int i = int(r % p.delta_ld);
  const int64_t bh = r / p.delta_ld;
  const bool live = r < rows, real = live && i < p.Nq;
  float s = 0.f;
  if (real) {
    const int h = int(bh % p.H), b = int(bh / p.H);
    const uint16_t* o = static_cast<const uint16_t*>(p.o.ptr) + b * p.o.sb + h * p.o.sh + i * p.o.sn;
    const uint16_t* d = static_cast<const uint16_t*>(p.dout.ptr) + b * p.dout.sb + h * p.dout.sh + i * p.dout.sn;
    for (int c = lane; c < p.D; c += 32)
      s += Elem<T>::to_float(o[c * p.o.sd]) * Elem<T>::to_float(d[c * p.dout.sd]);
  }
  for (int m = 16; m >= 1; m /= 2) s += cx.shfl_xor(s, m);
  if (live && lane == 0) {
    p.delta[r] = s;
    if (p.lse_pad != nullptr) {
      const float lse = real ? p.lse[bh * p.Nq + i] : INFINITY;
      p.lse_pad[r] = lse == -INFINITY ? INFINITY : lse;  // a row with nothing to attend: P = 0, not NaN
    }
  }
}

// One CTA per (split, h, b): for each key block of its split, dK and dV accumulate over all query
// blocks in registers; dQ's contribution of the key block goes to the fp32 accumulator (or, for the
// last key block of an unsplit row, straight to dq): five MMAs per (query block, key block), as
// FlashAttention-2's backward. Each warp owns 16 keys and computes transposed tiles
// S^T = K Q^T, dP^T = V dO^T, so that P^T and dS^T are A fragments of dV += P^T dO and dK += dS^T Q;
// dS goes through shared memory for dQ = dS K, where each warp owns 16 queries.
template <class T, int DP, class Cx>
FV_FN void bwd_block(Cx& cx, const BwdParams& p, int split, int h, int b) {
  constexpr int LD = DP + 8, LDS = kBlockN + 8, KS = DP / 16, DT = DP / 8;
  uint16_t* sK = reinterpret_cast<uint16_t*>(cx.smem());
  uint16_t* sV = sK + kBlockN * LD;
  uint16_t* sQ = sV + kBlockN * LD;
  uint16_t* sdO = sQ + kBlockM * LD;
  uint16_t* sdS = sdO + kBlockM * LD;  // (64 queries, 64 keys)
  float* sLse = reinterpret_cast<float*>(sdS + kBlockM * LDS);
  float* sDelta = sLse + kBlockM;
  float* sdQ = sDelta + kBlockM;  // (dq_smem_rows, DP + 4) fp32 when the plan says so
  const int tid = cx.tid(), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int kr = warp * 16 + g;  // this thread's key rows in the tile: kr, kr + 8
  const int nkb = (p.Nk + kBlockN - 1) / kBlockN, nmb = (p.Nq + kBlockM - 1) / kBlockM;
  const int kb_begin = split * p.blocks_per_split;
  const int kb_end = kb_begin + p.blocks_per_split < nkb ? kb_begin + p.blocks_per_split : nkb;
  const int64_t bh = int64_t(b) * p.H + h;
  float* acc_base = p.dq_acc == nullptr ? nullptr
                                        : p.dq_acc + ((int64_t(split) * p.B * p.H + bh) * p.Nq) * p.D;

  for (int kb = kb_begin; kb < kb_end; ++kb) {
    const int n0 = kb * kBlockN;
    cx.sync();
    load_tile<DP>(cx, sK, p.k, b, h, n0, p.Nk, p.D);
    load_tile<DP>(cx, sV, p.v, b, h, n0, p.Nk, p.D);
    float dk[DT][4], dv[DT][4];
    for (int dt = 0; dt < DT; ++dt)
      for (int i = 0; i < 4; ++i) dk[dt][i] = dv[dt][i] = 0.f;

    for (int mb = 0; mb < nmb; ++mb) {
      const int m0 = mb * kBlockM;
      cx.sync();  // the previous query block's tiles and dS are read
      load_tile<DP>(cx, sQ, p.q, b, h, m0, p.Nq, p.D);
      load_tile<DP>(cx, sdO, p.dout, b, h, m0, p.Nq, p.D);
      for (int i = tid; i < kBlockM; i += kThreads) {
        const int row = m0 + i;
        float lse = row < p.Nq ? p.lse[bh * p.Nq + row] : INFINITY;
        // a row with nothing to attend saved -inf: read as +inf, so that its P is 0 (not NaN)
        sLse[i] = lse == -INFINITY ? INFINITY : lse;
        sDelta[i] = row < p.Nq ? p.delta[bh * p.delta_ld + row] : 0.f;
      }
      cx.sync();

      float st[8][4], dpt[8][4];
      for (int nt = 0; nt < 8; ++nt)
        for (int i = 0; i < 4; ++i) st[nt][i] = dpt[nt][i] = 0.f;
      for (int ks = 0; ks < KS; ++ks) {
        uint32_t ka[4], va[4];
        ld_a(cx, ka, sK, LD, warp * 16, ks * 16);
        ld_a(cx, va, sV, LD, warp * 16, ks * 16);
        for (int nt = 0; nt < 8; nt += 2) {
          uint32_t bq0[2], bq1[2], bo0[2], bo1[2];
          ld_b_rows(cx, bq0, bq1, sQ, LD, nt * 8, ks * 16);
          ld_b_rows(cx, bo0, bo1, sdO, LD, nt * 8, ks * 16);
          cx.template mma<T>(st[nt], ka, bq0);
          cx.template mma<T>(st[nt + 1], ka, bq1);
          cx.template mma<T>(dpt[nt], va, bo0);
          cx.template mma<T>(dpt[nt + 1], va, bo1);
        }
      }
      // P^T and dS^T = P^T (dP^T - delta); element i of tile nt is (key kr (+8), query nt * 8 + 2t (+1))
      for (int nt = 0; nt < 8; ++nt)
        for (int i = 0; i < 4; ++i) {
          const int key = n0 + kr + (i >= 2 ? 8 : 0), qi = nt * 8 + 2 * t + (i & 1), query = m0 + qi;
          float x = st[nt][i] * p.scale_log2;
          if (key >= p.Nk)
            x = -INFINITY;
          else if (p.mask.kind != MaskKind::none && query < p.Nq)
            x += mask_term(p.mask, b, h, query, key);
          const float pr = exp2f(x - sLse[qi]);
          st[nt][i] = pr;
          // a softmax over one key is constant: dS = 0 exactly (dP - delta would leave rounding noise)
          dpt[nt][i] = p.Nk == 1 ? 0.f : pr * (dpt[nt][i] - sDelta[qi]);
        }
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t pa[4], da[4];
        a_from_c<T>(pa, st[2 * kk], st[2 * kk + 1]);
        a_from_c<T>(da, dpt[2 * kk], dpt[2 * kk + 1]);
        for (int dt = 0; dt < DT; dt += 2) {
          uint32_t bo0[2], bo1[2], bq0[2], bq1[2];
          ld_b_cols(cx, bo0, bo1, sdO, LD, kk * 16, dt * 8);
          ld_b_cols(cx, bq0, bq1, sQ, LD, kk * 16, dt * 8);
          cx.template mma<T>(dv[dt], pa, bo0);
          cx.template mma<T>(dv[dt + 1], pa, bo1);
          cx.template mma<T>(dk[dt], da, bq0);
          cx.template mma<T>(dk[dt + 1], da, bq1);
        }
      }
      // dS (queries x keys) to shared memory, rounded as the dK product used it
      for (int nt = 0; nt < 8; ++nt)
        for (int i = 0; i < 4; ++i) {
          const int qi = nt * 8 + 2 * t + (i & 1), kj = kr + (i >= 2 ? 8 : 0);
          sdS[qi * LDS + kj] = Elem<T>::from_float(dpt[nt][i]);
        }
      cx.sync();
      // dQ rows warp * 16 + g (+8) of this query block: dS K over the tile's 64 keys
      float dq[DT][4];
      for (int dt = 0; dt < DT; ++dt)
        for (int i = 0; i < 4; ++i) dq[dt][i] = 0.f;
      const int qr = warp * 16 + g;
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t sa[4];
        ld_a(cx, sa, sdS, LDS, warp * 16, kk * 16);
        for (int dt = 0; dt < DT; dt += 2) {
          uint32_t bk0[2], bk1[2];
          ld_b_cols(cx, bk0, bk1, sK, LD, kk * 16, dt * 8);
          cx.template mma<T>(dq[dt], sa, bk0);
          cx.template mma<T>(dq[dt + 1], sa, bk1);
        }
      }
      const bool first = kb == kb_begin, last = kb == kb_end - 1, direct = last && p.splits == 1;
      for (int dt = 0; dt < DT; ++dt) {
        for (int i = 0; i < 4; ++i) {
          const int row = m0 + qr + (i >= 2 ? 8 : 0), col = dt * 8 + 2 * t + (i & 1);
          if (row >= p.Nq || col >= p.D) continue;
          float v = dq[dt][i];
          float* a = p.dq_smem_rows > 0    ? sdQ + row * (DP + 4) + col
                     : acc_base == nullptr ? nullptr
                                           : acc_base + int64_t(row) * p.D + col;
          if (!first) v += *a;  // the same thread added the previous key blocks' terms
          if (direct)
            store(p.dq, b, h, row, col, Elem<T>::from_float(v * p.scale));
          else
            *a = v;
        }
      }
    }
    // this key block's dK (scaled) and dV
    for (int i = 0; i < 4; ++i) {
      const int row = n0 + kr + (i >= 2 ? 8 : 0);
      if (row >= p.Nk) continue;
      for (int dt = 0; dt < DT; ++dt) {
        const int col = dt * 8 + 2 * t + (i & 1);
        if (col >= p.D) continue;
        store(p.dk, b, h, row, col, Elem<T>::from_float(dk[dt][i] * p.scale));
        store(p.dv, b, h, row, col, Elem<T>::from_float(dv[dt][i]));
      }
    }
  }
}

// dq = scale * sum over splits of the fp32 partials, in split order; one thread per element.
template <class T, class Cx>
FV_FN void dq_reduce_block(Cx& cx, const BwdParams& p, int64_t block) {
  const int64_t n = int64_t(p.B) * p.H * p.Nq * p.D;
  const int64_t e = block * kThreads + cx.tid();
  if (e >= n) return;
  float s = 0.f;
  for (int sp = 0; sp < p.splits; ++sp) s += p.dq_acc[sp * n + e];
  const int col = int(e % p.D);
  const int row = int((e / p.D) % p.Nq);
  const int h = int((e / (int64_t(p.D) * p.Nq)) % p.H);
  const int b = int(e / (int64_t(p.D) * p.Nq * p.H));
  store(p.dq, b, h, row, col, Elem<T>::from_float(s * p.scale));
}

}  // namespace attention
}  // namespace fastvit
