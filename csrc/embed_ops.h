// Embed family: the ops' bodies on tensors (checks, geometry, strides, outputs, workspaces, the order of
// the kernels), shared by the CUDA bindings (bindings_embed.cpp, Exec = the CUDA launchers) and the CPU
// warp emulator the tests build (embed_emulate.cpp), so the tests run the same plumbing as the GPU.
//
// Exec provides: guard(tensor), whose result keeps the tensor's device current for the call; num_sms();
// check(op, arg, tensor, like) for device placement; fresh(tensor), called on every output and workspace
// right after allocation (the emulator fills them with NaN); run(kernel), which runs one kernel object
// of embed_kernel.h and raises on failure.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "embed.cuh"

namespace fastvit {
namespace embed_ops {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace E = fastvit::embed;

template <class T>
struct Tag {
  using type = T;
};

// f(Tag<T>{}) for the kernels' element type of a float32 / float16 / bfloat16 dtype.
template <class F>
void by_dtype(const char* op, const char* arg, at::ScalarType s, F&& f) {
  switch (s) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    default:
      TORCH_CHECK(false, "fastvit ", op, " (cuda): ", arg, " must be float32, float16 or bfloat16, got ", s);
  }
}

template <class Exec>
Tensor alloc(Exec& ex, at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  ex.fresh(t);
  return t;
}

inline Tensor none_like(const Tensor& t) { return at::empty({0}, t.options()); }  // an unused output

inline const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
inline const float* fptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// A small parameter (bias, norm weight, pos_embed, cls_token) converted to a contiguous dtype, or undefined.
inline Tensor param(const OptTensor& t, at::ScalarType dtype) {
  return t.has_value() ? t->to(dtype).contiguous() : Tensor();
}

template <class Exec>
void check_device(const char* op, Exec& ex, const Tensor& like,
                  std::initializer_list<std::pair<const char*, const OptTensor*>> tensors) {
  for (const auto& [arg, t] : tensors)
    if (t->has_value()) ex.check(op, arg, **t, like);
}

inline E::Image image(const Tensor& x) {
  return {x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), x.stride(3), int(x.size(0)), int(x.size(1)),
          int(x.size(2)), int(x.size(3))};
}

// dx in x's memory format (channels_last stays channels_last).
template <class Exec>
Tensor dx_like(Exec& ex, const Tensor& x) {
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  if (x.stride(1) == 1 && C > 1 && !x.is_contiguous())
    return alloc(ex, {B, H, W, C}, x.options()).permute({0, 3, 1, 2});
  return alloc(ex, {B, C, H, W}, x.options());
}

// ------------------------------------------------------------------------------------- patch_embed

constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y and gridDim.z

struct PatchSetup {
  E::Patches g;
  E::Weight w;
  int D, LT;
  bool has_cls;
  Tensor bias, pos, cls, pre_w, pre_b, post_w, post_b;  // converted: T (bias, pos (LT, D), cls), fp32 (norms)
};

