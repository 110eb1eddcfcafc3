// Performer family: the ops' bodies on tensors (checks, outputs, workspaces, the order of the kernels),
// shared by the CUDA bindings (bindings_performer.cpp) and the CPU warp emulator the tests build
// (performer_emulate.cpp). Exec is embed_ops.h's executor interface.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "embed_ops.h"
#include "performer.cuh"

namespace fastvit {
namespace performer_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace P = fastvit::performer;
using embed_ops::alloc;
using embed_ops::by_dtype;

// The feature kernels keep (m, E) matrices and token tiles in shared memory.
constexpr int64_t kMaxEmb = 128, kMaxFeatures = 128, kMaxFeatureElems = 4096;

struct Shape {
  int64_t B, T, dim, E, m;
};

template <class Exec>
Shape check(const char* op, Exec& ex, const Tensor& x, const Tensor& kqv_weight, const OptTensor& kqv_bias,
            const Tensor& w, const Tensor& proj_weight, const OptTensor& proj_bias, double dropout_p,
            const OptTensor& seed) {
  TORCH_CHECK(x.dim() == 3, "fastvit ", op, " (cuda): x must be a 3-D token tensor (B, T, dim), got ", x.sizes());
  const Shape s{x.size(0), x.size(1), x.size(2), proj_weight.size(0), w.size(0)};
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(1) == s.E, "fastvit ", op,
              " (cuda): proj_weight must be (emb, emb), got ", proj_weight.sizes());
  TORCH_CHECK(kqv_weight.dim() == 2 && kqv_weight.size(0) == 3 * s.E && kqv_weight.size(1) == s.dim, "fastvit ", op,
              " (cuda): kqv_weight must be (3 * emb, dim) = (", 3 * s.E, ", ", s.dim, "), got ", kqv_weight.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == s.E && s.m >= 1, "fastvit ", op, " (cuda): w must be (m >= 1, emb = ", s.E,
              "), got ", w.sizes());
  TORCH_CHECK(!kqv_bias.has_value() || (kqv_bias->dim() == 1 && kqv_bias->size(0) == 3 * s.E), "fastvit ", op,
              " (cuda): kqv_bias must be (", 3 * s.E, ",)");
  TORCH_CHECK(!proj_bias.has_value() || (proj_bias->dim() == 1 && proj_bias->size(0) == s.E), "fastvit ", op,
              " (cuda): proj_bias must be (", s.E, ",)");
  TORCH_CHECK(kqv_weight.scalar_type() == x.scalar_type() && proj_weight.scalar_type() == x.scalar_type(), "fastvit ",
              op, " (cuda): kqv_weight and proj_weight must have x's dtype ", x.scalar_type());
  TORCH_CHECK(s.E >= 1 && s.E <= kMaxEmb && s.m <= kMaxFeatures && s.E * s.m <= kMaxFeatureElems, "fastvit ", op,
              " (cuda): emb must be 1 to ", kMaxEmb, " and m to ", kMaxFeatures, " with m * emb <= ", kMaxFeatureElems,
              " (the feature kernels hold them in shared memory), got emb ", s.E, " and m ", s.m);
  TORCH_CHECK(s.B <= embed_ops::kMaxGridY && s.T * 3 * s.E < (int64_t(1) << 31) &&
                  s.dim <= embed_ops::kMaxGridY * P::kBN,
              "fastvit ", op, " (cuda): sizes beyond the kernels' limits (B <= 65535, T * 3 emb < 2^31, dim <= ",
              embed_ops::kMaxGridY * P::kBN, ")");
  TORCH_CHECK(dropout_p == 0.0 || seed.has_value(), "fastvit ", op, " (cuda): dropout_p > 0 needs a seed tensor");
  ex.check(op, "x", x, x);
  ex.check(op, "kqv_weight", kqv_weight, x);
  ex.check(op, "w", w, x);
  ex.check(op, "proj_weight", proj_weight, x);
  embed_ops::check_device(op, ex, x, {{"kqv_bias", &kqv_bias}, {"proj_bias", &proj_bias}, {"seed", &seed}});
  if (seed.has_value())
    TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() >= 1, "fastvit ", op,
                " (cuda): seed must be an int64 tensor");
  return s;
}

