// Embed family block bodies: ViT's patch embedding as an implicit GEMM on tensor cores and T2T-ViT's soft
// split (unfold), its fold and their LayerNorms. Written once for two executors, as attention_kernel.h:
// the CUDA kernels of csrc/embed.cu and csrc/embed_split.cu (DeviceCtx) and the CPU warp emulator
// (emulate.h) the tests run them under.
//
// Every kernel is an object K with K::kThreads (128: 4 warps), k.grid(), k.smem_bytes() and
// k(cx, blockIdx.x, blockIdx.y, blockIdx.z); the launchers are the same template for all of them.
//
// patch_embed: GEMM rows are tokens m = (b, hp, wp), the reduction runs over a patch's features
// k = (c, i, j) ("chw", conv layout) or (i, j, c) ("hwc", vit-pytorch), columns are the D outputs.
// The A tile is gathered from the image through its strides (im2col in the loader, never written),
// the weight is read through its strides as the B tile. 64 x 64 x 32 tiles, 4 warps of 32 x 32:
// float16 / bfloat16 on mma.sync.m16n8k16 (fp32 accumulation), float32 on the CUDA cores with the same
// accumulator layout; the next k-slice is read into registers while the current one is multiplied.
// Backward: dW = dz^T patches (split over tokens into fp32 partials, summed in a fixed order by a
// finishing kernel that applies the pre-norm's affine), dX = dz W scattered into the image (patches do
// not overlap: every pixel is written once). Every reduction has a fixed order: no atomics.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernel_common.h"