template <class Exec>
PatchSetup patch_setup(const char* op, Exec& ex, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                       const OptTensor& pos, const OptTensor& cls, const OptTensor& pre_w, const OptTensor& pre_b,
                       const OptTensor& post_w, const OptTensor& post_b, int64_t ph, int64_t pw,
                       const std::string& order, bool pre_norm, bool post_norm) {
  TORCH_CHECK(order == "chw" || order == "hwc", "fastvit ", op, " (cuda): patch_order must be 'chw' or 'hwc', got '",
              order, "'");
  const bool hwc = order == "hwc";
  TORCH_CHECK(x.dim() == 4, "fastvit ", op, " (cuda): x must be a 4-D image batch (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(ph >= 1 && pw >= 1, "fastvit ", op, " (cuda): the patch size must be positive, got ", ph, " x ", pw);
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), K = C * ph * pw;
  TORCH_CHECK(H % ph == 0 && W % pw == 0, "fastvit ", op, " (cuda): x's image size (", H, ", ", W,
              ") must be a multiple of the patch size (", ph, ", ", pw, ")");
  if (hwc) {
    TORCH_CHECK(weight.dim() == 2 && weight.size(1) == K, "fastvit ", op,
                " (cuda): weight must be a linear weight (D, p*p*C) = (D, ", K, ") for patch_order='hwc', got ",
                weight.sizes());
  } else {
    TORCH_CHECK(weight.dim() == 4 && weight.size(1) == C && weight.size(2) == ph && weight.size(3) == pw, "fastvit ",
                op, " (cuda): weight must be a conv weight (D, C, p, p) = (D, ", C, ", ", ph, ", ", pw, "), got ",
                weight.sizes());
  }
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "fastvit ", op, " (cuda): x must have weight's dtype ",
              weight.scalar_type(), ", got ", x.scalar_type(),
              " (a float32 x before a pre-norm under autocast runs on the triton or eager backend)");
  const int64_t D = weight.size(0);
  TORCH_CHECK(K <= kMaxGridY * E::kBN && D <= kMaxGridY * E::kBN && (H / ph) * (W / pw) < (int64_t(1) << 30),
              "fastvit ", op, " (cuda): the patch features C*p*p (", K, ") and D (", D, ") must be at most ",
              kMaxGridY * E::kBN, " (64-wide tiles on the grid's second dim) and the tokens per image below 2^30");
  ex.check(op, "x", x, x);
  ex.check(op, "weight", weight, x);
  check_device(op, ex, x, {{"bias", &bias}, {"pos_embed", &pos}, {"cls_token", &cls}, {"pre_weight", &pre_w},
                           {"pre_bias", &pre_b}, {"post_weight", &post_w}, {"post_bias", &post_b}});
  PatchSetup s;
  const int WP = int(W / pw), L = int((H / ph) * WP);
  s.g = {image(x), int(ph), int(pw), WP, L, int(K), B * L, hwc};
  if (hwc) {
    const int64_t s1 = weight.stride(1);
    s.w = {weight.data_ptr(), weight.stride(0), s1, pw * C * s1, C * s1};
  } else {
    s.w = {weight.data_ptr(), weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3)};
  }
  s.D = int(D);
  s.has_cls = cls.has_value();
  s.LT = L + int(s.has_cls);
  const auto dt = weight.scalar_type();
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == D), "fastvit ", op, " (cuda): bias must be (",
              D, ",)");
  TORCH_CHECK(!cls.has_value() || cls->numel() == D, "fastvit ", op, " (cuda): cls_token must have ", D, " elements");
  TORCH_CHECK(!pos.has_value() || pos->numel() == int64_t(s.LT) * D, "fastvit ", op, " (cuda): pos_embed must be (",
              s.LT, ", ", D, ") or (1, ", s.LT, ", ", D, ")");
  s.bias = param(bias, dt);
  s.pos = pos.has_value() ? pos->to(dt).reshape({s.LT, D}).contiguous() : Tensor();
  s.cls = cls.has_value() ? cls->to(dt).reshape({D}).contiguous() : Tensor();
  if (pre_norm) {
    s.pre_w = param(pre_w, at::kFloat);
    s.pre_b = param(pre_b, at::kFloat);
  }
  if (post_norm) {
    s.post_w = param(post_w, at::kFloat);
    s.post_b = param(post_b, at::kFloat);
  }
  return s;
}

// (out, z, mu1, rstd1, mu2, rstd2): z = the projection before the post-norm and the fp32 statistics of
// each norm, saved when `save` (empty where unused).
template <class Exec>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_forward(
    Exec& ex, const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& pos,
    const OptTensor& cls, const OptTensor& pre_w, const OptTensor& pre_b, const OptTensor& post_w,
    const OptTensor& post_b, int64_t ph, int64_t pw, const std::string& order, bool pre_norm, bool post_norm,
    double eps, bool save) {
  const char* op = "patch_embed";
  const PatchSetup s = patch_setup(op, ex, x, weight, bias, pos, cls, pre_w, pre_b, post_w, post_b, ph, pw, order,
                                   pre_norm, post_norm);
  const int64_t B = x.size(0), M = s.g.M, D = s.D;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor out = alloc(ex, {B, s.LT, D}, weight.options());
  Tensor mu1 = pre_norm ? alloc(ex, {M}, f32) : at::empty({0}, f32);  // the pre-norm needs them, saved or not
  Tensor r1 = pre_norm ? alloc(ex, {M}, f32) : at::empty({0}, f32);
  Tensor z = (post_norm && save) ? alloc(ex, {B, s.g.L, D}, weight.options()) : none_like(out);
  Tensor mu2 = (post_norm && save) ? alloc(ex, {M}, f32) : at::empty({0}, f32);
  Tensor r2 = (post_norm && save) ? alloc(ex, {M}, f32) : at::empty({0}, f32);
  const Tensor rows = out.narrow(1, int64_t(s.has_cls), s.g.L);  // the patch tokens' rows of out
  const E::Rows out_rows{out.data_ptr(), out.stride(0), out.stride(1), out.stride(2)};
  by_dtype(op, "weight", weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (pre_norm) ex.run(E::PatchStats<T>{s.g, mu1.data_ptr<float>(), r1.data_ptr<float>(), float(eps)});
    E::PatchFwd<T> k{};
    k.g = s.g;
    k.w = s.w;
    k.D = s.D;
    k.bias = ptr_or_null(s.bias);
    if (pre_norm) {
      k.mean = mu1.data_ptr<float>();
      k.rstd = r1.data_ptr<float>();
      k.pre_w = fptr_or_null(s.pre_w);
      k.pre_b = fptr_or_null(s.pre_b);
    }
    const Tensor& zt = save ? z : rows;  // inference: the projection goes to out's rows, normalised in place
    if (post_norm) {
      k.out = {zt.data_ptr(), zt.stride(0), zt.stride(1), zt.stride(2)};
      k.row0 = 0;
    } else {
      k.pos = ptr_or_null(s.pos);
      k.spt = D, k.spd = 1;
      k.out = out_rows;
      k.row0 = int(s.has_cls);
    }
    ex.run(k);
    if (post_norm) {
      E::PatchPostNorm<T> n{};
      n.z = {zt.data_ptr(), zt.stride(0), zt.stride(1), zt.stride(2)};
      n.out = out_rows;
      n.w = fptr_or_null(s.post_w);
      n.b = fptr_or_null(s.post_b);
      n.pos = ptr_or_null(s.pos);
      n.spt = D, n.spd = 1;
      n.mean = save ? mu2.data_ptr<float>() : nullptr;
      n.rstd = save ? r2.data_ptr<float>() : nullptr;
      n.M = M, n.L = s.g.L, n.D = s.D, n.row0 = int(s.has_cls), n.eps = float(eps);
      ex.run(n);
    }
    if (s.has_cls) ex.run(E::PatchCls<T>{s.cls.data_ptr(), ptr_or_null(s.pos), 1, out_rows, int(B), s.D});
  });
  if (!save) {
    mu1 = at::empty({0}, f32);
    r1 = at::empty({0}, f32);
  }
  return {out, z, mu1, r1, mu2, r2};
}

