// Attention family: the ops' bodies on tensors (checks, strides, outputs, workspaces), shared by the CUDA
// bindings (bindings_attention.cpp, Exec = the CUDA launchers) and the CPU warp emulator the tests build
// (attention_emulate.cpp, Exec = the emulator), so the tests run the same plumbing as the GPU.
//
// Exec provides: guard(tensor), whose result keeps the tensor's device current for the call;
// num_sms(), smem_per_sm(); check(op, arg, tensor, like) for device placement; fresh(tensor), called on
// every output and workspace right after allocation (the emulator fills them with NaN, so an element a
// kernel misses shows); forward(DType, FwdParams) and backward(DType, BwdParams), which raise on failure;
// sm90_backward(BwdParams), whether the Hopper backward serves (its plan differs).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "attention.cuh"

namespace fastvit {
namespace attention_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace A = fastvit::attention;
using Strides = std::array<int64_t, 4>;

inline A::DType dtype_of(const char* op, const char* arg, const Tensor& t) {
  if (t.scalar_type() == at::kHalf) return A::DType::f16;
  if (t.scalar_type() == at::kBFloat16) return A::DType::bf16;
  TORCH_CHECK(false, "fastvit ", op, " (cuda): ", arg, " must be float16 or bfloat16 (float32 runs on the triton or ",
              "eager backend), got ", t.scalar_type());
  return A::DType::f16;
}

// Strides of a (B, H, N, D) view with those of size-1 dims set to 0 (any stride reads index 0 there).
inline Strides strides_of(const Tensor& t) {
  Strides s{};
  for (int i = 0; i < 4; ++i) s[i] = t.size(i) == 1 ? 0 : t.stride(i);
  return s;
}

inline A::Operand operand(const Tensor& t) {
  const Strides s = strides_of(t);
  const bool vec8 = s[3] == 1 && t.size(3) % 8 == 0 && s[0] % 8 == 0 && s[1] % 8 == 0 && s[2] % 8 == 0 &&
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  return {t.data_ptr(), s[0], s[1], s[2], s[3], vec8};
}

inline A::Output output(void* ptr, const Strides& s) { return {ptr, s[0], s[1], s[2], s[3]}; }

// (B, H, N, D) strides of a contiguous (B, N, width) buffer whose last dim holds (H, D) blocks.
inline Strides packed_strides(int64_t N, int64_t H, int64_t D, int64_t width) { return {N * width, D, width, 1}; }

struct Shape {
  int64_t B, H, Nq, Nk, D;
  A::DType t;
};

template <class Exec>
Shape check_qkv(const char* op, Exec& ex, const Tensor& q, const Tensor& k, const Tensor& v) {
  for (const auto& [arg, x] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}, {"v", &v}})
    TORCH_CHECK(x->dim() == 4, "fastvit ", op, " (cuda): ", arg, " must be a 4-D (B, H, N, D) tensor, got shape ",
                x->sizes());
  const Shape s{q.size(0), q.size(1), q.size(2), k.size(2), q.size(3), dtype_of(op, "q", q)};
  TORCH_CHECK(k.size(0) == s.B && k.size(1) == s.H && k.size(3) == s.D && v.sizes() == k.sizes(), "fastvit ", op,
              " (cuda): k and v must be (B, H, Nk, D) with q's B, H and D, got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "fastvit ", op,
              " (cuda): q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(A::padded_head_dim(int(s.D)) != 0, "fastvit ", op, " (cuda): the head dim must be 1 to ",
              A::kMaxHeadDim, ", got ", s.D);
  TORCH_CHECK(s.B <= 65535 && s.H <= 65535, "fastvit ", op, " (cuda): batch and heads must be at most 65535 each, got ",
              s.B, " and ", s.H);
  TORCH_CHECK(s.Nq < (int64_t(1) << 30) && s.Nk < (int64_t(1) << 30), "fastvit ", op,
              " (cuda): sequence lengths must be below 2^30");
  ex.check(op, "q", q, q);
  ex.check(op, "k", k, q);
  ex.check(op, "v", v, q);
  return s;
}

