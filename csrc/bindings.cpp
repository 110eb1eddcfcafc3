// The MLP family's torch side (bindings_<family>.cpp for the others; only these files include torch):
// checks tensors, picks the current stream and device, allocates outputs, calls the torch-free
// launchers of csrc/<family>.cu and registers the ops fastvit::<fn>_cuda_{fwd,infer,bwd} (the names of
// fastvit/_library.py; their fake implementations and autograd are registered from Python, in
// fastvit/csrc/<family>.py).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "mlp.cuh"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
namespace mlp = fastvit::mlp;

#define FV_CHECK_CUDA_CALL(name, expr)                                                                          \
  do {                                                                                                        \
    const cudaError_t fv_err = (expr);                                                                        \
    TORCH_CHECK(fv_err == cudaSuccess, "fastvit ", name, " (cuda): kernel launch failed: ", cudaGetErrorString(fv_err)); \
  } while (0)

mlp::DType dtype_of(const char* op, const char* arg, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return mlp::DType::f32;
    case at::kHalf: return mlp::DType::f16;
    case at::kBFloat16: return mlp::DType::bf16;
    default: break;
  }
  TORCH_CHECK(false, "fastvit ", op, " (cuda): ", arg, " must be float32, float16 or bfloat16, got ", t);
  return mlp::DType::f32;
}

void check_cuda(const char* op, const char* arg, const Tensor& t, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "fastvit ", op, " (cuda): ", arg, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == like.device(), "fastvit ", op, " (cuda): ", arg, " is on ", t.device(), " but x is on ",
              like.device());
}

void check_opt(const char* op, const char* arg, const OptTensor& t, const Tensor& like, int64_t size) {
  if (!t.has_value()) return;
  check_cuda(op, arg, *t, like);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == size, "fastvit ", op, " (cuda): ", arg, " must have shape (", size,
              ",), got ", t->sizes());
  dtype_of(op, arg, t->scalar_type());
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t as (rows, C) with unit column stride: a view where the strides allow it, else a contiguous copy.
// GEMM operands (align > 1) also need a 16-byte aligned start and non-overlapping rows whose stride
// is a multiple of `align` elements.
Tensor rows(const Tensor& t, int64_t align = 1) {
  Tensor r = t.reshape({-1, t.size(-1)});
  const int64_t R = r.size(0), C = r.size(1);
  bool ok = C <= 1 || r.stride(1) == 1;
  if (align > 1) ok = ok && aligned16(r) && (R <= 1 || (r.stride(0) % align == 0 && r.stride(0) >= C));
  if (ok) return r;
  r = r.contiguous();  // returns r itself when it is contiguous but starts misaligned: copy then
  if (align > 1 && !aligned16(r)) r = r.clone(at::MemoryFormat::Contiguous);
  return r;
}

// The row stride the launchers get for a (rows, C) matrix with unit column stride.
int64_t ld(const Tensor& r) { return r.size(0) <= 1 ? r.size(1) : r.stride(0); }

// Parameters the LayerNorm kernels read as fp32 (C,) vectors (a C-element copy at most).
Tensor f32_param(const OptTensor& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : Tensor();
}