// How many token splits the dW GEMM takes: about two blocks per SM over its (D/64) x (K/64) tiles.
inline int dw_splits(int64_t M, int64_t D, int64_t K, int num_sms) {
  const int64_t tiles = int64_t(E::cdiv(D, 64)) * E::cdiv(K, 64);
  int64_t s = (2 * int64_t(num_sms) + tiles - 1) / tiles;
  s = std::min<int64_t>(s, (M + 255) / 256);
  return int(std::max<int64_t>(1, std::min<int64_t>(s, 1024)));
}

// Column-sum splits over M rows of width N (a thread per column): about two blocks per SM.
inline int col_splits(int64_t M, int64_t N, int num_sms) {
  const int64_t blocks = E::cdiv(N, E::kThreads);
  int64_t s = (2 * int64_t(num_sms) + blocks - 1) / blocks;
  s = std::min<int64_t>(s, (M + 63) / 64);
  return int(std::max<int64_t>(1, std::min<int64_t>(s, 4096)));
}

// Gradients of (x, weight, bias, pos_embed, cls_token, pre-norm weight and bias, post-norm weight and
// bias); empty where `needs` is false.
template <class Exec>
std::vector<Tensor> patch_embed_backward(Exec& ex, const Tensor& dy, const Tensor& x, const Tensor& weight,
                                         const OptTensor& bias, const OptTensor& pos, const OptTensor& cls,
                                         const OptTensor& pre_w, const OptTensor& pre_b, const OptTensor& post_w,
                                         const OptTensor& post_b, const Tensor& z, const Tensor& mu1,
                                         const Tensor& r1, const Tensor& mu2, const Tensor& r2, int64_t ph, int64_t pw,
                                         const std::string& order, bool pre_norm, bool post_norm,
                                         const c10::List<bool>& needs) {
  const char* op = "patch_embed";
  TORCH_CHECK(needs.size() == 9, "fastvit ", op, " (cuda): needs must have 9 entries, got ", needs.size());
  const bool need_x = needs.get(0), need_w = needs.get(1), need_b = needs.get(2), need_pos = needs.get(3),
             need_cls = needs.get(4), need_pre_w = needs.get(5), need_pre_b = needs.get(6),
             need_post_w = needs.get(7), need_post_b = needs.get(8);
  const PatchSetup s = patch_setup(op, ex, x, weight, bias, pos, cls, pre_w, pre_b, post_w, post_b, ph, pw, order,
                                   pre_norm, post_norm);
  const int64_t B = x.size(0), M = s.g.M, D = s.D, K = s.g.K, L = s.g.L;
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == B && dy.size(1) == s.LT && dy.size(2) == D, "fastvit ", op,
              " (cuda): dy must be (B, L, D) = (", B, ", ", s.LT, ", ", D, "), got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == weight.scalar_type(), "fastvit ", op, " (cuda): dy must have weight's dtype");
  ex.check(op, "dy", dy, x);
  if (pre_norm)
    TORCH_CHECK(mu1.numel() == M && r1.numel() == M && mu1.scalar_type() == at::kFloat && mu1.is_contiguous() &&
                    r1.scalar_type() == at::kFloat && r1.is_contiguous(),
                "fastvit ", op, " (cuda): mu1 and rstd1 must be the forward's fp32 (", M, ",) statistics");
  if (post_norm)
    TORCH_CHECK(mu2.numel() == M && r2.numel() == M && mu2.scalar_type() == at::kFloat && mu2.is_contiguous() &&
                    r2.scalar_type() == at::kFloat && r2.is_contiguous() && z.dim() == 3 && z.size(0) == B &&
                    z.size(1) == L && z.size(2) == D && z.scalar_type() == weight.scalar_type(),
                "fastvit ", op, " (cuda): z, mu2 and rstd2 must be what the forward saved");
  const auto f32 = x.options().dtype(at::kFloat);
  std::vector<Tensor> grads(9);
  for (auto& g : grads) g = none_like(dy);
  const bool pre_b_used = pre_norm && pre_b.has_value();
  const bool need_dbz = need_b || (pre_b_used && (need_w || need_pre_b));
  const bool need_dz = need_x || need_w || need_dbz || need_pre_w || need_post_w || need_post_b;
  const int sms = ex.num_sms();
  by_dtype(op, "weight", weight.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const E::Rows dy_rows{const_cast<void*>(dy.data_ptr()), dy.stride(0), dy.stride(1), dy.stride(2)};
    // 1. sums of dy over the batch: d pos_embed, d cls_token, and (over the patch rows) the bias
    Tensor dysum;
    if (need_pos || need_cls || (!post_norm && need_dbz)) {
      Tensor dsum = alloc(ex, {s.LT, D}, f32);
      ex.run(E::PatchColSum<T>{dy_rows, dsum.data_ptr<float>(), int(B), s.LT, s.D});
      if (need_pos) grads[3] = dsum.reshape(pos->sizes()).to(pos->scalar_type(), false, true);
      if (need_cls) grads[4] = dsum[0].reshape(cls->sizes()).to(cls->scalar_type(), false, true);
      dysum = dsum.narrow(0, int64_t(s.has_cls), L).sum(0);
    }
    // 2. dz: the gradient of the projection's output (dy's patch rows, or through the post-norm)
    E::Tokens dzg{dy.data_ptr(), dy.stride(0), dy.stride(1), dy.stride(2), int(L), int(s.has_cls)};
    Tensor dz, dbz = dysum;
    if (post_norm && need_dz) {
      dz = alloc(ex, {M, D}, weight.options());
      const E::Rows z_rows{const_cast<void*>(z.data_ptr()), z.stride(0), z.stride(1), z.stride(2)};
      E::PatchPostNormBwd<T> k{dy_rows, z_rows, fptr_or_null(s.post_w), mu2.data_ptr<float>(), r2.data_ptr<float>(),
                               dz.data_ptr(), M, int(L), s.D, int(s.has_cls)};
      ex.run(k);
      const int S = col_splits(M, D, sms);
      Tensor part = alloc(ex, {S, 3, D}, f32);
      ex.run(E::PatchPostNormCols<T>{dy_rows, z_rows, mu2.data_ptr<float>(), r2.data_ptr<float>(), dz.data_ptr(),
                                     part.data_ptr<float>(), M, (M + S - 1) / S, int(L), s.D, int(s.has_cls), S});
      const Tensor sums = part.sum(0);
      if (need_post_w) grads[7] = sums[0].to(post_w->scalar_type(), false, true);
      if (need_post_b) grads[8] = sums[1].to(post_b->scalar_type(), false, true);
      dbz = sums[2];
      dzg = {dz.data_ptr(), L * D, D, 1, int(L), 0};
    }
    if (need_b) grads[2] = dbz.to(bias->scalar_type(), false, true);
    // 3. dW = dz^T patches (token splits, fp32 partials) and the pre-norm parameters' gradients
    const bool pre_grads = pre_norm && (need_pre_w || (need_pre_b && pre_b_used));
    if (need_w || pre_grads) {
      const int S = (need_w || need_pre_w) ? dw_splits(M, D, K, sms) : 0;
      Tensor part = S ? alloc(ex, {S, D, K}, f32) : Tensor();
      if (S)
        ex.run(E::PatchDw<T>{s.g, dzg, pre_norm ? mu1.data_ptr<float>() : nullptr,
                             pre_norm ? r1.data_ptr<float>() : nullptr, part.data_ptr<float>(), s.D,
                             (M + S - 1) / S, S});
      Tensor dw = need_w ? alloc(ex, {D, K}, weight.options()) : Tensor();
      Tensor col = pre_grads ? alloc(ex, {int64_t(E::cdiv(D, 64)), 2, K}, f32) : Tensor();
      const Tensor dbz32 = (pre_b_used && dbz.defined()) ? dbz.contiguous() : Tensor();
      E::PatchDwFinish<T> f{};
      f.g = s.g;
      f.w = s.w;
      f.part = S ? part.data_ptr<float>() : nullptr;
      f.dbz = fptr_or_null(dbz32);
      f.pre_w = pre_norm ? fptr_or_null(s.pre_w) : nullptr;
      f.pre_b = pre_b_used ? fptr_or_null(s.pre_b) : nullptr;
      f.dw = need_w ? dw.data_ptr() : nullptr;
      f.col = pre_grads ? col.data_ptr<float>() : nullptr;
      f.D = s.D, f.S = S;
      ex.run(f);
      if (need_w) grads[1] = dw.reshape(weight.sizes());
      if (pre_grads) {
        const Tensor cols = col.sum(0);
        if (need_pre_w) grads[5] = cols[0].to(pre_w->scalar_type(), false, true);
        if (need_pre_b && pre_b_used) grads[6] = cols[1].to(pre_b->scalar_type(), false, true);
      }
    }
    // 4. dx = dz W, scattered into the image (through the pre-norm's row backward when there is one)
    if (need_x) {
      Tensor dx = dx_like(ex, x);
      Tensor scratch = pre_norm ? alloc(ex, {M, K}, f32) : Tensor();
      E::PatchDx<T> k{};
      k.g = s.g;
      k.dz = dzg;
      k.w = s.w;
      k.D = s.D;
      k.dx = dx.data_ptr();
      k.sb = dx.stride(0), k.sc = dx.stride(1), k.sh = dx.stride(2), k.sw = dx.stride(3);
      k.scratch = pre_norm ? scratch.data_ptr<float>() : nullptr;
      ex.run(k);
      if (pre_norm)
        ex.run(E::PatchPreNormDx<T>{s.g, scratch.data_ptr<float>(), fptr_or_null(s.pre_w), mu1.data_ptr<float>(),
                                    r1.data_ptr<float>(), dx.data_ptr(), dx.stride(0), dx.stride(1), dx.stride(2),
                                    dx.stride(3)});
      grads[0] = dx;
    }
  });
  return grads;
}