namespace fastvit {
namespace embed {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64, kBN = 64, kBK = 32;  // GEMM tile

struct Dim3 {
  unsigned x, y, z;
};

inline unsigned cdiv(int64_t n, int64_t d) { return unsigned((n + d - 1) / d); }

// Sums over a warp's 32 lanes (every lane gets the total).
template <class Cx>
FV_FN float warp_sum(Cx& cx, float v) {
  for (int m = 16; m >= 1; m /= 2) v += cx.shfl_xor(v, m);
  return v;
}

// Mean and 1 / sqrt(var + eps) (fp32, two passes) of the n values at(i) of a row held by one warp; every
// lane gets both. Lanes of a dead row (live = false) only take part in the shuffles.
template <class Cx, class At>
FV_FN void warp_row_stats(Cx& cx, bool live, int n, const At& at, float eps, float& mean, float& rstd) {
  const int lane = cx.tid() % 32;
  float s = 0.f;
  if (live)
    for (int i = lane; i < n; i += 32) s += at(i);
  mean = warp_sum(cx, s) / float(n);
  float v = 0.f;
  if (live)
    for (int i = lane; i < n; i += 32) {
      const float d = at(i) - mean;
      v += d * d;
    }
  rstd = 1.f / std::sqrt(warp_sum(cx, v) / float(n) + eps);
}

// A LayerNorm backward's row terms over one warp: c1 = mean(gy), c2 = mean(gy xhat), with gy(i) the
// incoming gradient times the weight and xhat(i) the normalised input; then dx = rstd (gy - c1 - xhat c2).
template <class Cx, class G, class X>
FV_FN void warp_norm_terms(Cx& cx, bool live, int n, const G& gy, const X& xhat, float& c1, float& c2) {
  const int lane = cx.tid() % 32;
  float s1 = 0.f, s2 = 0.f;
  if (live)
    for (int i = lane; i < n; i += 32) {
      const float g = gy(i);
      s1 += g;
      s2 += g * xhat(i);
    }
  c1 = warp_sum(cx, s1) / float(n);
  c2 = warp_sum(cx, s2) / float(n);
}

// ---------------------------------------------------------------------------------------------- geometry

// An image batch (B, C, H, W) read or written through element strides.
struct Image {
  const void* ptr;
  int64_t sb, sc, sh, sw;
  int B, C, H, W;
};

// Non-overlapping patches of an image: token m = b * L + hp * WP + wp, feature k < K = C * ph * pw.
struct Patches {
  Image x;
  int ph, pw, WP, L, K;
  int64_t M;
  bool hwc;  // feature order (i, j, c) instead of (c, i, j)
};

FV_FN void feature_of(const Patches& g, int k, int& c, int& i, int& j) {
  if (g.hwc) {
    i = k / (g.pw * g.x.C);
    const int r = k - i * g.pw * g.x.C;
    j = r / g.x.C;
    c = r - j * g.x.C;
  } else {
    c = k / (g.ph * g.pw);
    const int r = k - c * g.ph * g.pw;
    i = r / g.pw;
    j = r - i * g.pw;
  }
}

// Element offset of token m's feature k in an image with strides (sb, sc, sh, sw).
FV_FN int64_t patch_offset(const Patches& g, int64_t sb, int64_t sc, int64_t sh, int64_t sw, int64_t m, int k) {
  const int64_t b = m / g.L;
  const int t = int(m - b * g.L), hp = t / g.WP, wp = t - hp * g.WP;
  int c, i, j;
  feature_of(g, k, c, i, j);
  return b * sb + c * sc + int64_t(hp * g.ph + i) * sh + int64_t(wp * g.pw + j) * sw;
}

// The weight's element (d, k) through its strides along (d, c, i, j).
struct Weight {
  const void* ptr;
  int64_t sd, sc, si, sj;
};

FV_FN int64_t weight_offset(const Patches& g, const Weight& w, int d, int k) {
  int c, i, j;
  feature_of(g, k, c, i, j);
  return d * w.sd + c * w.sc + i * w.si + j * w.sj;
}

// A token tensor (B, L', D) written or read through strides, row by row (each kernel says where a token's
// row is: t, or t + row0 after a cls row).
struct Rows {
  void* ptr;
  int64_t sb, st, sd;
};

// A token tensor read through strides: token row r = b * L + t (t < L) is row t + row0 of image b
// (row0 = 1 steps over a cls row), column n.
struct Tokens {
  const void* ptr;
  int64_t sb, st, sn;
  int L, row0;
};

FV_FN int64_t token_offset(const Tokens& a, int64_t r, int64_t n) {
  const int64_t b = r / a.L;
  return b * a.sb + (r - b * a.L + a.row0) * a.st + n * a.sn;
}

// Rows [r0, r1) of split s when R rows are cut into chunks of `chunk`.
FV_FN void split_range(int64_t R, int64_t chunk, unsigned s, int64_t& r0, int64_t& r1) {
  r0 = int64_t(s) * chunk;
  r1 = r0 + chunk < R ? r0 + chunk : R;
}

// ---------------------------------------------------------------------------------------------- GEMM tile

template <class T>
constexpr int tile_ld() {
  return kBK + (sizeof(typename Elem<T>::Bits) == 2 ? 8 : 4);  // padded rows: conflict-free fragment reads
}
template <class T>
constexpr int gemm_smem_bytes() {
  return 2 * kBM * tile_ld<T>() * int(sizeof(typename Elem<T>::Bits));
}

#if defined(__CUDACC__)
#define FV_UNROLL _Pragma("unroll")
#else
#define FV_UNROLL
#endif

FV_FN uint32_t ld2(const uint16_t* s) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const uint32_t*>(s);
#else
  uint32_t v;
  std::memcpy(&v, s, 4);
  return v;
#endif
}

// C[m0 .. m0 + 63, n0 .. n0 + 63] = sum over k in [k_begin, k_end) of A(m, k) B(k, n), then st(m, n, c) for
// every (m < M, n < N). la(m, k) and lb(k, n) return operand values (as float) and are called only in
// range. A_FAST_K / B_FAST_K: neighbouring threads load neighbouring k (else neighbouring m / n), to
// match the operand's contiguous dim in memory.
template <class T, bool A_FAST_K, bool B_FAST_K, class Cx, class LA, class LB, class ST>
FV_FN void gemm_tile(Cx& cx, int64_t m0, int64_t n0, int64_t M, int64_t N, int64_t k_begin, int64_t k_end,
                     const LA& la, const LB& lb, const ST& st) {
  using Bits = typename Elem<T>::Bits;
  constexpr int LD = tile_ld<T>();
  constexpr int kPer = kBM * kBK / kThreads;  // elements of each operand per thread and k-slice
  Bits* As = reinterpret_cast<Bits*>(cx.smem());
  Bits* Bs = As + kBM * LD;
  const int tid = cx.tid(), warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  float acc[2][4][4];
  FV_UNROLL
  for (int a = 0; a < 2; ++a)
    FV_UNROLL
    for (int b = 0; b < 4; ++b)
      FV_UNROLL
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;
  float ra[kPer], rb[kPer];

  const auto fetch = [&](int64_t k0) {
    FV_UNROLL
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + i * kThreads;
      const int r = A_FAST_K ? e / kBK : e % kBM, kk = A_FAST_K ? e % kBK : e / kBM;
      ra[i] = (m0 + r < M && k0 + kk < k_end) ? la(m0 + r, k0 + kk) : 0.f;
    }
    FV_UNROLL
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + i * kThreads;
      const int r = B_FAST_K ? e / kBK : e % kBN, kk = B_FAST_K ? e % kBK : e / kBN;
      rb[i] = (n0 + r < N && k0 + kk < k_end) ? lb(k0 + kk, n0 + r) : 0.f;
    }
  };
  const auto commit = [&]() {
    FV_UNROLL
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + i * kThreads;
      const int r = A_FAST_K ? e / kBK : e % kBM, kk = A_FAST_K ? e % kBK : e / kBM;
      As[r * LD + kk] = Elem<T>::from_float(ra[i]);
    }
    FV_UNROLL
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + i * kThreads;
      const int r = B_FAST_K ? e / kBK : e % kBN, kk = B_FAST_K ? e % kBK : e / kBN;
      Bs[r * LD + kk] = Elem<T>::from_float(rb[i]);
    }
  };

  if (k_begin < k_end) fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kBK) {
    commit();
    cx.sync();
    if (k0 + kBK < k_end) fetch(k0 + kBK);  // global loads in flight during the math below
    if constexpr (std::is_same_v<T, float>) {
      FV_UNROLL
      for (int mi = 0; mi < 2; ++mi)
        FV_UNROLL
        for (int ni = 0; ni < 4; ++ni)
          FV_UNROLL
          for (int q = 0; q < 4; ++q) {
            const int row = wm + mi * 16 + g + (q >= 2 ? 8 : 0), col = wn + ni * 8 + 2 * t + (q & 1);
            float s = acc[mi][ni][q];
            for (int k = 0; k < kBK; ++k) s += As[row * LD + k] * Bs[col * LD + k];
            acc[mi][ni][q] = s;
          }
    } else {
      FV_UNROLL
      for (int ks = 0; ks < kBK; ks += 16) {
        uint32_t a[2][4], b[4][2];
        FV_UNROLL
        for (int mi = 0; mi < 2; ++mi) {
          const uint16_t* p = As + (wm + mi * 16 + g) * LD + ks + 2 * t;
          a[mi][0] = ld2(p);
          a[mi][1] = ld2(p + 8 * LD);
          a[mi][2] = ld2(p + 8);
          a[mi][3] = ld2(p + 8 * LD + 8);
        }
        FV_UNROLL
        for (int ni = 0; ni < 4; ++ni) {
          const uint16_t* p = Bs + (wn + ni * 8 + g) * LD + ks + 2 * t;
          b[ni][0] = ld2(p);
          b[ni][1] = ld2(p + 8);
        }
        FV_UNROLL
        for (int mi = 0; mi < 2; ++mi)
          FV_UNROLL
          for (int ni = 0; ni < 4; ++ni) cx.template mma<T>(acc[mi][ni], a[mi], b[ni]);
      }
    }
    cx.sync();
  }
  FV_UNROLL
  for (int mi = 0; mi < 2; ++mi)
    FV_UNROLL
    for (int ni = 0; ni < 4; ++ni)
      FV_UNROLL
      for (int q = 0; q < 4; ++q) {
        const int64_t m = m0 + wm + mi * 16 + g + (q >= 2 ? 8 : 0), n = n0 + wn + ni * 8 + 2 * t + (q & 1);
        if (m < M && n < N) st(m, n, acc[mi][ni][q]);
      }
}