float* fptr(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

int num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// ---------------------------------------------------------------------------------------------
// layer_norm
// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor> layer_norm_run(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  double eps, at::ScalarType out_dtype, bool stats) {
  const char* op = "layer_norm";
  TORCH_CHECK(x.is_cuda(), "fastvit layer_norm (cuda): x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1, "fastvit layer_norm (cuda): x must have at least one dim");
  const int64_t C = x.size(-1);
  check_opt(op, "weight", weight, x, C);
  check_opt(op, "bias", bias, x, C);
  const mlp::DType xt = dtype_of(op, "x", x.scalar_type());
  const mlp::DType yt = dtype_of(op, "out_dtype", out_dtype);
  TORCH_CHECK(C > 0, "fastvit layer_norm (cuda): x must have at least one feature");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows(x);
  const int64_t M = x2.size(0);
  Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
  Tensor mean, rstd;
  if (stats) {
    mean = at::empty({M}, x.options().dtype(at::kFloat));
    rstd = at::empty({M}, x.options().dtype(at::kFloat));
  }
  if (M > 0 && C > 0) {
    const Tensor w = f32_param(weight), b = f32_param(bias);
    FV_CHECK_CUDA_CALL(op, mlp::layer_norm_fwd(xt, yt, x2.data_ptr(), ld(x2), fptr(w), fptr(b), y.data_ptr(), C,
                                               fptr(mean), fptr(rstd), M, C, static_cast<float>(eps),
                                               at::cuda::getCurrentCUDAStream()));
  }
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd(const Tensor& x, const OptTensor& weight, const OptTensor& bias,
                                                  double eps, at::ScalarType out_dtype) {
  return layer_norm_run(x, weight, bias, eps, out_dtype, true);
}

Tensor layer_norm_infer(const Tensor& x, const OptTensor& weight, const OptTensor& bias, double eps,
                        at::ScalarType out_dtype) {
  return std::get<0>(layer_norm_run(x, weight, bias, eps, out_dtype, false));
}

// dW and dB of a LayerNorm from its incoming gradient g (M, C): column sums of g * xhat and of g,
// as fp32 (C,) vectors.
std::tuple<Tensor, Tensor> norm_param_grads(const Tensor& g, const Tensor& x2, const Tensor& mean, const Tensor& rstd) {
  const int64_t M = x2.size(0), C = x2.size(1);
  const int splits = mlp::column_sum_splits(M, C, num_sms());
  Tensor p0 = at::empty({splits, C}, x2.options().dtype(at::kFloat));
  Tensor p1 = at::empty({splits, C}, x2.options().dtype(at::kFloat));
  FV_CHECK_CUDA_CALL("layer_norm", mlp::column_sums(dtype_of("layer_norm", "dy", g.scalar_type()), g.data_ptr(), ld(g),
                                                    dtype_of("layer_norm", "x", x2.scalar_type()), x2.data_ptr(),
                                                    ld(x2), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                                                    p0.data_ptr<float>(), p1.data_ptr<float>(), M, C, splits,
                                                    at::cuda::getCurrentCUDAStream()));
  return {p0.sum(0), p1.sum(0)};
}

// Column sums of a (M, N) matrix as an fp32 (N,) vector (bias gradients).
Tensor bias_grad(const char* op, const Tensor& g) {
  const int64_t M = g.size(0), N = g.size(1);
  const int splits = mlp::column_sum_splits(M, N, num_sms());
  Tensor p0 = at::empty({splits, N}, g.options().dtype(at::kFloat));
  const mlp::DType t = dtype_of(op, "grad", g.scalar_type());
  FV_CHECK_CUDA_CALL(op, mlp::column_sums(t, g.data_ptr(), ld(g), t, nullptr, 0, nullptr, nullptr, p0.data_ptr<float>(),
                                          nullptr, M, N, splits, at::cuda::getCurrentCUDAStream()));
  return p0.sum(0);
}

Tensor param_grad(const Tensor& g32, const OptTensor& p, const Tensor& like) {
  return p.has_value() ? g32.to(p->scalar_type()) : at::empty({0}, like.options());
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const Tensor& x, const OptTensor& weight,
                                                  const OptTensor& bias, const Tensor& mean, const Tensor& rstd) {
  const char* op = "layer_norm";
  TORCH_CHECK(x.is_cuda(), "fastvit layer_norm (cuda): x must be a CUDA tensor, got one on ", x.device());
  check_cuda(op, "dy", dy, x);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fastvit layer_norm (cuda): dy must have x's shape ", x.sizes(), ", got ",
              dy.sizes());
  const int64_t C = x.size(-1);
  check_opt(op, "weight", weight, x, C);
  check_opt(op, "bias", bias, x, C);
  TORCH_CHECK(C > 0, "fastvit layer_norm (cuda): x must have at least one feature");
  const c10::cuda::CUDAGuard guard(x.device());
  const Tensor x2 = rows(x), dy2 = rows(dy);
  const int64_t M = x2.size(0);
  for (const Tensor* t : {&mean, &rstd}) {
    check_cuda(op, "mean/rstd", *t, x);
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == M && t->is_contiguous(),
                "fastvit layer_norm (cuda): mean and rstd must be contiguous float32 (", M, ",) as the forward saved them");
  }
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dw = at::zeros({C}, x.options().dtype(at::kFloat)), db = at::zeros({C}, x.options().dtype(at::kFloat));
  if (M > 0 && C > 0) {
    const Tensor w = f32_param(weight);
    FV_CHECK_CUDA_CALL(op, mlp::layer_norm_bwd_dx(dtype_of(op, "x", x.scalar_type()),
                                                  dtype_of(op, "dy", dy.scalar_type()), dy2.data_ptr(), ld(dy2),
                                                  x2.data_ptr(), ld(x2), fptr(w), mean.data_ptr<float>(),
                                                  rstd.data_ptr<float>(), dx.data_ptr(), C, M, C,
                                                  at::cuda::getCurrentCUDAStream()));
    if (weight.has_value() || bias.has_value()) std::tie(dw, db) = norm_param_grads(dy2, x2, mean, rstd);
  }
  return {dx, param_grad(dw, weight, x), param_grad(db, bias, x)};
}