// ---------------------------------------------------------------------------------------------- soft split

template <class Exec>
E::Windows windows(const char* op, Exec& ex, const Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                   int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 4, "fastvit ", op, " (cuda): x must be a 4-D feature map (B, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && ph >= 0 && pw >= 0, "fastvit ", op,
              " (cuda): kernel_size and stride must be positive and padding non-negative");
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(H + 2 * ph >= kh && W + 2 * pw >= kw, "fastvit ", op, " (cuda): kernel_size (", kh, ", ", kw,
              ") is larger than x's padded size (", H + 2 * ph, ", ", W + 2 * pw, ")");
  const int64_t OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1, F = C * kh * kw;
  TORCH_CHECK(F < (int64_t(1) << 31) && OH * OW < (int64_t(1) << 31) && H < (int64_t(1) << 31) &&
                  W < (int64_t(1) << 31),
              "fastvit ", op, " (cuda): sizes beyond the kernels' 32-bit indices");
  ex.check(op, "x", x, x);
  return {image(x), int(kh), int(kw), int(sh), int(sw), int(ph), int(pw), int(OH), int(OW), int(OH * OW), int(F),
          B * OH * OW};
}

inline unsigned stride_blocks(int64_t n, int num_sms) {
  return std::max<unsigned>(1, std::min<unsigned>(E::cdiv(n, E::kThreads), unsigned(8 * num_sms)));
}