using embed_ops::tokens;  // x, grad_out: (B, T, N) through their strides

// A contiguous (B * T, N) buffer's token rows.
inline P::Tokens flat_rows(const Tensor& t, int64_t T, int64_t N) { return {t.data_ptr(), T * N, N, 1, int(T), 0}; }

inline P::Dropout dropout(const OptTensor& seed, double p, int64_t E) {
  if (p <= 0.0 || !seed.has_value()) return {nullptr, 0.f, 1.f, int(E)};
  return {seed->data_ptr<int64_t>(), float(p), p < 1.0 ? float(1.0 / (1.0 - p)) : 0.f, int(E)};
}

inline P::Dropout no_dropout() { return {nullptr, 0.f, 1.f, 1}; }

// Token splits of the per-image feature kernels: about two blocks per SM over the batch.
inline int token_splits(int64_t B, int64_t T, int sms) {
  int64_t s = (2 * int64_t(sms) + B - 1) / B;
  s = std::min<int64_t>(s, (T + 63) / 64);
  return int(std::max<int64_t>(1, std::min<int64_t>(s, 65535)));
}

// C = A W^T over token rows (W read as (n, k) through strides sn, sk).
template <class T, class Exec>
void linear(Exec& ex, const P::Tokens& a, const P::Dropout& a_drop, const Tensor& w, int64_t sn, int64_t sk,
            const void* bias, int64_t R, int64_t N, int64_t K, P::Epilogue epi, void* out, const P::Tokens& v,
            const P::Dropout& drop) {
  if (sk == 1)
    ex.run(P::Linear<T, true>{a, a_drop, w.data_ptr(), sn, sk, bias, R, int(N), int(K), epi, out, v, drop});
  else
    ex.run(P::Linear<T, false>{a, a_drop, w.data_ptr(), sn, sk, bias, R, int(N), int(K), epi, out, v, drop});
}

// sum over rows of A^T X (N1, N2) in fp32, from split partials summed in order.
template <class T, class Exec>
Tensor row_gram(Exec& ex, const P::Tokens& a, const P::Dropout& a_drop, const P::Tokens& x, int64_t R, int64_t N1,
                int64_t N2, const at::TensorOptions& f32) {
  const int S = embed_ops::dw_splits(R, N1, N2, ex.num_sms());
  Tensor part = alloc(ex, {S, N1, N2}, f32);
  ex.run(P::RowGram<T>{a, a_drop, x, part.data_ptr<float>(), R, (R + S - 1) / S, int(N1), int(N2), S});
  return part.sum(0);
}

template <class T, class Exec>
Tensor row_sum(Exec& ex, const P::Tokens& a, const P::Dropout& a_drop, int64_t R, int64_t N,
               const at::TensorOptions& f32) {
  const int S = embed_ops::col_splits(R, N, ex.num_sms());
  Tensor part = alloc(ex, {S, N}, f32);
  ex.run(P::RowSum<T>{a, a_drop, part.data_ptr<float>(), R, (R + S - 1) / S, int(N), S});
  return part.sum(0);
}

