// Performer family block bodies (T2T-ViT's Token_performer.single_attn), written once for two executors as
// attention_kernel.h and embed_kernel.h are: the CUDA kernels of csrc/performer.cu (DeviceCtx) and the CPU
// warp emulator (emulate.h) the tests run them under. Kernel objects have embed_kernel.h's form.
//
// Meaning (fastvit.reference.performer_attention; x: (B, T, dim) -> (B, T, E), m random features):
//     kqv = x Wkqv^T + b (rounded to T), k, q, v = split(kqv, E)
//     phi(u) = exp(u w^T - |u|^2 / 2) / sqrt(m)             fp32, w: (m, E)
//     ksum = sum_t phi(k), kptv = phi(k)^T v                 (B, m), (B, m, E) fp32
//     y = phi(q) kptv / (phi(q) ksum + eps)                  fp32, rounded to T for the projection
//     out = v + dropout(y P^T + pb)                          in T
// The two projections and the backward's GEMMs (dy = dz P, dP = dz^T y, dx = dkqv Wkqv, dWkqv = dkqv^T x)
// are the implicit-GEMM tile of embed_kernel.h over token rows; the feature math runs on token tiles of
// kTile tokens in shared memory with the (m, E) matrices next to them. Sums over tokens accumulate in fp64
// inside a block and leave as fp32 partials, summed in a fixed order by the caller: no atomics.
//
// Dropout is Triton's tl.rand, bit for bit: Philox-4x32-10 keyed by (seed + batch), counter t * E + e,
// the first word mapped to [0, 1) as uint_to_uniform_float does; keep when u >= p, kept values scaled by
// 1 / (1 - p). The CUDA and Triton backends draw the same mask for the same seed.
#pragma once

#include "embed_kernel.h"