// soft_split_layer_norm writes each token's row this many elements apart (16-byte aligned rows for the
// Performer after it), as the Triton kernel does; the result is a (B, L, F) view of those rows.
constexpr int64_t kRowAlign = 16;

template <class Exec>
Tensor soft_split_forward(Exec& ex, const Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw) {
  const E::Windows g = windows("soft_split", ex, x, kh, kw, sh, sw, ph, pw);
  Tensor out = alloc(ex, {x.size(0), g.L, g.F}, x.options());
  by_dtype("soft_split", "x", x.scalar_type(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    ex.run(E::Unfold<T>{g, out.data_ptr(), g.F, stride_blocks(g.M * g.F, ex.num_sms())});
  });
  return out;
}

// f(Tag<T>{}, Tag<OT>{}) for x's dtype T and the LayerNorm's output dtype OT: OT = T, or float16 /
// bfloat16 from a float32 x (autocast).
template <class F>
void by_dtypes(const char* op, at::ScalarType x, at::ScalarType out, F&& f) {
  if (x == out) return by_dtype(op, "x", x, [&](auto tag) { f(tag, tag); });
  TORCH_CHECK(x == at::kFloat && (out == at::kHalf || out == at::kBFloat16), "fastvit ", op,
              " (cuda): the output dtype must be x's or, for a float32 x, float16 or bfloat16; got x ", x, " and ",
              out);
  if (out == at::kHalf)
    f(Tag<float>{}, Tag<__half>{});
  else
    f(Tag<float>{}, Tag<__nv_bfloat16>{});
}