// The mask as the kernels read it: its own dtype (bool as bytes; float64 converted to float32), through
// the strides of its broadcast to (B, H, Nq, Nk). `keep` holds a converted copy alive.
template <class Exec>
A::Mask mask_of(const char* op, Exec& ex, const OptTensor& mask, const Shape& s, const Tensor& like, Tensor& keep) {
  if (!mask.has_value()) return {nullptr, 0, 0, 0, 0, A::MaskKind::none};
  ex.check(op, "mask", *mask, like);
  Tensor m = *mask;
  A::MaskKind kind;
  switch (m.scalar_type()) {
    case at::kBool: kind = A::MaskKind::boolean; break;
    case at::kFloat: kind = A::MaskKind::f32; break;
    case at::kHalf: kind = A::MaskKind::f16; break;
    case at::kBFloat16: kind = A::MaskKind::bf16; break;
    case at::kDouble:
      m = m.to(at::kFloat);
      kind = A::MaskKind::f32;
      break;
    default:
      TORCH_CHECK(false, "fastvit ", op, " (cuda): mask must be bool (True = attend) or a float tensor, got ",
                  m.scalar_type());
  }
  TORCH_CHECK(m.dim() <= 4, "fastvit ", op, " (cuda): mask must broadcast to (B, H, Nq, Nk) = (", s.B, ", ", s.H,
              ", ", s.Nq, ", ", s.Nk, "), got shape ", m.sizes());
  const Tensor e = m.expand({s.B, s.H, s.Nq, s.Nk});
  keep = m;
  const Strides st = strides_of(e);
  return {e.data_ptr(), st[0], st[1], st[2], st[3], kind};
}

template <class Exec>
Tensor alloc(Exec& ex, at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  ex.fresh(t);
  return t;
}

inline float log2_scale(double scale) { return float(scale * 1.4426950408889634); }

// o (written through o_strides) and lse (B, H, Nq) fp32 when with_lse.
template <class Exec>
Tensor forward(const char* op, Exec& ex, const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
               double scale, void* o, const Strides& o_strides, bool with_lse) {
  const Shape s = check_qkv(op, ex, q, k, v);
  Tensor lse = with_lse ? alloc(ex, {s.B, s.H, s.Nq}, q.options().dtype(at::kFloat)) : Tensor();
  if (s.B * s.H * s.Nq == 0) return lse;
  if (s.Nk == 0) {  // nothing to attend: every row gives 0, lse -inf
    at::from_blob(o, {s.B, s.H, s.Nq, s.D}, {o_strides[0], o_strides[1], o_strides[2], o_strides[3]}, q.options())
        .zero_();
    if (with_lse) lse.fill_(-INFINITY);
    return lse;
  }
  Tensor keep;
  A::FwdParams p{};
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.o = output(o, o_strides);
  p.lse = with_lse ? lse.data_ptr<float>() : nullptr;
  p.mask = mask_of(op, ex, mask, s, q, keep);
  p.B = int(s.B), p.H = int(s.H), p.Nq = int(s.Nq), p.Nk = int(s.Nk), p.D = int(s.D);
  p.scale_log2 = log2_scale(scale);
  ex.forward(s.t, p);
  return lse;
}