namespace fastvit {
namespace performer {

using embed::cdiv;
using embed::Dim3;
using embed::gemm_smem_bytes;
using embed::gemm_tile;
using embed::kBM;
using embed::kBN;
using embed::split_range;
using embed::token_offset;
using embed::Tokens;
constexpr int kThreads = embed::kThreads;
constexpr int kTile = 16;  // tokens per feature-math step

// ---------------------------------------------------------------------------------------------- dropout

FV_FN uint32_t umulhi(uint32_t a, uint32_t b) { return uint32_t((uint64_t(a) * uint64_t(b)) >> 32); }

// Triton's tl.rand(seed, offset): Philox-4x32-10 on (offset, 0, 0, 0) with key (seed_lo, seed_hi).
FV_FN float philox_uniform(uint64_t seed, uint32_t offset) {
  uint32_t c0 = offset, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = uint32_t(seed & 0xffffffffu), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = umulhi(0xCD9E8D57u, p2) ^ c1 ^ k0;
    c2 = umulhi(0xD2511F53u, p0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * p2;
    c3 = 0xD2511F53u * p0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  int32_t x = int32_t(c0);
  if (x < 0) x = ~x;
  return float(x) * 4.6566127342e-10f;
}

struct Dropout {
  const int64_t* seed;  // on the device; nullptr: no dropout
  float p, scale;
  int E;
};

FV_FN bool keep(const Dropout& d, int64_t b, int64_t t, int64_t e) {
  return philox_uniform(uint64_t(*d.seed + b), uint32_t(int32_t(t * d.E + e))) >= d.p;
}

// ---------------------------------------------------------------------------------------------- GEMMs

// A value of a token-row operand, with the dropout's mask and scale applied when `drop.seed` is set.
template <class T>
FV_FN float row_value(const Tokens& a, const Dropout& drop, int64_t r, int64_t n) {
  const float v = load_f<T>(a.ptr, token_offset(a, r, n));
  if (drop.seed == nullptr) return v;
  const int64_t b = r / a.L;
  return keep(drop, b, r - b * a.L, n) ? v * drop.scale : 0.f;
}

enum class Epilogue : int {
  store = 0,     // out = round(acc + bias)
  store_f32 = 1, // outf = acc (fp32 (R, N) contiguous)
  residual = 2,  // out = round(v + dropout(round(acc + bias)))
};

// C (R, N) = A (R, K) W^T for token rows: W read as (n, k) through strides (transposes by strides),
// A optionally through a dropout mask. B_FAST_K: W's k stride is 1.
template <class T, bool B_FAST_K>
struct Linear {
  static constexpr int kThreads = performer::kThreads;
  Tokens a;
  Dropout a_drop;
  const void* w;
  int64_t swn, swk;
  const void* bias;  // (N,) T or nullptr
  int64_t R;
  int N, K;
  Epilogue epi;
  void* out;  // (R, N) contiguous: T, or fp32 for store_f32
  Tokens v;     // residual
  Dropout drop;
  Dim3 grid() const { return {cdiv(R, kBM), cdiv(N, kBN), 1}; }
  int smem_bytes() const { return gemm_smem_bytes<T>(); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const auto la = [&](int64_t r, int64_t k) { return row_value<T>(a, a_drop, r, k); };
    const auto lb = [&](int64_t k, int64_t n) { return load_f<T>(w, n * swn + k * swk); };
    const auto st = [&](int64_t r, int64_t n, float c) {
      if (epi == Epilogue::store_f32) {
        static_cast<float*>(out)[r * N + n] = c;
        return;
      }
      float z = Elem<T>::to_float(Elem<T>::from_float(bias != nullptr ? c + load_f<T>(bias, n) : c));
      if (epi == Epilogue::residual) {
        if (drop.seed != nullptr) {
          const int64_t b = r / v.L;
          z = keep(drop, b, r - b * v.L, n) ? Elem<T>::to_float(Elem<T>::from_float(z * drop.scale)) : 0.f;
        }
        z += load_f<T>(v.ptr, token_offset(v, r, n));
      }
      store_f<T>(out, r * N + n, z);
    };
    gemm_tile<T, true, B_FAST_K>(cx, int64_t(bx) * kBM, int64_t(by) * kBN, R, N, 0, K, la, lb, st);
  }
};

// Weight-gradient partials over token rows: part[s] (N1, N2) = sum over rows r of split s of
// A(r, i) X(r, j) (A through an optional dropout mask), fp32.
template <class T>
struct RowGram {
  static constexpr int kThreads = performer::kThreads;
  Tokens a;
  Dropout a_drop;
  Tokens x;
  float* part;  // (S, N1, N2)
  int64_t R, chunk;
  int N1, N2, S;
  Dim3 grid() const { return {cdiv(N1, kBM), cdiv(N2, kBN), unsigned(S)}; }
  int smem_bytes() const { return gemm_smem_bytes<T>(); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned bz) const {
    const auto la = [&](int64_t i, int64_t r) { return row_value<T>(a, a_drop, r, i); };
    const auto lb = [&](int64_t r, int64_t j) { return load_f<T>(x.ptr, token_offset(x, r, j)); };
    float* p = part + int64_t(bz) * N1 * N2;
    const auto st = [&](int64_t i, int64_t j, float c) { p[i * N2 + j] = c; };
    int64_t r0, r1;
    split_range(R, chunk, bz, r0, r1);
    gemm_tile<T, false, false>(cx, int64_t(bx) * kBM, int64_t(by) * kBN, N1, N2, r0, r1, la, lb, st);
  }
};

// Column sums over token rows (each value rounded to T first, as the eager gradient is), fp64 inside,
// fp32 partials (S, N) out. A thread per column.
template <class T>
struct RowSum {
  static constexpr int kThreads = performer::kThreads;
  Tokens a;
  Dropout a_drop;
  float* part;
  int64_t R, chunk;
  int N, S;
  Dim3 grid() const { return {cdiv(N, kThreads), unsigned(S), 1}; }
  int smem_bytes() const { return 0; }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int64_t n = int64_t(bx) * kThreads + cx.tid();
    if (n >= N) return;
    int64_t r0, r1;
    split_range(R, chunk, by, r0, r1);
    double s = 0.0;
    for (int64_t r = r0; r < r1; ++r)
      s += Elem<T>::to_float(Elem<T>::from_float(row_value<T>(a, a_drop, r, n)));
    part[int64_t(by) * N + n] = float(s);
  }
};

// ---------------------------------------------------------------------------------------------- features

// Shared-memory layout of the feature kernels, in floats (doubles are two floats, 8-byte aligned).
struct Feat {
  const float* w;  // (m, E) fp32 contiguous
  int m, E;
  float inv_sqrt_m;
};

// phi of kTile tokens u (kTile x E, rows past `valid` are zero) into ph (kTile x m); nrm: kTile floats.
template <class Cx>
FV_FN void features(Cx& cx, const Feat& f, const float* ws, const float* u, float* nrm, float* ph, int valid) {
  for (int t = cx.tid(); t < kTile; t += kThreads) {
    float s = 0.f;
    for (int e = 0; e < f.E; ++e) s += u[t * f.E + e] * u[t * f.E + e];
    nrm[t] = 0.5f * s;
  }
  cx.sync();
  for (int i = cx.tid(); i < kTile * f.m; i += kThreads) {
    const int t = i / f.m, j = i - t * f.m;
    float a = 0.f;
    for (int e = 0; e < f.E; ++e) a += u[t * f.E + e] * ws[j * f.E + e];
    ph[i] = t < valid ? std::exp(a - nrm[t]) * f.inv_sqrt_m : 0.f;
  }
  cx.sync();
}

// den[t] = phi(u_t) . ksum + eps for kTile tokens.
template <class Cx>
FV_FN void normaliser(Cx& cx, const float* ph, const float* ksum, int m, float eps, float* den) {
  for (int t = cx.tid(); t < kTile; t += kThreads) {
    float s = 0.f;
    for (int j = 0; j < m; ++j) s += ph[t * m + j] * ksum[j];
    den[t] = s + eps;
  }
  cx.sync();
}

// out[t] = sum over the n entries of row t of a (kTile x n).
template <class Cx>
FV_FN void row_sums(Cx& cx, const float* a, int n, float* out) {
  for (int t = cx.tid(); t < kTile; t += kThreads) {
    float s = 0.f;
    for (int j = 0; j < n; ++j) s += a[t * n + j];
    out[t] = s;
  }
  cx.sync();
}

template <class Cx>
FV_FN void load_fp32(Cx& cx, float* dst, const float* src, int n) {
  for (int i = cx.tid(); i < n; i += kThreads) dst[i] = src[i];
}

// kTile tokens' columns [c0, c0 + E) of kqv (B * T, 3E) rows as fp32; zero past `valid`.
template <class T, class Cx>
FV_FN void load_tokens(Cx& cx, float* dst, const void* kqv, int64_t row0, int valid, int E, int c0) {
  for (int i = cx.tid(); i < kTile * E; i += kThreads) {
    const int t = i / E, e = i - t * E;
    dst[i] = t < valid ? load_f<T>(kqv, (row0 + t) * 3 * E + c0 + e) : 0.f;
  }
}

// Forward, k side: partial sum_t phi(k) (m) and phi(k)^T v (m, E) over one split of one image's tokens.
template <class T>
struct KSide {
  static constexpr int kThreads = performer::kThreads;
  Feat f;
  const void* kqv;  // (B * T, 3E) T
  float* part_s;    // (B, S, m)
  float* part_kv;   // (B, S, m, E)
  int B, T_, S;
  int64_t chunk;
  Dim3 grid() const { return {unsigned(S), unsigned(B), 1}; }
  int smem_bytes() const {
    const int mE = f.m * f.E;
    return 4 * (mE + (mE & 1)) + 8 * (mE + f.m) + 4 * (2 * kTile * f.E + kTile * f.m + kTile);
  }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int m = f.m, E = f.E;
    float* ws = reinterpret_cast<float*>(cx.smem());
    double* acc = reinterpret_cast<double*>(ws + m * E + ((m * E) & 1));  // m * E doubles, 8-byte aligned
    double* sacc = acc + m * E;                           // m doubles
    float* ks = reinterpret_cast<float*>(sacc + m);
    float* vs = ks + kTile * E;
    float* ph = vs + kTile * E;
    float* nrm = ph + kTile * m;
    load_fp32(cx, ws, f.w, m * E);
    for (int i = cx.tid(); i < m * E; i += kThreads) acc[i] = 0.0;
    for (int i = cx.tid(); i < m; i += kThreads) sacc[i] = 0.0;
    const int64_t b = by;
    int64_t t0, t1;
    split_range(T_, chunk, bx, t0, t1);
    for (int64_t tt = t0; tt < t1; tt += kTile) {
      const int valid = int(t1 - tt < kTile ? t1 - tt : kTile);
      const int64_t row0 = b * T_ + tt;
      load_tokens<T>(cx, ks, kqv, row0, valid, E, 0);
      load_tokens<T>(cx, vs, kqv, row0, valid, E, 2 * E);
      cx.sync();
      features(cx, f, ws, ks, nrm, ph, valid);
      for (int i = cx.tid(); i < m * E; i += kThreads) {
        const int j = i / E, e = i - j * E;
        float s = 0.f;
        for (int t = 0; t < kTile; ++t) s += ph[t * m + j] * vs[t * E + e];
        acc[i] += s;
      }
      for (int j = cx.tid(); j < m; j += kThreads) {
        float s = 0.f;
        for (int t = 0; t < kTile; ++t) s += ph[t * m + j];
        sacc[j] += s;
      }
      cx.sync();
    }
    const int64_t part = b * S + bx;
    for (int i = cx.tid(); i < m * E; i += kThreads) part_kv[part * m * E + i] = float(acc[i]);
    for (int j = cx.tid(); j < m; j += kThreads) part_s[part * m + j] = float(sacc[j]);
  }
};

// Forward, q side: y = phi(q) kptv / (phi(q) ksum + eps) for kTile tokens, rounded to T (B * T, E).
template <class T>
struct QSide {
  static constexpr int kThreads = performer::kThreads;
  Feat f;
  const void* kqv;
  const float* ksum;  // (B, m)
  const float* kptv;  // (B, m, E)
  void* y;            // (B * T, E) T
  int B, T_;
  float eps;
  Dim3 grid() const { return {cdiv(T_, kTile), unsigned(B), 1}; }
  int smem_bytes() const { return 4 * (2 * f.m * f.E + f.m + kTile * f.E + kTile * f.m + 2 * kTile); }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int m = f.m, E = f.E;
    float* ws = reinterpret_cast<float*>(cx.smem());
    float* kv = ws + m * E;
    float* ks = kv + m * E;
    float* qs = ks + m;
    float* ph = qs + kTile * E;
    float* nrm = ph + kTile * m;
    float* den = nrm + kTile;
    const int64_t b = by, tt = int64_t(bx) * kTile;
    const int valid = int(T_ - tt < kTile ? T_ - tt : kTile);
    load_fp32(cx, ws, f.w, m * E);
    load_fp32(cx, kv, kptv + b * m * E, m * E);
    load_fp32(cx, ks, ksum + b * m, m);
    load_tokens<T>(cx, qs, kqv, b * T_ + tt, valid, E, E);
    cx.sync();
    features(cx, f, ws, qs, nrm, ph, valid);
    normaliser(cx, ph, ks, m, eps, den);
    for (int i = cx.tid(); i < valid * E; i += kThreads) {
      const int t = i / E, e = i - t * E;
      float s = 0.f;
      for (int j = 0; j < m; ++j) s += ph[t * m + j] * kv[j * E + e];
      store_f<T>(y, (b * T_ + tt + t) * E + e, s / den[t]);
    }
  }
};

