// Attention family: registers fastvit::attention_cuda_{fwd,infer,bwd} and
// fastvit::attention_qkvpacked_cuda_{fwd,infer,bwd} (the Triton ops' schemas) on the CUDA launchers of
// attention.cu; the tensor-side work is attention_ops.h's, shared with the CPU emulator.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <string>

#include "attention_ops.h"
#include "cuda_exec.h"

namespace {

namespace A = fastvit::attention;
namespace O = fastvit::attention_ops;
using at::Tensor;

struct CudaExec : fastvit::CudaExec {
  int smem_per_sm() const { return int(at::cuda::getCurrentDeviceProperties()->sharedMemPerMultiprocessor); }

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

  bool sm90_backward(const A::BwdParams& p) const { return A::sm90::serves_backward(p); }

  void backward(A::DType t, const A::BwdParams& p) const {
    check_arch();
    ok("attention", A::backward(t, p, at::cuda::getCurrentCUDAStream()));
  }
};

// Which kernel serves (q, k, v) on the current device, "sm90_tma_wgmma" or "sm80_mma_sync": the forward's,
// or with do the backward's.
std::string kernel_for(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& dout) {
  CudaExec ex;
  const O::Shape s = O::check_qkv("attention_cuda_kernel", ex, q, k, v);
  const auto guard = ex.guard(q);
  bool sm90 = false;
  if (dout.has_value()) {
    TORCH_CHECK(dout->sizes() == q.sizes(), "fastvit attention_cuda_kernel: do must have q's shape ", q.sizes(),
                ", got ", dout->sizes());
    ex.check("attention_cuda_kernel", "do", *dout, q);
    A::BwdParams p{};
    p.q = O::operand(q);
    p.k = O::operand(k);
    p.v = O::operand(v);
    p.dout = O::operand(*dout);
    p.B = int(s.B), p.H = int(s.H), p.Nq = int(s.Nq), p.Nk = int(s.Nk), p.D = int(s.D);
    sm90 = A::sm90::serves_backward(p);
  } else {
    A::FwdParams p{};
    p.q = O::operand(q);
    p.k = O::operand(k);
    p.v = O::operand(v);
    p.B = int(s.B), p.H = int(s.H), p.Nq = int(s.Nq), p.Nk = int(s.Nk), p.D = int(s.D);
    sm90 = A::sm90::serves(p);
  }
  return sm90 ? "sm90_tma_wgmma" : "sm80_mma_sync";
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
  m.def("attention_cuda_kernel(Tensor q, Tensor k, Tensor v, Tensor? do) -> str");
}

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) {
  O::register_impls<CudaExec>(m);
  m.impl("attention_cuda_kernel", &kernel_for);
}
