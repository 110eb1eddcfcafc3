// Attention family: registers fastvit::attention_cuda_{fwd,infer,bwd} and
// fastvit::attention_qkvpacked_cuda_{fwd,infer,bwd} (the Triton ops' schemas) on the CUDA launchers of
// attention.cu; the tensor-side work is attention_ops.h's, shared with the CPU emulator.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "attention_ops.h"

namespace {

namespace A = fastvit::attention;
namespace O = fastvit::attention_ops;
using at::Tensor;
using O::OptTensor;

struct CudaExec {
  int num_sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
  int smem_per_sm() const { return int(at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor); }

  void check(const char* op, const char* arg, const Tensor& t, const Tensor& like) const {
    TORCH_CHECK(t.is_cuda(), "fastvit ", op, " (cuda): ", arg, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == like.device(), "fastvit ", op, " (cuda): ", arg, " is on ", t.device(), " but q is on ",
                like.device());
  }

  void fresh(const Tensor&) const {}

  static void ok(const char* op, cudaError_t err) {
    TORCH_CHECK(err == cudaSuccess, "fastvit ", op, " (cuda): kernel launch failed: ", cudaGetErrorString(err));
  }

  static void check_arch() {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(prop->major >= 8, "fastvit attention (cuda): needs a GPU of compute capability 8.0 or later (mma.sync ",
                "m16n8k16 with bf16), got ", prop->major, ".", prop->minor);
  }

  void forward(A::DType t, const A::FwdParams& p) const {
    check_arch();
    ok("attention", A::forward(t, p, at::cuda::getCurrentCUDAStream()));
  }

  void backward(A::DType t, const A::BwdParams& p) const {
    check_arch();
    ok("attention", A::backward(t, p, at::cuda::getCurrentCUDAStream()));
  }
};

CudaExec exec;

// The device guard of the op's first tensor (the checks in attention_ops.h name any tensor elsewhere).
at::OptionalDeviceGuard guard_for(const Tensor& t) { return at::OptionalDeviceGuard(at::device_of(t)); }

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask,
                                         double scale) {
  const auto guard = guard_for(q);
  return O::attention_fwd(exec, q, k, v, mask, scale, true);
}

Tensor attention_infer(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& mask, double scale) {
  const auto guard = guard_for(q);
  return std::get<0>(O::attention_fwd(exec, q, k, v, mask, scale, false));
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                                 const Tensor& o, const Tensor& lse, const OptTensor& mask,
                                                 double scale) {
  const auto guard = guard_for(q);
  return O::attention_bwd(exec, dout, q, k, v, o, lse, mask, scale);
}

std::tuple<Tensor, Tensor> qkvpacked_fwd(const Tensor& qkv, int64_t num_heads, const OptTensor& mask, double scale) {
  const auto guard = guard_for(qkv);
  return O::qkvpacked_fwd(exec, qkv, num_heads, mask, scale, true);
}

Tensor qkvpacked_infer(const Tensor& qkv, int64_t num_heads, const OptTensor& mask, double scale) {
  const auto guard = guard_for(qkv);
  return std::get<0>(O::qkvpacked_fwd(exec, qkv, num_heads, mask, scale, false));
}

Tensor qkvpacked_bwd(const Tensor& dout, const Tensor& qkv, const Tensor& o, const Tensor& lse, const OptTensor& mask,
                     int64_t num_heads, double scale) {
  const auto guard = guard_for(qkv);
  return O::qkvpacked_bwd(exec, dout, qkv, o, lse, mask, num_heads, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvit, m) {
  m.def("attention_cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> (Tensor, Tensor)");
  m.def("attention_cuda_infer(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
  m.def("attention_cuda_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, Tensor? mask, float scale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("attention_qkvpacked_cuda_fwd(Tensor qkv, SymInt num_heads, Tensor? mask, float scale) -> (Tensor, Tensor)");
  m.def("attention_qkvpacked_cuda_infer(Tensor qkv, SymInt num_heads, Tensor? mask, float scale) -> Tensor");
  m.def("attention_qkvpacked_cuda_bwd(Tensor do, Tensor qkv, Tensor o, Tensor lse, Tensor? mask, SymInt num_heads, "
        "float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  m.impl("attention_cuda_fwd", &attention_fwd);
  m.impl("attention_cuda_infer", &attention_infer);
  m.impl("attention_cuda_bwd", &attention_bwd);
  m.impl("attention_qkvpacked_cuda_fwd", &qkvpacked_fwd);
  m.impl("attention_qkvpacked_cuda_infer", &qkvpacked_infer);
  m.impl("attention_qkvpacked_cuda_bwd", &qkvpacked_bwd);
}