// ---------------------------------------------------------------------------------------------
// layernorm_mlp
// ---------------------------------------------------------------------------------------------

struct MlpShapes {
  int64_t M, C, H, C_out;
  mlp::DType gt;
  int64_t align;
};

MlpShapes check_mlp(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& w1,
                    const OptTensor& b1, const Tensor& w2, const OptTensor& b2, const OptTensor& residual) {
  const char* op = "layernorm_mlp";
  TORCH_CHECK(x.is_cuda(), "fastvit layernorm_mlp (cuda): x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() >= 1, "fastvit layernorm_mlp (cuda): x must have at least one dim");
  check_cuda(op, "fc1_weight", w1, x);
  check_cuda(op, "fc2_weight", w2, x);
  const int64_t C = x.size(-1);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == C, "fastvit layernorm_mlp (cuda): fc1_weight must be (hidden, ", C,
              "), got ", w1.sizes());
  const int64_t H = w1.size(0);
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == H, "fastvit layernorm_mlp (cuda): fc2_weight must be (C_out, ", H,
              "), got ", w2.sizes());
  const int64_t C_out = w2.size(0);
  check_opt(op, "ln_weight", ln_weight, x, C);
  check_opt(op, "ln_bias", ln_bias, x, C);
  check_opt(op, "fc1_bias", b1, x, H);
  check_opt(op, "fc2_bias", b2, x, C_out);
  dtype_of(op, "x", x.scalar_type());
  const mlp::DType gt = dtype_of(op, "fc1_weight", w1.scalar_type());
  TORCH_CHECK(w2.scalar_type() == w1.scalar_type(), "fastvit layernorm_mlp (cuda): fc2_weight must have fc1_weight's dtype ",
              w1.scalar_type(), ", got ", w2.scalar_type());
  TORCH_CHECK(C > 0 && H > 0 && C_out > 0, "fastvit layernorm_mlp (cuda): C, hidden and C_out must be positive, got ", C,
              ", ", H, ", ", C_out);
  const int64_t align = mlp::gemm_alignment(gt);
  TORCH_CHECK(C % align == 0 && H % align == 0 && C_out % align == 0, "fastvit layernorm_mlp (cuda): C, hidden and C_out must be multiples of ",
              align, " for ", w1.scalar_type(), " tensor-core GEMMs, got C = ", C, ", hidden = ", H, ", C_out = ",
              C_out);
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  TORCH_CHECK(M < (int64_t{1} << 31) && C < (int64_t{1} << 31) && H < (int64_t{1} << 31) && C_out < (int64_t{1} << 31),
              "fastvit layernorm_mlp (cuda): sizes must be below 2^31, got rows = ", M);
  if (residual.has_value()) {
    check_cuda(op, "residual", *residual, x);
    std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
    out_shape.back() = C_out;
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_shape), "fastvit layernorm_mlp (cuda): residual must have the output's shape ",
                at::IntArrayRef(out_shape), ", got ", residual->sizes());
    dtype_of(op, "residual", residual->scalar_type());
  }
  return {M, C, H, C_out, gt, align};
}