// A (B, L, N) tensor's token rows.
inline E::Tokens tokens(const Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2), int(t.size(1)), 0};
}

template <class Exec>
Tensor fold(Exec& ex, const char* op, const Tensor& dy, const Tensor& x, const E::Windows& g, const float* w,
            const float* mean, const float* rstd, const float* c1, const float* c2) {
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == x.size(0) && dy.size(1) == g.L && dy.size(2) == g.F, "fastvit ", op,
              " (cuda): dy must be (B, L, F) = (", x.size(0), ", ", g.L, ", ", g.F, "), got ", dy.sizes());
  ex.check(op, "dy", dy, x);
  Tensor dx = dx_like(ex, x);
  const bool cl = x.stride(1) == 1 && x.size(1) > 1 && !x.is_contiguous();
  by_dtypes(op, x.scalar_type(), dy.scalar_type(), [&](auto tx, auto to) {
    using T = typename decltype(tx)::type;
    using OT = typename decltype(to)::type;
    ex.run(E::Fold<T, OT>{g, tokens(dy), w, mean, rstd, c1, c2, dx.data_ptr(), dx.stride(0), dx.stride(1),
                          dx.stride(2), dx.stride(3), cl, stride_blocks(x.numel(), ex.num_sms())});
  });
  return dx;
}

template <class Exec>
Tensor soft_split_backward(Exec& ex, const Tensor& dy, const Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw) {
  const E::Windows g = windows("soft_split", ex, x, kh, kw, sh, sw, ph, pw);
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "fastvit soft_split (cuda): dy must have x's dtype");
  return fold(ex, "soft_split", dy, x, g, nullptr, nullptr, nullptr, nullptr, nullptr);
}

// (out, mean, rstd): the normalised soft split in out_dtype (a view of 16-element aligned rows) and
// each token's fp32 statistics (empty unless `save`).
template <class Exec>
std::tuple<Tensor, Tensor, Tensor> ssln_forward(Exec& ex, const Tensor& x, const OptTensor& weight,
                                                const OptTensor& bias, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                                int64_t ph, int64_t pw, double eps, at::ScalarType out_dtype,
                                                bool save) {
  const char* op = "soft_split_layer_norm";
  const E::Windows g = windows(op, ex, x, kh, kw, sh, sw, ph, pw);
  check_device(op, ex, x, {{"weight", &weight}, {"bias", &bias}});
  for (const auto& [arg, t] : {std::pair<const char*, const OptTensor*>{"weight", &weight}, {"bias", &bias}})
    TORCH_CHECK(!t->has_value() || ((*t)->dim() == 1 && (*t)->size(0) == g.F), "fastvit ", op, " (cuda): ", arg,
                " must be (", g.F, ",)");
  const Tensor w = param(weight, at::kFloat), b = param(bias, at::kFloat);
  const int64_t so = (g.F + kRowAlign - 1) / kRowAlign * kRowAlign;
  Tensor out = at::empty_strided({x.size(0), g.L, g.F}, {g.L * so, so, 1}, x.options().dtype(out_dtype));
  ex.fresh(out);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor mean = save ? alloc(ex, {g.M}, f32) : at::empty({0}, f32);
  Tensor rstd = save ? alloc(ex, {g.M}, f32) : at::empty({0}, f32);
  by_dtypes(op, x.scalar_type(), out_dtype, [&](auto tx, auto to) {
    using T = typename decltype(tx)::type;
    using OT = typename decltype(to)::type;
    ex.run(E::UnfoldNorm<T, OT>{g, fptr_or_null(w), fptr_or_null(b), out.data_ptr(), so,
                                save ? mean.data_ptr<float>() : nullptr, save ? rstd.data_ptr<float>() : nullptr,
                                float(eps)});
  });
  return {out, mean, rstd};
}