// (out, ksum (B, m) fp32, kptv (B, m, E) fp32, kqv (B, T, 3E)).
template <class Exec>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward(Exec& ex, const Tensor& x, const Tensor& kqv_weight,
                                                   const OptTensor& kqv_bias, const Tensor& w,
                                                   const Tensor& proj_weight, const OptTensor& proj_bias, double eps,
                                                   double dropout_p, const OptTensor& seed) {
  const char* op = "performer_attention";
  const Shape s = check(op, ex, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, dropout_p, seed);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor kqv = alloc(ex, {s.B, s.T, 3 * s.E}, x.options());
  Tensor out = alloc(ex, {s.B, s.T, s.E}, x.options());
  if (s.B * s.T == 0) {  // no tokens: an empty output, token sums of zero (the reference's)
    return {out, at::zeros({s.B, s.m}, f32), at::zeros({s.B, s.m, s.E}, f32), kqv};
  }
  const int64_t R = s.B * s.T;
  const Tensor wf = w.to(at::kFloat).contiguous();
  const P::Feat feat{wf.data_ptr<float>(), int(s.m), int(s.E), float(1.0 / std::sqrt(double(s.m)))};
  const int S = token_splits(s.B, s.T, ex.num_sms());
  Tensor part_s = alloc(ex, {s.B, S, s.m}, f32), part_kv = alloc(ex, {s.B, S, s.m, s.E}, f32);
  Tensor y = alloc(ex, {R, s.E}, x.options());
  Tensor ksum, kptv;
  const Tensor kb = embed_ops::param(kqv_bias, x.scalar_type()), pb = embed_ops::param(proj_bias, x.scalar_type());
  by_dtype(op, "x", x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    linear<T>(ex, tokens(x), no_dropout(), kqv_weight, kqv_weight.stride(0), kqv_weight.stride(1),
              embed_ops::ptr_or_null(kb), R, 3 * s.E, s.dim, P::Epilogue::store, kqv.data_ptr(), P::Tokens{}, no_dropout());
    ex.run(P::KSide<T>{feat, kqv.data_ptr(), part_s.data_ptr<float>(), part_kv.data_ptr<float>(), int(s.B), int(s.T),
                       S, (s.T + S - 1) / S});
    ksum = part_s.sum(1);
    kptv = part_kv.sum(1);
    ex.run(P::QSide<T>{feat, kqv.data_ptr(), ksum.data_ptr<float>(), kptv.data_ptr<float>(), y.data_ptr(), int(s.B),
                       int(s.T), float(eps)});
    const P::Tokens v{static_cast<const char*>(kqv.data_ptr()) + 2 * s.E * kqv.element_size(), s.T * 3 * s.E, 3 * s.E, 1,
                      int(s.T), 0};
    linear<T>(ex, flat_rows(y, s.T, s.E), no_dropout(), proj_weight, proj_weight.stride(0), proj_weight.stride(1),
              embed_ops::ptr_or_null(pb), R, s.E, s.E, P::Epilogue::residual, out.data_ptr(), v,
              dropout(seed, dropout_p, s.E));
  });
  return {out, ksum, kptv, kqv};
}