// A bias as the epilogue reads it: contiguous in the GEMM dtype, 16-byte aligned (vector loads).
OptTensor cast_bias(const OptTensor& b, at::ScalarType t) {
  if (!b.has_value()) return b;
  Tensor c = b->to(t).contiguous();
  return aligned16(c) ? c : c.clone(at::MemoryFormat::Contiguous);
}

const void* optr(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }

std::vector<Tensor> mlp_forward(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                                const Tensor& fc1_weight, const OptTensor& fc1_bias, const Tensor& fc2_weight,
                                const OptTensor& fc2_bias, double eps, const OptTensor& residual, mlp::Act act_fn,
                                bool training) {
  const char* op = "layernorm_mlp";
  const MlpShapes s = check_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType gd = fc1_weight.scalar_type();
  const auto opts = x.options();
  const int64_t M = s.M, C = s.C, H = s.H, C_out = s.C_out;

  // The output is in the residual's dtype; one that is neither the GEMM dtype nor fp32 goes through fp32.
  const at::ScalarType res_dtype = residual.has_value() ? residual->scalar_type() : gd;
  const at::ScalarType out_dtype = (res_dtype == gd || res_dtype == at::kFloat) ? res_dtype : at::kFloat;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = C_out;
  Tensor out = at::empty(out_shape, opts.dtype(out_dtype));
  Tensor h = at::empty({M, C}, opts.dtype(gd));
  Tensor act = at::empty({M, H}, opts.dtype(gd));
  Tensor pre = training ? at::empty({M, H}, opts.dtype(gd)) : Tensor();
  Tensor mean = training ? at::empty({M}, opts.dtype(at::kFloat)) : Tensor();
  Tensor rstd = training ? at::empty({M}, opts.dtype(at::kFloat)) : Tensor();

  if (M > 0) {
    const Tensor x2 = rows(x);
    const Tensor lw = f32_param(ln_weight), lb = f32_param(ln_bias);
    FV_CHECK_CUDA_CALL(op, mlp::layer_norm_fwd(dtype_of(op, "x", x.scalar_type()), s.gt, x2.data_ptr(), ld(x2), fptr(lw),
                                               fptr(lb), h.data_ptr(), C, fptr(mean), fptr(rstd), M, C,
                                               static_cast<float>(eps), stream));
    const Tensor w1 = rows(fc1_weight, s.align), w2 = rows(fc2_weight, s.align);
    const OptTensor b1 = cast_bias(fc1_bias, gd), b2 = cast_bias(fc2_bias, gd);
    FV_CHECK_CUDA_CALL(op, mlp::linear_bias_act(s.gt, act_fn, M, H, C, h.data_ptr(), C, w1.data_ptr(), ld(w1),
                                                optr(b1), act.data_ptr(), H, training ? pre.data_ptr() : nullptr, H,
                                                stream));
    Tensor res2;
    if (residual.has_value()) res2 = rows(residual->to(out_dtype), out_dtype == at::kFloat ? 4 : s.align);
    FV_CHECK_CUDA_CALL(op, mlp::linear_bias_residual(s.gt, dtype_of(op, "residual", out_dtype), M, C_out, H,
                                                     act.data_ptr(), H, w2.data_ptr(), ld(w2), optr(b2),
                                                     res2.defined() ? res2.data_ptr() : nullptr,
                                                     res2.defined() ? ld(res2) : C_out, out.data_ptr(), C_out, stream));
  }
  if (out_dtype != res_dtype) out = out.to(res_dtype);
  if (!training) return {out};
  return {out, h, pre, act, mean, rstd};
}

// The ops share the Triton ops' schema: ``activation`` 0 erf GELU, 1 tanh GELU, 2 QuickGELU (mlp::Act).
mlp::Act check_activation(int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation <= 2, "fastvit layernorm_mlp (cuda): activation must be 0 (erf GELU), "
              "1 (tanh GELU) or 2 (QuickGELU), got ", activation);
  return static_cast<mlp::Act>(activation);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_mlp_fwd(
    const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& fc1_weight,
    const OptTensor& fc1_bias, const Tensor& fc2_weight, const OptTensor& fc2_bias, double eps,
    const OptTensor& residual, int64_t activation) {
  const mlp::Act act_fn = check_activation(activation);
  auto r = mlp_forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, act_fn, true);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