template <class Exec>
std::tuple<Tensor, Tensor, Tensor> ssln_backward(Exec& ex, const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                 const OptTensor& bias, const Tensor& mean, const Tensor& rstd,
                                                 int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                                 int64_t pw, const c10::List<bool>& needs) {
  const char* op = "soft_split_layer_norm";
  TORCH_CHECK(needs.size() == 3, "fastvit ", op, " (cuda): needs must have 3 entries, got ", needs.size());
  const E::Windows g = windows(op, ex, x, kh, kw, sh, sw, ph, pw);
  check_device(op, ex, x, {{"weight", &weight}, {"bias", &bias}});
  TORCH_CHECK(mean.numel() == g.M && rstd.numel() == g.M && mean.scalar_type() == at::kFloat &&
                  rstd.scalar_type() == at::kFloat && mean.is_contiguous() && rstd.is_contiguous(),
              "fastvit ", op, " (cuda): mean and rstd must be the forward's fp32 (", g.M, ",) statistics");
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == x.size(0) && dy.size(1) == g.L && dy.size(2) == g.F, "fastvit ", op,
              " (cuda): dy must be (B, L, F) = (", x.size(0), ", ", g.L, ", ", g.F, "), got ", dy.sizes());
  ex.check(op, "dy", dy, x);
  const Tensor w = param(weight, at::kFloat);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor dx = none_like(x), dw = none_like(x), db = none_like(x);
  if (needs.get(1) || needs.get(2)) {
    const int S = col_splits(g.M, g.F, ex.num_sms());
    Tensor part = alloc(ex, {S, 2, g.F}, f32);
    by_dtypes(op, x.scalar_type(), dy.scalar_type(), [&](auto tx, auto to) {
      using T = typename decltype(tx)::type;
      using OT = typename decltype(to)::type;
      ex.run(E::UnfoldNormCols<T, OT>{g, tokens(dy), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                      part.data_ptr<float>(), (g.M + S - 1) / S, S});
    });
    const Tensor sums = part.sum(0);
    if (needs.get(1)) dw = sums[0].to(weight->scalar_type(), false, true);
    if (needs.get(2)) db = sums[1].to(bias->scalar_type(), false, true);
  }
  if (needs.get(0)) {
    Tensor c1 = alloc(ex, {g.M}, f32), c2 = alloc(ex, {g.M}, f32);
    by_dtypes(op, x.scalar_type(), dy.scalar_type(), [&](auto tx, auto to) {
      using T = typename decltype(tx)::type;
      using OT = typename decltype(to)::type;
      ex.run(E::UnfoldNormRows<T, OT>{g, tokens(dy), fptr_or_null(w), mean.data_ptr<float>(),
                                      rstd.data_ptr<float>(), c1.data_ptr<float>(), c2.data_ptr<float>()});
    });
    dx = fold(ex, op, dy, x, g, fptr_or_null(w), mean.data_ptr<float>(), rstd.data_ptr<float>(), c1.data_ptr<float>(),
              c2.data_ptr<float>());
  }
  return {dx, dw, db};
}

// ------------------------------------------------------------------------------ the nine ops' bodies

// The ops' kernels on executor Exec, registered under the CUDA ops' names for Exec's dispatch key.
template <class Exec>
struct Ops {
  using Opt = const OptTensor&;
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_fwd(
      const Tensor& x, const Tensor& weight, Opt bias, Opt pos, Opt cls, Opt pre_w, Opt pre_b, Opt post_w,
      Opt post_b, int64_t ph, int64_t pw, c10::string_view order, bool pre_norm, bool post_norm, double eps) {
    Exec ex;
    const auto guard = ex.guard(x);
    return patch_embed_forward(ex, x, weight, bias, pos, cls, pre_w, pre_b, post_w, post_b, ph, pw,
                               std::string(order), pre_norm, post_norm, eps, true);
  }
  static Tensor patch_embed_infer(const Tensor& x, const Tensor& weight, Opt bias, Opt pos, Opt cls, Opt pre_w,
                                  Opt pre_b, Opt post_w, Opt post_b, int64_t ph, int64_t pw, c10::string_view order,
                                  bool pre_norm, bool post_norm, double eps) {
    Exec ex;
    const auto guard = ex.guard(x);
    return std::get<0>(patch_embed_forward(ex, x, weight, bias, pos, cls, pre_w, pre_b, post_w, post_b, ph, pw,
                                           std::string(order), pre_norm, post_norm, eps, false));
  }
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_bwd(
      const Tensor& dy, const Tensor& x, const Tensor& weight, Opt bias, Opt pos, Opt cls, Opt pre_w, Opt pre_b,
      Opt post_w, Opt post_b, const Tensor& z, const Tensor& mu1, const Tensor& r1, const Tensor& mu2,
      const Tensor& r2, int64_t ph, int64_t pw, c10::string_view order, bool pre_norm, bool post_norm,
      const c10::List<bool>& needs) {
    Exec ex;
    const auto guard = ex.guard(x);
    const auto g = patch_embed_backward(ex, dy, x, weight, bias, pos, cls, pre_w, pre_b, post_w, post_b, z, mu1, r1,
                                        mu2, r2, ph, pw, std::string(order), pre_norm, post_norm, needs);
    return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]};
  }
  static Tensor soft_split_fwd(const Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                               int64_t pw) {
    Exec ex;
    const auto guard = ex.guard(x);
    return soft_split_forward(ex, x, kh, kw, sh, sw, ph, pw);
  }
  static Tensor soft_split_bwd(const Tensor& dy, const Tensor& x, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                               int64_t ph, int64_t pw) {
    Exec ex;
    const auto guard = ex.guard(x);
    return soft_split_backward(ex, dy, x, kh, kw, sh, sw, ph, pw);
  }
  static std::tuple<Tensor, Tensor, Tensor> ssln_fwd(const Tensor& x, Opt weight, Opt bias, int64_t kh, int64_t kw,
                                                     int64_t sh, int64_t sw, int64_t ph, int64_t pw, double eps,
                                                     at::ScalarType out_dtype) {
    Exec ex;
    const auto guard = ex.guard(x);
    return ssln_forward(ex, x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype, true);
  }
  static Tensor ssln_infer(const Tensor& x, Opt weight, Opt bias, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           int64_t ph, int64_t pw, double eps, at::ScalarType out_dtype) {
    Exec ex;
    const auto guard = ex.guard(x);
    return std::get<0>(ssln_forward(ex, x, weight, bias, kh, kw, sh, sw, ph, pw, eps, out_dtype, false));
  }
  static std::tuple<Tensor, Tensor, Tensor> ssln_bwd(const Tensor& dy, const Tensor& x, Opt weight, Opt bias,
                                                     const Tensor& mean, const Tensor& rstd, int64_t kh, int64_t kw,
                                                     int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                                                     const c10::List<bool>& needs) {
    Exec ex;
    const auto guard = ex.guard(x);
    return ssln_backward(ex, dy, x, weight, bias, mean, rstd, kh, kw, sh, sw, ph, pw, needs);
  }
};

