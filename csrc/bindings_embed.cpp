// Embed family: defines fastvit::patch_embed_cuda_*, soft_split_cuda_* and soft_split_layer_norm_cuda_*
// (the Triton ops' schemas) and registers them on the CUDA launchers of embed.cu and embed_split.cu; the
// tensor-side work is embed_ops.h's, shared with the CPU emulator.
#include <ATen/cuda/CUDAContext.h>
#include <torch/library.h>

#include <type_traits>

#include "embed_ops.h"

namespace {

namespace E = fastvit::embed;
namespace O = fastvit::embed_ops;
using at::Tensor;

struct CudaExec {
  at::OptionalDeviceGuard guard(const Tensor& t) const { return at::OptionalDeviceGuard(at::device_of(t)); }
  int num_sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  void check(const char* op, const char* arg, const Tensor& t, const Tensor& like) const {
    TORCH_CHECK(t.is_cuda(), "fastvit ", op, " (cuda): ", arg, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == like.device(), "fastvit ", op, " (cuda): ", arg, " is on ", t.device(), " but x is on ",
                like.device());
  }

  void fresh(const Tensor&) const {}

  template <class K>
  void run(const K& k) const {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(prop->major >= 8, "fastvit embed (cuda): needs a GPU of compute capability 8.0 or later, got ",
                prop->major, ".", prop->minor);
    const cudaError_t err = E::launch(k, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastvit embed (cuda): kernel launch failed: ", cudaGetErrorString(err));
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvit, m) { O::define_ops(m); }

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) { O::register_impls<CudaExec>(m); }