// dq, dk, dv written through their strides (packed: three offsets into one buffer).
template <class Exec>
void backward(const char* op, Exec& ex, const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
              const Tensor& o, const Tensor& lse, const OptTensor& mask, double scale, const A::Output& dq,
              const A::Output& dk, const A::Output& dv) {
  const Shape s = check_qkv(op, ex, q, k, v);
  TORCH_CHECK(dout.dim() == 4 && o.dim() == 4 && dout.sizes() == q.sizes() && o.sizes() == q.sizes(), "fastvit ", op,
              " (cuda): do and o must have q's shape ", q.sizes(), ", got ", dout.sizes(), " and ", o.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && o.scalar_type() == q.scalar_type(), "fastvit ", op,
              " (cuda): do and o must have q's dtype ", q.scalar_type(), ", got ", dout.scalar_type(), " and ",
              o.scalar_type());
  ex.check(op, "do", dout, q);
  ex.check(op, "o", o, q);
  ex.check(op, "lse", lse, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 3 && lse.size(0) == s.B &&
                  lse.size(1) == s.H && lse.size(2) == s.Nq,
              "fastvit ", op, " (cuda): lse must be contiguous float32 (B, H, Nq) = (", s.B, ", ", s.H, ", ", s.Nq,
              ") as the forward saved it, got ", lse.scalar_type(), " ", lse.sizes());
  const auto zero = [&](const A::Output& g, int64_t n) {
    if (s.B * s.H * n * s.D == 0) return;
    at::from_blob(g.ptr, {s.B, s.H, n, s.D}, {g.sb, g.sh, g.sn, g.sd}, q.options()).zero_();
  };
  if (s.B * s.H * s.Nq * s.Nk == 0) {  // no query or no key: every gradient is 0
    zero(dq, s.Nq);
    zero(dk, s.Nk);
    zero(dv, s.Nk);
    return;
  }
  Tensor keep;
  A::BwdParams p{};
  p.q = operand(q);
  p.k = operand(k);
  p.v = operand(v);
  p.o = operand(o);
  p.dout = operand(dout);
  p.B = int(s.B), p.H = int(s.H), p.Nq = int(s.Nq), p.Nk = int(s.Nk), p.D = int(s.D);
  p.sm90 = ex.sm90_backward(p);
  const A::BwdPlan plan = A::plan_bwd(p.B, p.H, p.Nq, p.Nk, p.D, ex.num_sms(), ex.smem_per_sm(), p.sm90);
  Tensor delta = alloc(ex, {s.B, s.H, plan.delta_ld}, q.options().dtype(at::kFloat));
  Tensor lse_pad = p.sm90 ? alloc(ex, {s.B, s.H, plan.delta_ld}, q.options().dtype(at::kFloat)) : Tensor();
  Tensor acc = plan.dq_acc_elems ? alloc(ex, {plan.dq_acc_elems}, q.options().dtype(at::kFloat)) : Tensor();
  p.lse = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.lse_pad = p.sm90 ? lse_pad.data_ptr<float>() : nullptr;
  p.delta_ld = plan.delta_ld;
  p.dq_acc = acc.defined() ? acc.data_ptr<float>() : nullptr;
  p.dq = dq;
  p.dk = dk;
  p.dv = dv;
  p.mask = mask_of(op, ex, mask, s, q, keep);
  p.scale = float(scale);
  p.scale_log2 = log2_scale(scale);
  p.splits = plan.splits;
  p.blocks_per_split = plan.blocks_per_split;
  p.dq_smem_rows = plan.dq_smem_rows;
  ex.backward(s.t, p);
}

// ------------------------------------------------------------------------------ the six ops' bodies

template <class Exec>
std::tuple<Tensor, Tensor> attention_fwd(Exec& ex, const Tensor& q, const Tensor& k, const Tensor& v,
                                         const OptTensor& mask, double scale, bool with_lse) {
  TORCH_CHECK(q.dim() == 4, "fastvit attention (cuda): q must be a 4-D (B, H, N, D) tensor, got shape ", q.sizes());
  Tensor o = alloc(ex, q.sizes(), q.options());
  Tensor lse = forward("attention", ex, q, k, v, mask, scale, o.data_ptr(), strides_of(o), with_lse);
  return {o, lse};
}

template <class Exec>
std::tuple<Tensor, Tensor, Tensor> attention_bwd(Exec& ex, const Tensor& dout, const Tensor& q, const Tensor& k,
                                                 const Tensor& v, const Tensor& o, const Tensor& lse,
                                                 const OptTensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "fastvit attention (cuda): q, k and v must be 4-D");
  Tensor dq = alloc(ex, q.sizes(), q.options()), dk = alloc(ex, k.sizes(), k.options()),
         dv = alloc(ex, v.sizes(), v.options());
  backward("attention", ex, dout, q, k, v, o, lse, mask, scale, output(dq.data_ptr(), strides_of(dq)),
           output(dk.data_ptr(), strides_of(dk)), output(dv.data_ptr(), strides_of(dv)));
  return {dq, dk, dv};
}

// q, k, v (B, H, N, D) views of the packed projection (B, N, 3 * H * D), last dim laid out (3, H, D).
inline std::array<Tensor, 3> unpack(const Tensor& qkv, int64_t num_heads) {
  TORCH_CHECK(qkv.dim() == 3, "fastvit attention_qkvpacked (cuda): qkv must be a 3-D (B, N, 3 * H * D) tensor, got ",
              qkv.sizes());
  TORCH_CHECK(num_heads >= 1 && qkv.size(2) % (3 * num_heads) == 0 && qkv.size(2) > 0,
              "fastvit attention_qkvpacked (cuda): qkv's last dim (", qkv.size(2),
              ") must be 3 * num_heads * head_dim with num_heads = ", num_heads);
  const Tensor u = qkv.unflatten(-1, {3, num_heads, qkv.size(2) / (3 * num_heads)}).permute({2, 0, 3, 1, 4});
  return {u.select(0, 0), u.select(0, 1), u.select(0, 2)};
}