// ---------------------------------------------------------------------------------------------- patch_embed

// Pre-norm statistics: fp32 mean and rstd of each token's K gathered features (a warp per token).
template <class T>
struct PatchStats {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  float* mean;
  float* rstd;
  float eps;
  Dim3 grid() const { return {cdiv(g.M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < g.M;  // every lane takes part in the shuffles
    const auto at = [&](int k) { return load_f<T>(g.x.ptr, patch_offset(g, g.x.sb, g.x.sc, g.x.sh, g.x.sw, m, k)); };
    float mu, r;
    warp_row_stats(cx, live, g.K, at, eps, mu, r);
    if (live && lane == 0) {
      mean[m] = mu;
      rstd[m] = r;
    }
  }
};

// The projection of every token (one 64 x 64 output tile per block), bias in the epilogue and then
// either pos_embed (out rows t + row0) or, with a post-norm after it, nothing (z rows t).
template <class T>
struct PatchFwd {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  Weight w;
  int D;
  const void* bias;  // (D,) T, or nullptr
  const float* mean;  // pre-norm statistics (nullptr: no pre-norm)
  const float* rstd;
  const float* pre_w;  // (K,) fp32 or nullptr
  const float* pre_b;
  const void* pos;  // (L', D) T rows, or nullptr (never with a post-norm)
  int64_t spt, spd;
  Rows out;
  int row0;  // 1 when the cls token sits in front (out), else 0
  Dim3 grid() const { return {cdiv(g.M, kBM), cdiv(D, kBN), 1}; }
  int smem_bytes() const { return gemm_smem_bytes<T>(); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const auto la = [&](int64_t m, int64_t k) {
      float v = load_f<T>(g.x.ptr, patch_offset(g, g.x.sb, g.x.sc, g.x.sh, g.x.sw, m, int(k)));
      if (mean != nullptr) {  // LayerNorm'd in fp32, rounded to x's dtype by the tile store (the reference's)
        v = (v - mean[m]) * rstd[m];
        if (pre_w != nullptr) v *= pre_w[k];
        if (pre_b != nullptr) v += pre_b[k];
      }
      return v;
    };
    const auto lb = [&](int64_t k, int64_t n) { return load_f<T>(w.ptr, weight_offset(g, w, int(n), int(k))); };
    const auto st = [&](int64_t m, int64_t n, float c) {
      // the projection's output in T (the reference's conv / linear), then + pos_embed rounded again
      float v = Elem<T>::to_float(Elem<T>::from_float(bias != nullptr ? c + load_f<T>(bias, n) : c));
      const int64_t b = m / g.L, t = m - b * g.L;
      if (pos != nullptr) v += load_f<T>(pos, (t + row0) * spt + n * spd);
      store_f<T>(out.ptr, b * out.sb + (t + row0) * out.st + n * out.sd, v);
    };
    gemm_tile<T, true, true>(cx, int64_t(bx) * kBM, int64_t(by) * kBN, g.M, D, 0, g.K, la, lb, st);
  }
};

// out[b, 0, :] = cls (+ pos_embed[0]) for every image.
template <class T>
struct PatchCls {
  static constexpr int kThreads = embed::kThreads;
  const void* cls;  // (D,) T
  const void* pos;  // (L', D) T rows or nullptr
  int64_t spd;
  Rows out;
  int B, D;
  Dim3 grid() const { return {cdiv(int64_t(B) * D, kThreads), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int64_t i = int64_t(bx) * kThreads + cx.tid();
    if (i >= int64_t(B) * D) return;
    const int64_t b = i / D, d = i - b * D;
    float v = load_f<T>(cls, d);
    if (pos != nullptr) v += load_f<T>(pos, d * spd);
    store_f<T>(out.ptr, b * out.sb + d * out.sd, v);
  }
};

// The post-norm: z (B, L, D) rows -> LayerNorm over D (fp32 statistics) -> + pos -> out rows t + row0.
// z may be the out rows themselves (inference: normalised in place).
template <class T>
struct PatchPostNorm {
  static constexpr int kThreads = embed::kThreads;
  Rows z, out;
  const float* w;  // (D,) fp32 or nullptr
  const float* b;
  const void* pos;
  int64_t spt, spd;
  float* mean;  // saved statistics, or nullptr
  float* rstd;
  int64_t M;
  int L, D, row0;
  float eps;
  Dim3 grid() const { return {cdiv(M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < M;
    const int64_t bi = live ? m / L : 0, t = live ? m - bi * L : 0;
    const int64_t zrow = bi * z.sb + t * z.st, orow = bi * out.sb + (t + row0) * out.st;
    float mu, r;
    warp_row_stats(cx, live, D, [&](int n) { return load_f<T>(z.ptr, zrow + n * z.sd); }, eps, mu, r);
    if (!live) return;
    for (int n = lane; n < D; n += 32) {
      float y = (load_f<T>(z.ptr, zrow + n * z.sd) - mu) * r;
      if (w != nullptr) y *= w[n];
      if (b != nullptr) y += b[n];
      if (pos != nullptr) y = Elem<T>::to_float(Elem<T>::from_float(y)) + load_f<T>(pos, (t + row0) * spt + n * spd);
      store_f<T>(out.ptr, orow + n * out.sd, y);
    }
    if (mean != nullptr && lane == 0) {
      mean[m] = mu;
      rstd[m] = r;
    }
  }
};

// Sums of dy (B, L', D) over the batch, fp32 (L', D): d pos_embed, d cls_token and (over the patch rows)
// the bias. A thread per (t, d), the batch summed in order.
template <class T>
struct PatchColSum {
  static constexpr int kThreads = embed::kThreads;
  Rows dy;
  float* sum;
  int B, LT, D;
  Dim3 grid() const { return {cdiv(int64_t(LT) * D, kThreads), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int64_t i = int64_t(bx) * kThreads + cx.tid();
    if (i >= int64_t(LT) * D) return;
    const int64_t t = i / D, d = i - t * D;
    double s = 0.0;
    for (int b = 0; b < B; ++b) s += load_f<T>(dy.ptr, b * dy.sb + t * dy.st + d * dy.sd);
    sum[i] = float(s);
  }
};

// The post-norm's backward over whole rows: dz = rstd (w dy - mean(w dy) - zhat mean(w dy zhat)), in T.
template <class T>
struct PatchPostNormBwd {
  static constexpr int kThreads = embed::kThreads;
  Rows dy, z;
  const float* w;
  const float* mean;
  const float* rstd;
  void* dz;  // (M, D) contiguous
  int64_t M;
  int L, D, row0;
  Dim3 grid() const { return {cdiv(M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < M;
    const int64_t bi = live ? m / L : 0, t = live ? m - bi * L : 0;
    const int64_t yrow = bi * dy.sb + (t + row0) * dy.st, zrow = bi * z.sb + t * z.st;
    const float mu = live ? mean[m] : 0.f, r = live ? rstd[m] : 0.f;
    const auto gy = [&](int n) { return load_f<T>(dy.ptr, yrow + n * dy.sd) * (w != nullptr ? w[n] : 1.f); };
    const auto zhat = [&](int n) { return (load_f<T>(z.ptr, zrow + n * z.sd) - mu) * r; };
    float c1, c2;
    warp_norm_terms(cx, live, D, gy, zhat, c1, c2);
    if (!live) return;
    for (int n = lane; n < D; n += 32) store_f<T>(dz, m * D + n, r * (gy(n) - c1 - zhat(n) * c2));
  }
};

// Column sums over a run of token rows (fp64 inside a block, fp32 partials (S, 3, D) out):
// [0] sum dy zhat (post-norm weight), [1] sum dy (post-norm bias), [2] sum dz (projection bias).
template <class T>
struct PatchPostNormCols {
  static constexpr int kThreads = embed::kThreads;
  Rows dy, z;
  const float* mean;
  const float* rstd;
  const void* dz;  // (M, D)
  float* part;     // (S, 3, D)
  int64_t M, chunk;
  int L, D, row0, S;
  Dim3 grid() const { return {cdiv(D, kThreads), unsigned(S), 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int64_t n = int64_t(bx) * kThreads + cx.tid();
    if (n >= D) return;
    double sw = 0.0, sb = 0.0, sz = 0.0;
    int64_t m0, m1;
    split_range(M, chunk, by, m0, m1);
    for (int64_t m = m0; m < m1; ++m) {
      const int64_t bi = m / L, t = m - bi * L;
      const float gy = load_f<T>(dy.ptr, bi * dy.sb + (t + row0) * dy.st + n * dy.sd);
      const float zh = (load_f<T>(z.ptr, bi * z.sb + t * z.st + n * z.sd) - mean[m]) * rstd[m];
      sw += double(gy) * zh;
      sb += gy;
      sz += load_f<T>(dz, m * D + n);
    }
    float* p = part + int64_t(by) * 3 * D;
    p[n] = float(sw);
    p[D + n] = float(sb);
    p[2 * D + n] = float(sz);
  }
};

// dW partials: part[s] (D, K) = sum over tokens of split s of dz(m, d) * patch(m, k), the patch
// normalised (without the pre-norm's affine: the finishing kernel applies it).
template <class T>
struct PatchDw {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  Tokens dz;  // (M, D): dy's patch rows, or the post-norm's dz buffer
  const float* mean;  // pre-norm statistics, or nullptr
  const float* rstd;
  float* part;  // (S, D, K) fp32
  int D;
  int64_t chunk;
  int S;
  Dim3 grid() const { return {cdiv(D, kBM), cdiv(g.K, kBN), unsigned(S)}; }
  int smem_bytes() const { return gemm_smem_bytes<T>(); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned bz) const {
    const auto la = [&](int64_t d, int64_t m) { return load_f<T>(dz.ptr, token_offset(dz, m, d)); };
    const auto lb = [&](int64_t m, int64_t k) {
      float v = load_f<T>(g.x.ptr, patch_offset(g, g.x.sb, g.x.sc, g.x.sh, g.x.sw, m, int(k)));
      if (mean != nullptr) v = (v - mean[m]) * rstd[m];
      return v;
    };
    float* p = part + int64_t(bz) * D * g.K;
    const auto st = [&](int64_t d, int64_t k, float c) { p[d * g.K + k] = c; };
    int64_t k0, k1;
    split_range(g.M, chunk, bz, k0, k1);
    gemm_tile<T, false, false>(cx, int64_t(bx) * kBM, int64_t(by) * kBN, D, g.K, k0, k1, la, lb, st);
  }
};

// dW[d, k] = G[d, k] g[k] + b[k] dbz[d] with G the sum of the S partials in order (g = 1, b = 0 without a
// pre-norm); with a pre-norm also the partial column sums (per 64-row block of d) of W G and W dbz:
// the pre-norm weight's and bias's gradients. A thread per k, a block per (128 k, 64 d).
template <class T>
struct PatchDwFinish {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  Weight w;
  const float* part;  // (S, D, K)
  const float* dbz;   // (D,) fp32: sum over tokens of dz, with a pre-norm bias
  const float* pre_w;
  const float* pre_b;
  void* dw;        // (D, K) T contiguous, or nullptr
  float* col;      // (cdiv(D, 64), 2, K) or nullptr
  int D, S;
  Dim3 grid() const { return {cdiv(g.K, kThreads), cdiv(D, 64), 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int64_t k = int64_t(bx) * kThreads + cx.tid();
    if (k >= g.K) return;
    const float gk = pre_w != nullptr ? pre_w[k] : 1.f;
    double cw = 0.0, cb = 0.0;
    const int d1 = (int(by) + 1) * 64 < D ? (int(by) + 1) * 64 : D;
    for (int d = int(by) * 64; d < d1; ++d) {
      float G = 0.f;
      for (int s = 0; s < S; ++s) G += part[(int64_t(s) * D + d) * g.K + k];
      float v = G * gk;
      if (pre_b != nullptr) v += pre_b[k] * dbz[d];
      if (dw != nullptr) store_f<T>(dw, int64_t(d) * g.K + k, v);
      if (col != nullptr) {
        const float wv = load_f<T>(w.ptr, weight_offset(g, w, d, int(k)));
        cw += double(wv) * G;
        if (dbz != nullptr) cb += double(wv) * dbz[d];
      }
    }
    if (col != nullptr) {
      col[(int64_t(by) * 2) * g.K + k] = float(cw);
      col[(int64_t(by) * 2 + 1) * g.K + k] = float(cb);
    }
  }
};

// dX = dz W (M, K): scattered into the image (dx strides), or into an fp32 (M, K) scratch for the
// pre-norm's row backward.
template <class T>
struct PatchDx {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  Tokens dz;  // (M, D): dy's patch rows, or the post-norm's dz buffer
  Weight w;
  int D;
  void* dx;  // through dx strides, or nullptr
  int64_t sb, sc, sh, sw;
  float* scratch;  // (M, K) or nullptr
  Dim3 grid() const { return {cdiv(g.M, kBM), cdiv(g.K, kBN), 1}; }
  int smem_bytes() const { return gemm_smem_bytes<T>(); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const auto la = [&](int64_t m, int64_t d) { return load_f<T>(dz.ptr, token_offset(dz, m, d)); };
    const auto lb = [&](int64_t d, int64_t k) { return load_f<T>(w.ptr, weight_offset(g, w, int(d), int(k))); };
    const auto st = [&](int64_t m, int64_t k, float c) {
      if (scratch != nullptr)
        scratch[m * g.K + k] = c;
      else
        store_f<T>(dx, patch_offset(g, sb, sc, sh, sw, m, int(k)), c);
    };
    gemm_tile<T, true, false>(cx, int64_t(bx) * kBM, int64_t(by) * kBN, g.M, g.K, 0, D, la, lb, st);
  }
};

// The pre-norm's row backward: dx = rstd (g dxn - mean(g dxn) - xhat mean(g dxn xhat)), scattered.
template <class T>
struct PatchPreNormDx {
  static constexpr int kThreads = embed::kThreads;
  Patches g;
  const float* scratch;  // (M, K) d(normalised patch)
  const float* w;
  const float* mean;
  const float* rstd;
  void* dx;
  int64_t sb, sc, sh, sw;
  Dim3 grid() const { return {cdiv(g.M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < g.M;
    const float mu = live ? mean[m] : 0.f, r = live ? rstd[m] : 0.f;
    const auto xhat = [&](int k) {
      return (load_f<T>(g.x.ptr, patch_offset(g, g.x.sb, g.x.sc, g.x.sh, g.x.sw, m, k)) - mu) * r;
    };
    const auto gxn = [&](int k) { return scratch[m * g.K + k] * (w != nullptr ? w[k] : 1.f); };
    float c1, c2;
    warp_norm_terms(cx, live, g.K, gxn, xhat, c1, c2);
    if (!live) return;
    for (int k = lane; k < g.K; k += 32)
      store_f<T>(dx, patch_offset(g, sb, sc, sh, sw, m, k), r * (gxn(k) - c1 - xhat(k) * c2));
  }
};

// ---------------------------------------------------------------------------------------------- soft split

// Overlapping windows (unfold): token m = b * L + oh * OW + ow, feature f = (c, ki, kj) < F = C kh kw.
struct Windows {
  Image x;
  int kh, kw, sh, sw, ph, pw, OH, OW, L, F;
  int64_t M;
};

// Element offset in x of token m's feature f, or -1 where the window reads the zero padding.
FV_FN int64_t window_offset(const Windows& g, int64_t m, int f) {
  const int64_t b = m / g.L;
  const int l = int(m - b * g.L), oh = l / g.OW, ow = l - oh * g.OW;
  const int c = f / (g.kh * g.kw), r = f - c * g.kh * g.kw, ki = r / g.kw, kj = r - ki * g.kw;
  const int h = oh * g.sh - g.ph + ki, w = ow * g.sw - g.pw + kj;
  if (h < 0 || h >= g.x.H || w < 0 || w >= g.x.W) return -1;
  return b * g.x.sb + c * g.x.sc + int64_t(h) * g.x.sh + int64_t(w) * g.x.sw;
}

template <class T>
FV_FN float window_value(const Windows& g, int64_t m, int f) {
  const int64_t o = window_offset(g, m, f);
  return o < 0 ? 0.f : load_f<T>(g.x.ptr, o);
}

// soft_split: out (M, F) rows of stride `so` = the gathered windows. A grid-stride loop of threads.
template <class T>
struct Unfold {
  static constexpr int kThreads = embed::kThreads;
  Windows g;
  void* out;
  int64_t so;
  unsigned blocks;
  Dim3 grid() const { return {blocks, 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int64_t n = g.M * g.F, step = int64_t(blocks) * kThreads;
    for (int64_t i = int64_t(bx) * kThreads + cx.tid(); i < n; i += step) {
      const int64_t m = i / g.F;
      const int f = int(i - m * g.F);
      const int64_t o = window_offset(g, m, f);
      static_cast<typename Elem<T>::Bits*>(out)[m * so + f] =
          o < 0 ? Elem<T>::from_float(0.f) : static_cast<const typename Elem<T>::Bits*>(g.x.ptr)[o];
    }
  }
};

// soft_split_layer_norm: each token's gathered row LayerNormed (fp32 statistics) and written in OT; the
// un-normalised row is never stored. A warp per token.
template <class T, class OT>
struct UnfoldNorm {
  static constexpr int kThreads = embed::kThreads;
  Windows g;
  const float* w;
  const float* b;
  void* out;
  int64_t so;
  float* mean;  // saved statistics, or nullptr
  float* rstd;
  float eps;
  Dim3 grid() const { return {cdiv(g.M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < g.M;
    float mu, r;
    warp_row_stats(cx, live, g.F, [&](int f) { return window_value<T>(g, m, f); }, eps, mu, r);
    if (!live) return;
    for (int f = lane; f < g.F; f += 32) {
      float y = (window_value<T>(g, m, f) - mu) * r;
      if (w != nullptr) y *= w[f];
      if (b != nullptr) y += b[f];
      store_f<OT>(out, m * so + f, y);
    }
    if (mean != nullptr && lane == 0) {
      mean[m] = mu;
      rstd[m] = r;
    }
  }
};

// The LayerNorm backward's per-token terms: c1 = mean(w dy), c2 = mean(w dy xhat). A warp per token.
template <class T, class OT>
struct UnfoldNormRows {
  static constexpr int kThreads = embed::kThreads;
  Windows g;
  Tokens dy;  // (B, L, F) in OT
  const float* w;
  const float* mean;
  const float* rstd;
  float* c1;
  float* c2;
  Dim3 grid() const { return {cdiv(g.M, kWarps), 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int lane = cx.tid() % 32;
    const int64_t m = int64_t(bx) * kWarps + cx.tid() / 32;
    const bool live = m < g.M;
    const float mu = live ? mean[m] : 0.f, r = live ? rstd[m] : 0.f;
    const auto gy = [&](int f) {
      return load_f<OT>(dy.ptr, token_offset(dy, m, f)) * (w != nullptr ? w[f] : 1.f);
    };
    float a, b;
    warp_norm_terms(cx, live, g.F, gy, [&](int f) { return (window_value<T>(g, m, f) - mu) * r; }, a, b);
    if (live && lane == 0) {
      c1[m] = a;
      c2[m] = b;
    }
  }
};

// The LayerNorm parameters' gradients as partial column sums over a run of tokens (fp64 inside,
// fp32 partials (S, 2, F) out): [0] sum dy xhat, [1] sum dy. A thread per feature.
template <class T, class OT>
struct UnfoldNormCols {
  static constexpr int kThreads = embed::kThreads;
  Windows g;
  Tokens dy;  // (B, L, F) in OT
  const float* mean;
  const float* rstd;
  float* part;
  int64_t chunk;
  int S;
  Dim3 grid() const { return {cdiv(g.F, kThreads), unsigned(S), 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int f = int(bx) * kThreads + cx.tid();
    if (f >= g.F) return;
    double sw = 0.0, sb = 0.0;
    int64_t m0, m1;
    split_range(g.M, chunk, by, m0, m1);
    for (int64_t m = m0; m < m1; ++m) {
      const float gy = load_f<OT>(dy.ptr, token_offset(dy, m, f));
      sw += double(gy) * ((window_value<T>(g, m, f) - mean[m]) * rstd[m]);
      sb += gy;
    }
    part[int64_t(by) * 2 * g.F + f] = float(sw);
    part[(int64_t(by) * 2 + 1) * g.F + f] = float(sb);
  }
};

// The fold: dx at each pixel = the sum, over the windows covering it in (oh, ow) order, of their
// gradient there; with the LayerNorm, rstd (w dy - c1 - xhat c2) with xhat from the pixel itself. A
// thread per pixel in dx's memory order (channels_last: c fastest), a grid-stride loop.
template <class T, class OT>
struct Fold {
  static constexpr int kThreads = embed::kThreads;
  Windows g;
  Tokens dy;  // (B, L, F) in OT
  const float* w;  // LayerNorm: weight (or nullptr) ...
  const float* mean;  // ... and these (nullptr: plain fold)
  const float* rstd;
  const float* c1;
  const float* c2;
  void* dx;
  int64_t sb, sc, sh, sw;
  bool channels_last;
  unsigned blocks;
  Dim3 grid() const { return {blocks, 1, 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned, unsigned) const {
    const int C = g.x.C, H = g.x.H, W = g.x.W, kk = g.kh * g.kw;
    const int64_t n = int64_t(g.x.B) * C * H * W, step = int64_t(blocks) * kThreads;
    for (int64_t i = int64_t(bx) * kThreads + cx.tid(); i < n; i += step) {
      int64_t b, rest;
      int c, h, x;
      if (channels_last) {
        c = int(i % C);
        rest = i / C;
        x = int(rest % W);
        rest /= W;
        h = int(rest % H);
        b = rest / H;
      } else {
        x = int(i % W);
        rest = i / W;
        h = int(rest % H);
        rest /= H;
        c = int(rest % C);
        b = rest / C;
      }
      float xv = 0.f;
      if (mean != nullptr) xv = load_f<T>(g.x.ptr, b * g.x.sb + c * g.x.sc + h * g.x.sh + x * g.x.sw);
      // windows oh with 0 <= h + ph - oh sh < kh, in increasing order
      const int hp = h + g.ph, wp = x + g.pw;
      int oh0 = hp - g.kh + 1 > 0 ? (hp - g.kh + 1 + g.sh - 1) / g.sh : 0;
      int oh1 = hp / g.sh < g.OH - 1 ? hp / g.sh : g.OH - 1;
      int ow0 = wp - g.kw + 1 > 0 ? (wp - g.kw + 1 + g.sw - 1) / g.sw : 0;
      int ow1 = wp / g.sw < g.OW - 1 ? wp / g.sw : g.OW - 1;
      float acc = 0.f;
      for (int oh = oh0; oh <= oh1; ++oh)
        for (int ow = ow0; ow <= ow1; ++ow) {
          const int ki = hp - oh * g.sh, kj = wp - ow * g.sw;
          const int f = c * kk + ki * g.kw + kj;
          const int64_t m = b * g.L + int64_t(oh) * g.OW + ow;
          float gy = load_f<OT>(dy.ptr, token_offset(dy, m, f));
          if (mean != nullptr) {
            const float r = rstd[m];
            if (w != nullptr) gy *= w[f];
            gy = r * (gy - c1[m] - (xv - mean[m]) * r * c2[m]);
          }
          acc += gy;
        }
      store_f<T>(dx, b * sb + c * sc + h * sh + x * sw, acc);
    }
  }
};

}  // namespace embed
}  // namespace fastvit