Tensor layernorm_mlp_infer(const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias,
                           const Tensor& fc1_weight, const OptTensor& fc1_bias, const Tensor& fc2_weight,
                           const OptTensor& fc2_bias, double eps, const OptTensor& residual,
                           int64_t activation) {
  const mlp::Act act_fn = check_activation(activation);
  return mlp_forward(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, act_fn,
                     false)[0];
}

// Weight gradient out[Mo, No] = a[K, Mo]^T @ b[K, No], accumulated in fp32, in the weight's dtype.
Tensor wgrad(const char* op, mlp::DType gt, const Tensor& a, const Tensor& b, const Tensor& like_weight) {
  const int64_t K = a.size(0), Mo = a.size(1), No = b.size(1);
  if (K == 0) return at::zeros({Mo, No}, like_weight.options());
  Tensor out = at::empty({Mo, No}, like_weight.options().dtype(at::kFloat));
  const int split = mlp::matmul_tn_split_k(gt, Mo, No, K, num_sms());
  const size_t bytes = mlp::matmul_tn_workspace_bytes(gt, Mo, No, K, split);
  Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, a.options().dtype(at::kByte));
  FV_CHECK_CUDA_CALL(op, mlp::matmul_tn(gt, Mo, No, K, a.data_ptr(), ld(a), b.data_ptr(), ld(b), out.data_ptr<float>(),
                                        No, split, bytes ? workspace.data_ptr() : nullptr,
                                        at::cuda::getCurrentCUDAStream()));
  return out.scalar_type() == like_weight.scalar_type() ? out : out.to(like_weight.scalar_type());
}