template <class Exec>
std::tuple<Tensor, Tensor> qkvpacked_fwd(Exec& ex, const Tensor& qkv, int64_t num_heads, const OptTensor& mask,
                                         double scale, bool with_lse) {
  const auto [q, k, v] = unpack(qkv, num_heads);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  Tensor o = alloc(ex, {B, N, H * D}, qkv.options());
  Tensor lse = forward("attention_qkvpacked", ex, q, k, v, mask, scale, o.data_ptr(), packed_strides(N, H, D, H * D),
                       with_lse);
  return {o, lse};
}

template <class Exec>
Tensor qkvpacked_bwd(Exec& ex, const Tensor& dout, const Tensor& qkv, const Tensor& o, const Tensor& lse,
                     const OptTensor& mask, int64_t num_heads, double scale) {
  const auto [q, k, v] = unpack(qkv, num_heads);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  for (const auto& [arg, x] : {std::pair<const char*, const Tensor*>{"do", &dout}, {"o", &o}})
    TORCH_CHECK(x->dim() == 3 && x->size(0) == B && x->size(1) == N && x->size(2) == H * D,
                "fastvit attention_qkvpacked (cuda): ", arg, " must be (B, N, H * D) = (", B, ", ", N, ", ", H * D,
                "), got ", x->sizes());
  Tensor dqkv = alloc(ex, {B, N, 3 * H * D}, qkv.options());
  const Strides st = packed_strides(N, H, D, 3 * H * D);
  auto* base = static_cast<uint16_t*>(dqkv.data_ptr());
  const auto heads = [&](const Tensor& x) { return x.unflatten(-1, {H, D}).transpose(1, 2); };
  backward("attention_qkvpacked", ex, heads(dout), q, k, v, heads(o), lse, mask, scale, output(base, st),
           output(base + H * D, st), output(base + 2 * H * D, st));
  return dqkv;
}

// The ops' kernels on executor Exec, registered under the CUDA ops' names for Exec's dispatch key.
template <class Exec>
struct Ops {
  static std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const OptTensor& mask, double scale) {
    Exec ex;
    const auto guard = ex.guard(q);
    return attention_ops::attention_fwd(ex, q, k, v, mask, scale, true);
  }
  static Tensor attention_infer(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                double scale) {
    Exec ex;
    const auto guard = ex.guard(q);
    return std::get<0>(attention_ops::attention_fwd(ex, q, k, v, mask, scale, false));
  }
  static std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                                          const Tensor& v, const Tensor& o, const Tensor& lse,
                                                          const OptTensor& mask, double scale) {
    Exec ex;
    const auto guard = ex.guard(q);
    return attention_ops::attention_bwd(ex, dout, q, k, v, o, lse, mask, scale);
  }
  static std::tuple<Tensor, Tensor> qkvpacked_fwd(const Tensor& qkv, int64_t num_heads, const OptTensor& mask,
                                                  double scale) {
    Exec ex;
    const auto guard = ex.guard(qkv);
    return attention_ops::qkvpacked_fwd(ex, qkv, num_heads, mask, scale, true);
  }
  static Tensor qkvpacked_infer(const Tensor& qkv, int64_t num_heads, const OptTensor& mask, double scale) {
    Exec ex;
    const auto guard = ex.guard(qkv);
    return std::get<0>(attention_ops::qkvpacked_fwd(ex, qkv, num_heads, mask, scale, false));
  }
  static Tensor qkvpacked_bwd(const Tensor& dout, const Tensor& qkv, const Tensor& o, const Tensor& lse,
                              const OptTensor& mask, int64_t num_heads, double scale) {
    Exec ex;
    const auto guard = ex.guard(qkv);
    return attention_ops::qkvpacked_bwd(ex, dout, qkv, o, lse, mask, num_heads, scale);
  }
};

template <class Exec>
void register_impls(torch::Library& m) {
  m.impl("attention_cuda_fwd", &Ops<Exec>::attention_fwd);
  m.impl("attention_cuda_infer", &Ops<Exec>::attention_infer);
  m.impl("attention_cuda_bwd", &Ops<Exec>::attention_bwd);
  m.impl("attention_qkvpacked_cuda_fwd", &Ops<Exec>::qkvpacked_fwd);
  m.impl("attention_qkvpacked_cuda_infer", &Ops<Exec>::qkvpacked_infer);
  m.impl("attention_qkvpacked_cuda_bwd", &Ops<Exec>::qkvpacked_bwd);
}

}  // namespace attention_ops
}  // namespace fastvit