// (dx, dkqv_weight, dkqv_bias, dw, dproj_weight, dproj_bias); the ones not asked for are empty.
template <class Exec>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    Exec& ex, const Tensor& g, const Tensor& x, const Tensor& kqv_weight, const OptTensor& kqv_bias, const Tensor& w,
    const Tensor& proj_weight, const OptTensor& proj_bias, double eps, double dropout_p, const OptTensor& seed,
    const Tensor& ksum, const Tensor& kptv, const Tensor& kqv, bool need_dx, bool need_dkqv, bool need_dw) {
  const char* op = "performer_attention";
  const Shape s = check(op, ex, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, dropout_p, seed);
  TORCH_CHECK(g.dim() == 3 && g.size(0) == s.B && g.size(1) == s.T && g.size(2) == s.E &&
                  g.scalar_type() == x.scalar_type(),
              "fastvit ", op, " (cuda): grad_out must be (B, T, emb) in x's dtype, got ", g.sizes());
  TORCH_CHECK(kqv.dim() == 3 && kqv.size(0) == s.B && kqv.size(1) == s.T && kqv.size(2) == 3 * s.E &&
                  kqv.is_contiguous() && kqv.scalar_type() == x.scalar_type(),
              "fastvit ", op, " (cuda): kqv must be the forward's contiguous (B, T, 3 emb) projection");
  TORCH_CHECK(ksum.scalar_type() == at::kFloat && kptv.scalar_type() == at::kFloat && ksum.is_contiguous() &&
                  kptv.is_contiguous() && ksum.numel() == s.B * s.m && kptv.numel() == s.B * s.m * s.E,
              "fastvit ", op, " (cuda): ksum and kptv must be the forward's fp32 sums");
  ex.check(op, "grad_out", g, x);
  const auto f32 = x.options().dtype(at::kFloat);
  const auto empty = [&] { return at::empty({0}, x.options()); };
  Tensor dx = empty(), dW = empty(), db = empty(), dw = empty(), dP, dpb = empty();
  const int64_t R = s.B * s.T;
  if (R == 0) {  // no tokens: zero parameter gradients, an empty dx
    if (need_dx) dx = at::zeros({s.B, s.T, s.dim}, x.options());
    if (need_dkqv) {
      dW = at::zeros_like(kqv_weight);
      if (kqv_bias.has_value()) db = at::zeros_like(*kqv_bias);
    }
    if (need_dw) dw = at::zeros_like(w);
    dP = at::zeros_like(proj_weight);
    if (proj_bias.has_value()) dpb = at::zeros_like(*proj_bias);
    return {dx, dW, db, dw, dP, dpb};
  }
  const Tensor wf = w.to(at::kFloat).contiguous();
  const P::Feat feat{wf.data_ptr<float>(), int(s.m), int(s.E), float(1.0 / std::sqrt(double(s.m)))};
  const P::Dropout drop = dropout(seed, dropout_p, s.E);
  const P::Tokens gr = tokens(g);
  by_dtype(op, "x", x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    // the projection: y recomputed (rounded as the forward's), dP = dz^T y, dpb = sum dz, dy = dz P
    Tensor y = alloc(ex, {R, s.E}, x.options());
    ex.run(P::QSide<T>{feat, kqv.data_ptr(), ksum.data_ptr<float>(), kptv.data_ptr<float>(), y.data_ptr(), int(s.B),
                       int(s.T), float(eps)});
    dP = row_gram<T>(ex, gr, drop, flat_rows(y, s.T, s.E), R, s.E, s.E, f32).to(proj_weight.scalar_type());
    if (proj_bias.has_value()) dpb = row_sum<T>(ex, gr, drop, R, s.E, f32).to(proj_bias->scalar_type());
    if (!(need_dx || need_dkqv || need_dw)) return;
    Tensor dy = alloc(ex, {R, s.E}, f32);
    linear<T>(ex, gr, drop, proj_weight, proj_weight.stride(1), proj_weight.stride(0), nullptr, R, s.E, s.E,
              P::Epilogue::store_f32, dy.data_ptr(), P::Tokens{}, no_dropout());
    // the features: dq (q side), then dk, dv (k side), and dw
    const bool need_dq = need_dx || need_dkqv;
    Tensor dkqv = need_dq ? alloc(ex, {s.B, s.T, 3 * s.E}, x.options()) : Tensor();
    const int S = token_splits(s.B, s.T, ex.num_sms());
    Tensor pdk = alloc(ex, {s.B, S, s.m, s.E}, f32), pds = alloc(ex, {s.B, S, s.m}, f32);
    Tensor pdw = alloc(ex, {2, s.B, S, s.m, s.E}, f32);
    const int64_t chunk = (s.T + S - 1) / S;
    ex.run(P::QBwd<T>{feat, kqv.data_ptr(), ksum.data_ptr<float>(), kptv.data_ptr<float>(), dy.data_ptr<float>(),
                      need_dq ? dkqv.data_ptr() : nullptr, pdk.data_ptr<float>(), pds.data_ptr<float>(),
                      pdw.data_ptr<float>(), int(s.B), int(s.T), S, chunk, float(eps)});
    const Tensor dkptv = pdk.sum(1), dksum = pds.sum(1);
    ex.run(P::KBwd<T>{feat, kqv.data_ptr(), gr, dkptv.data_ptr<float>(), dksum.data_ptr<float>(),
                      need_dq ? dkqv.data_ptr() : nullptr, pdw.select(0, 1).data_ptr<float>(), int(s.B), int(s.T), S,
                      chunk});
    if (need_dw) dw = pdw.sum({0, 1, 2}).to(w.scalar_type());
    // the kqv projection's gradients: dx = dkqv Wkqv, dWkqv = dkqv^T x, dbkqv = sum dkqv
    if (!need_dq) return;
    const P::Tokens dr = flat_rows(dkqv, s.T, 3 * s.E);
    if (need_dx) {
      dx = alloc(ex, {s.B, s.T, s.dim}, x.options());
      linear<T>(ex, dr, no_dropout(), kqv_weight, kqv_weight.stride(1), kqv_weight.stride(0), nullptr, R, s.dim, 3 * s.E,
                P::Epilogue::store, dx.data_ptr(), P::Tokens{}, no_dropout());
    }
    if (need_dkqv) {
      dW = row_gram<T>(ex, dr, no_dropout(), tokens(x), R, 3 * s.E, s.dim, f32).to(kqv_weight.scalar_type());
      if (kqv_bias.has_value()) db = row_sum<T>(ex, dr, no_dropout(), R, 3 * s.E, f32).to(kqv_bias->scalar_type());
    }
  });
  return {dx, dW, db, dw, dP, dpb};
}