// Backward, q side, over one split of one image's tokens: recomputes phi(q), the normaliser and y; from
// dy = dz P (fp32 (B * T, E)): dnum = dy / d, dd = -(dy . y) / d, dphi = dnum kptv^T + dd ksum,
// gphi = dphi phi(q); dq = gphi w - sum(gphi) q into dkqv (unless null); partials of d kptv = phi(q)^T dnum,
// d ksum = sum phi(q) dd and dw = gphi^T q.
template <class T>
struct QBwd {
  static constexpr int kThreads = performer::kThreads;
  Feat f;
  const void* kqv;
  const float* ksum;
  const float* kptv;
  const float* dy;
  void* dkqv;       // (B * T, 3E) T, or nullptr
  float* part_dkv;  // (B, S, m, E)
  float* part_ds;   // (B, S, m)
  float* part_dw;   // (B, S, m, E)
  int B, T_, S;
  int64_t chunk;
  float eps;
  Dim3 grid() const { return {unsigned(S), unsigned(B), 1}; }
  int smem_bytes() const {
    const int mE = f.m * f.E;
    return 4 * (2 * mE + f.m + (f.m & 1)) + 8 * (2 * mE + f.m) + 4 * (3 * kTile * f.E + 2 * kTile * f.m + 4 * kTile);
  }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int m = f.m, E = f.E;
    float* ws = reinterpret_cast<float*>(cx.smem());
    float* kv = ws + m * E;
    float* ks = kv + m * E;
    double* adk = reinterpret_cast<double*>(ks + m + (m & 1));  // 8-byte aligned
    double* adw = adk + m * E;
    double* ads = adw + m * E;
    float* qs = reinterpret_cast<float*>(ads + m);
    float* dys = qs + kTile * E;
    float* ys = dys + kTile * E;
    float* ph = ys + kTile * E;
    float* gp = ph + kTile * m;
    float* nrm = gp + kTile * m;
    float* den = nrm + kTile;
    float* dd = den + kTile;
    float* gs = dd + kTile;
    load_fp32(cx, ws, f.w, m * E);
    const int64_t b = by;
    load_fp32(cx, kv, kptv + b * m * E, m * E);
    load_fp32(cx, ks, ksum + b * m, m);
    for (int i = cx.tid(); i < m * E; i += kThreads) adk[i] = adw[i] = 0.0;
    for (int j = cx.tid(); j < m; j += kThreads) ads[j] = 0.0;
    int64_t t0, t1;
    split_range(T_, chunk, bx, t0, t1);
    for (int64_t tt = t0; tt < t1; tt += kTile) {
      const int valid = int(t1 - tt < kTile ? t1 - tt : kTile);
      const int64_t row0 = b * T_ + tt;
      load_tokens<T>(cx, qs, kqv, row0, valid, E, E);
      for (int i = cx.tid(); i < kTile * E; i += kThreads) dys[i] = i / E < valid ? dy[row0 * E + i] : 0.f;
      cx.sync();
      features(cx, f, ws, qs, nrm, ph, valid);
      normaliser(cx, ph, ks, m, eps, den);
      for (int i = cx.tid(); i < kTile * E; i += kThreads) {
        const int t = i / E, e = i - t * E;
        float s = 0.f;
        for (int j = 0; j < m; ++j) s += ph[t * m + j] * kv[j * E + e];
        ys[i] = s / den[t];
      }
      cx.sync();
      for (int t = cx.tid(); t < kTile; t += kThreads) {
        float s = 0.f;
        for (int e = 0; e < E; ++e) s += dys[t * E + e] * ys[t * E + e];
        dd[t] = -s / den[t];
      }
      cx.sync();
      for (int i = cx.tid(); i < kTile * E; i += kThreads) dys[i] /= den[i / E];  // dnum
      cx.sync();
      for (int i = cx.tid(); i < kTile * m; i += kThreads) {
        const int t = i / m, j = i - t * m;
        float s = 0.f;
        for (int e = 0; e < E; ++e) s += dys[t * E + e] * kv[j * E + e];
        gp[i] = (s + dd[t] * ks[j]) * ph[i];
      }
      cx.sync();
      row_sums(cx, gp, m, gs);
      if (dkqv != nullptr)
        for (int i = cx.tid(); i < valid * E; i += kThreads) {
          const int t = i / E, e = i - t * E;
          float s = 0.f;
          for (int j = 0; j < m; ++j) s += gp[t * m + j] * ws[j * E + e];
          store_f<T>(dkqv, (row0 + t) * 3 * E + E + e, s - gs[t] * qs[i]);
        }
      for (int i = cx.tid(); i < m * E; i += kThreads) {
        const int j = i / E, e = i - j * E;
        float a = 0.f, c = 0.f;
        for (int t = 0; t < kTile; ++t) {
          a += ph[t * m + j] * dys[t * E + e];
          c += gp[t * m + j] * qs[t * E + e];
        }
        adk[i] += a;
        adw[i] += c;
      }
      for (int j = cx.tid(); j < m; j += kThreads) {
        float s = 0.f;
        for (int t = 0; t < kTile; ++t) s += ph[t * m + j] * dd[t];
        ads[j] += s;
      }
      cx.sync();
    }
    const int64_t part = b * S + bx;
    for (int i = cx.tid(); i < m * E; i += kThreads) {
      part_dkv[part * m * E + i] = float(adk[i]);
      part_dw[part * m * E + i] = float(adw[i]);
    }
    for (int j = cx.tid(); j < m; j += kThreads) part_ds[part * m + j] = float(ads[j]);
  }
};

