// The CUDA executor of the ops' tensor-side code (attention_ops.h, embed_ops.h, performer_ops.h): device
// guard, SM count, placement checks, and run(k), which launches a kernel object of embed_kernel.h's form on
// the current stream through its family's launch() (found by argument-dependent lookup: embed::launch,
// performer::launch). The attention bindings extend it with their two launchers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>

namespace fastvit {

struct CudaExec {
  at::OptionalDeviceGuard guard(const at::Tensor& t) const { return at::OptionalDeviceGuard(at::device_of(t)); }
  int num_sms() const { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

  void check(const char* op, const char* arg, const at::Tensor& t, const at::Tensor& like) const {
    TORCH_CHECK(t.is_cuda(), "fastvit ", op, " (cuda): ", arg, " must be a CUDA tensor, got one on ", t.device());
    TORCH_CHECK(t.device() == like.device(), "fastvit ", op, " (cuda): ", arg, " is on ", t.device(),
                ", the other inputs on ", like.device());
  }

  void fresh(const at::Tensor&) const {}

  template <class K>
  void run(const K& k) const {
    const auto* prop = at::cuda::getCurrentDeviceProperties();
    TORCH_CHECK(prop->major >= 8, "fastvit (cuda): the kernels need a GPU of compute capability 8.0 or later, got ",
                prop->major, ".", prop->minor);
    TORCH_CHECK(size_t(k.smem_bytes()) <= prop->sharedMemPerBlockOptin, "fastvit (cuda): a kernel needs ",
                k.smem_bytes(), " bytes of shared memory, this GPU has ", prop->sharedMemPerBlockOptin, " per block");
    const cudaError_t err = launch(k, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "fastvit (cuda): kernel launch failed: ", cudaGetErrorString(err));
  }
};

}  // namespace fastvit