// The op definitions: exactly the Triton ops' schemas (kernels/embed.py; a test compares them).
inline void define_ops(torch::Library& m) {
  const std::string inputs =
      "Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, Tensor? pre_weight, "
      "Tensor? pre_bias, Tensor? post_weight, Tensor? post_bias, SymInt patch_h, SymInt patch_w, str patch_order, "
      "bool pre_norm, bool post_norm";
  m.def(("patch_embed_cuda_fwd(" + inputs + ", float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)").c_str());
  m.def(("patch_embed_cuda_infer(" + inputs + ", float eps) -> Tensor").c_str());
  m.def(
      "patch_embed_cuda_bwd(Tensor dy, Tensor x, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? cls_token, "
      "Tensor? pre_weight, Tensor? pre_bias, Tensor? post_weight, Tensor? post_bias, Tensor z, Tensor mu1, "
      "Tensor rstd1, Tensor mu2, Tensor rstd2, SymInt patch_h, SymInt patch_w, str patch_order, bool pre_norm, "
      "bool post_norm, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  const std::string geometry = "SymInt kh, SymInt kw, SymInt sh, SymInt sw, SymInt ph, SymInt pw";
  m.def(("soft_split_cuda_fwd(Tensor x, " + geometry + ") -> Tensor").c_str());
  m.def(("soft_split_cuda_infer(Tensor x, " + geometry + ") -> Tensor").c_str());
  m.def(("soft_split_cuda_bwd(Tensor dy, Tensor x, " + geometry + ") -> Tensor").c_str());
  const std::string ln = "Tensor x, Tensor? weight, Tensor? bias, " + geometry + ", float eps, ScalarType out_dtype";
  m.def(("soft_split_layer_norm_cuda_fwd(" + ln + ") -> (Tensor, Tensor, Tensor)").c_str());
  m.def(("soft_split_layer_norm_cuda_infer(" + ln + ") -> Tensor").c_str());
  m.def(("soft_split_layer_norm_cuda_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor rstd, " + geometry + ", bool[] needs) -> (Tensor, Tensor, Tensor)").c_str());
}

template <class Exec>
void register_impls(torch::Library& m) {
  m.impl("patch_embed_cuda_fwd", &Ops<Exec>::patch_embed_fwd);
  m.impl("patch_embed_cuda_infer", &Ops<Exec>::patch_embed_infer);
  m.impl("patch_embed_cuda_bwd", &Ops<Exec>::patch_embed_bwd);
  m.impl("soft_split_cuda_fwd", &Ops<Exec>::soft_split_fwd);
  m.impl("soft_split_cuda_infer", &Ops<Exec>::soft_split_fwd);
  m.impl("soft_split_cuda_bwd", &Ops<Exec>::soft_split_bwd);
  m.impl("soft_split_layer_norm_cuda_fwd", &Ops<Exec>::ssln_fwd);
  m.impl("soft_split_layer_norm_cuda_infer", &Ops<Exec>::ssln_infer);
  m.impl("soft_split_layer_norm_cuda_bwd", &Ops<Exec>::ssln_bwd);
}

}  // namespace embed_ops
}  // namespace fastvit