// Backward, k side: with the reduced d kptv (m, E) and d ksum (m): dphi = v dkptv^T + dksum,
// gphi = dphi phi(k); dk = gphi w - sum(gphi) k, dv = g + phi(k) dkptv into dkqv (unless null); partial
// dw = gphi^T k.
template <class T>
struct KBwd {
  static constexpr int kThreads = performer::kThreads;
  Feat f;
  const void* kqv;
  Tokens g;  // the output's gradient (B, T, E) through strides
  const float* dkptv;  // (B, m, E)
  const float* dksum;  // (B, m)
  void* dkqv;
  float* part_dw;  // (B, S, m, E)
  int B, T_, S;
  int64_t chunk;
  Dim3 grid() const { return {unsigned(S), unsigned(B), 1}; }
  int smem_bytes() const {
    const int mE = f.m * f.E;
    return 4 * (2 * mE + f.m + (f.m & 1)) + 8 * mE + 4 * (2 * kTile * f.E + 2 * kTile * f.m + 2 * kTile);
  }
  template <class Cx>
  FV_FN void operator()(Cx& cx, unsigned bx, unsigned by, unsigned) const {
    const int m = f.m, E = f.E;
    float* ws = reinterpret_cast<float*>(cx.smem());
    float* dkv = ws + m * E;
    float* dks = dkv + m * E;
    double* adw = reinterpret_cast<double*>(dks + m + (m & 1));
    float* ks = reinterpret_cast<float*>(adw + m * E);
    float* vs = ks + kTile * E;
    float* ph = vs + kTile * E;
    float* gp = ph + kTile * m;
    float* nrm = gp + kTile * m;
    float* gs = nrm + kTile;
    const int64_t b = by;
    load_fp32(cx, ws, f.w, m * E);
    load_fp32(cx, dkv, dkptv + b * m * E, m * E);
    load_fp32(cx, dks, dksum + b * m, m);
    for (int i = cx.tid(); i < m * E; i += kThreads) adw[i] = 0.0;
    int64_t t0, t1;
    split_range(T_, chunk, bx, t0, t1);
    for (int64_t tt = t0; tt < t1; tt += kTile) {
      const int valid = int(t1 - tt < kTile ? t1 - tt : kTile);
      const int64_t row0 = b * T_ + tt;
      load_tokens<T>(cx, ks, kqv, row0, valid, E, 0);
      load_tokens<T>(cx, vs, kqv, row0, valid, E, 2 * E);
      cx.sync();
      features(cx, f, ws, ks, nrm, ph, valid);
      for (int i = cx.tid(); i < kTile * m; i += kThreads) {
        const int t = i / m, j = i - t * m;
        float s = 0.f;
        for (int e = 0; e < E; ++e) s += vs[t * E + e] * dkv[j * E + e];
        gp[i] = (s + dks[j]) * ph[i];
      }
      cx.sync();
      row_sums(cx, gp, m, gs);
      if (dkqv != nullptr)
        for (int i = cx.tid(); i < valid * E; i += kThreads) {
          const int t = i / E, e = i - t * E;
          float dk = 0.f, dv = 0.f;
          for (int j = 0; j < m; ++j) {
            dk += gp[t * m + j] * ws[j * E + e];
            dv += ph[t * m + j] * dkv[j * E + e];
          }
          const int64_t row = row0 + t;
          store_f<T>(dkqv, row * 3 * E + e, dk - gs[t] * ks[i]);
          store_f<T>(dkqv, row * 3 * E + 2 * E + e, load_f<T>(g.ptr, token_offset(g, row, e)) + dv);
        }
      for (int i = cx.tid(); i < m * E; i += kThreads) {
        const int j = i / E, e = i - j * E;
        float c = 0.f;
        for (int t = 0; t < kTile; ++t) c += gp[t * m + j] * ks[t * E + e];
        adw[i] += c;
      }
      cx.sync();
    }
    const int64_t part = b * S + bx;
    for (int i = cx.tid(); i < m * E; i += kThreads) part_dw[part * m * E + i] = float(adw[i]);
  }
};

}  // namespace performer
}  // namespace fastvit