template <class Exec>
struct Ops {
  using Opt = const OptTensor&;
  static std::tuple<Tensor, Tensor, Tensor, Tensor> fwd(const Tensor& x, const Tensor& kqv_weight, Opt kqv_bias,
                                                        const Tensor& w, const Tensor& proj_weight, Opt proj_bias,
                                                        double eps, double dropout_p, Opt seed) {
    Exec ex;
    const auto guard = ex.guard(x);
    return forward(ex, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed);
  }
  static Tensor infer(const Tensor& x, const Tensor& kqv_weight, Opt kqv_bias, const Tensor& w,
                      const Tensor& proj_weight, Opt proj_bias, double eps, double dropout_p, Opt seed) {
    Exec ex;
    const auto guard = ex.guard(x);
    return std::get<0>(forward(ex, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed));
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bwd(
      const Tensor& g, const Tensor& x, const Tensor& kqv_weight, Opt kqv_bias, const Tensor& w,
      const Tensor& proj_weight, Opt proj_bias, double eps, double dropout_p, Opt seed, const Tensor& ksum,
      const Tensor& kptv, const Tensor& kqv, bool need_dx, bool need_dkqv, bool need_dw) {
    Exec ex;
    const auto guard = ex.guard(x);
    return backward(ex, g, x, kqv_weight, kqv_bias, w, proj_weight, proj_bias, eps, dropout_p, seed, ksum, kptv, kqv,
                    need_dx, need_dkqv, need_dw);
  }
};

// The op definitions: exactly the Triton ops' schemas (kernels/performer.py; a test compares them).
inline void define_ops(torch::Library& m) {
  m.def(
      "performer_attention_cuda_fwd(Tensor x, Tensor kqv_weight, Tensor? kqv_bias, Tensor w, Tensor proj_weight, "
      "Tensor? proj_bias, float eps, float dropout_p, Tensor? seed) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "performer_attention_cuda_infer(Tensor x, Tensor kqv_weight, Tensor? kqv_bias, Tensor w, Tensor proj_weight, "
      "Tensor? proj_bias, float eps, float dropout_p, Tensor? seed) -> Tensor");
  m.def(
      "performer_attention_cuda_bwd(Tensor grad_out, Tensor x, Tensor kqv_weight, Tensor? kqv_bias, Tensor w, "
      "Tensor proj_weight, Tensor? proj_bias, float eps, float dropout_p, Tensor? seed, Tensor ksum, Tensor kptv, "
      "Tensor kqv, bool need_dx, bool need_dkqv, bool need_dw) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

template <class Exec>
void register_impls(torch::Library& m) {
  m.impl("performer_attention_cuda_fwd", &Ops<Exec>::fwd);
  m.impl("performer_attention_cuda_infer", &Ops<Exec>::infer);
  m.impl("performer_attention_cuda_bwd", &Ops<Exec>::bwd);
}

}  // namespace performer_ops
}  // namespace fastvit