// A tensor the forward saved: checked against what the backward reads it as.
Tensor saved(const char* name, const Tensor& t, at::IntArrayRef shape, at::ScalarType dtype, const Tensor& x,
             int64_t align) {
  check_cuda("layernorm_mlp", name, t, x);
  TORCH_CHECK(t.sizes() == shape && t.scalar_type() == dtype, "fastvit layernorm_mlp (cuda): ", name, " must be ",
              dtype, " of shape ", shape, " (as the forward saved it), got ", t.scalar_type(), " ", t.sizes());
  return align > 0 ? rows(t, align) : t.contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layernorm_mlp_bwd(
    const Tensor& dy, const Tensor& x, const OptTensor& ln_weight, const OptTensor& ln_bias, const Tensor& fc1_weight,
    const OptTensor& fc1_bias, const Tensor& fc2_weight, const OptTensor& fc2_bias, const Tensor& h, const Tensor& pre,
    const Tensor& act, const Tensor& mean, const Tensor& rstd, int64_t activation) {
  const mlp::Act act_fn = check_activation(activation);
  const char* op = "layernorm_mlp";
  const MlpShapes s = check_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, std::nullopt);
  check_cuda(op, "dy", dy, x);
  const int64_t M = s.M, C = s.C, H = s.H, C_out = s.C_out;
  TORCH_CHECK(dy.numel() == M * C_out && dy.size(-1) == C_out, "fastvit layernorm_mlp (cuda): dy must have the output's shape (..., ",
              C_out, "), got ", dy.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::ScalarType gd = fc1_weight.scalar_type();
  const Tensor h2 = saved("h", h, {M, C}, gd, x, s.align), pre2 = saved("pre", pre, {M, H}, gd, x, s.align),
               act2 = saved("act", act, {M, H}, gd, x, s.align);
  const Tensor mean2 = saved("mean", mean, {M}, at::kFloat, x, 0), rstd2 = saved("rstd", rstd, {M}, at::kFloat, x, 0);
  const Tensor dy2 = rows(dy);  // stride-0 gradients are copied here
  const Tensor dyg = rows(dy2.scalar_type() == gd ? dy2 : dy2.to(gd), s.align);
  const Tensor w1 = rows(fc1_weight, s.align), w2 = rows(fc2_weight, s.align);

  // dA = (dY W2) * act'(pre), with db1's fp32 partials (one row per row tile) from the same epilogue;
  // db2 as the column sums of dY.
  Tensor dA = at::empty({M, H}, x.options().dtype(gd));
  Tensor db1 = at::zeros({H}, x.options().dtype(at::kFloat));
  if (M > 0) {
    Tensor parts = at::empty({mlp::matmul_dact_partial_rows(s.gt, M), H}, x.options().dtype(at::kFloat));
    FV_CHECK_CUDA_CALL(op, mlp::matmul_dact(s.gt, act_fn, M, H, C_out, dyg.data_ptr(), ld(dyg), w2.data_ptr(), ld(w2),
                                            pre2.data_ptr(), ld(pre2), dA.data_ptr(), H, parts.data_ptr<float>(),
                                            stream));
    db1 = parts.sum(0);
  }
  const Tensor db2 = fc2_bias.has_value() ? bias_grad(op, dy2) : Tensor();
  // dW2 = dY^T act, dW1 = dA^T h.
  const Tensor dw2 = wgrad(op, s.gt, dyg, act2, fc2_weight);
  const Tensor dw1 = wgrad(op, s.gt, dA, h2, fc1_weight);
  // dh = dA W1, then LayerNorm's backward.
  Tensor dh = at::empty({M, C}, x.options().dtype(gd));
  Tensor dx = at::empty(x.sizes(), x.options());
  Tensor dlnw = at::zeros({C}, x.options().dtype(at::kFloat)), dlnb = at::zeros({C}, x.options().dtype(at::kFloat));
  if (M > 0) {
    FV_CHECK_CUDA_CALL(op, mlp::matmul_nn(s.gt, M, C, H, dA.data_ptr(), H, w1.data_ptr(), ld(w1), dh.data_ptr(), C,
                                          stream));
    const Tensor x2 = rows(x);
    const Tensor lw = f32_param(ln_weight);
    FV_CHECK_CUDA_CALL(op, mlp::layer_norm_bwd_dx(dtype_of(op, "x", x.scalar_type()), s.gt, dh.data_ptr(), C,
                                                  x2.data_ptr(), ld(x2), fptr(lw), mean2.data_ptr<float>(),
                                                  rstd2.data_ptr<float>(), dx.data_ptr(), C, M, C, stream));
    if (ln_weight.has_value() || ln_bias.has_value()) std::tie(dlnw, dlnb) = norm_param_grads(dh, x2, mean2, rstd2);
  }
  return {dx,
          param_grad(dlnw, ln_weight, x),
          param_grad(dlnb, ln_bias, x),
          dw1,
          param_grad(db1, fc1_bias, x),
          dw2,
          fc2_bias.has_value() ? db2.to(fc2_bias->scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("layer_norm_cuda_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_cuda_infer(Tensor x, Tensor? weight, Tensor? bias, float eps, ScalarType out_dtype) -> Tensor");
  m.def("layer_norm_cuda_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("layernorm_mlp_cuda_fwd(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, float eps, Tensor? residual, int activation=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("layernorm_mlp_cuda_infer(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
        "Tensor fc2_weight, Tensor? fc2_bias, float eps, Tensor? residual, int activation=0) -> Tensor");
  m.def("layernorm_mlp_cuda_bwd(Tensor dy, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, "
        "Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, Tensor h, Tensor pre, Tensor act, Tensor mean, "
        "Tensor rstd, int activation=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("layer_norm_cuda_fwd", &layer_norm_fwd);
  m.impl("layer_norm_cuda_infer", &layer_norm_infer);
  m.impl("layer_norm_cuda_bwd", &layer_norm_bwd);
  m.impl("layernorm_mlp_cuda_fwd", &layernorm_mlp_fwd);
  m.impl("layernorm_mlp_cuda_infer", &layernorm_mlp_infer);
  m.impl("layernorm_mlp_cuda_bwd", &layernorm_mlp_bwd);
}
