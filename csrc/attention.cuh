// Attention family: the torch-free CUDA interface (flash attention forward and backward).
//
// The parameters (csrc/attention_kernel.h: FwdParams, BwdParams) carry raw pointers and element strides,
// so (B, H, N, D) views and the packed (B, N, 3 * H * D) projection are read in place; bindings_attention.cpp
// fills them from tensors. Each launcher picks its kernels from the head dim and returns cudaSuccess or
// the first CUDA error.
#pragma once

#include <cuda_runtime.h>

#include "attention_kernel.h"

namespace fastvit {
namespace attention {

enum class DType : int { f16 = 1, bf16 = 2 };

// f(Instance<T, DP>{}) for the element type and padded head dim that serve (t, D): the launchers'
// dispatch to their four instantiations.
template <class T, int DP>
struct Instance {
  using type = T;
  static constexpr int dp = DP;
};
template <class F>
cudaError_t dispatch(DType t, int D, F&& f) {
  const bool d64 = padded_head_dim(D) == 64;
  if (t == DType::f16) return d64 ? f(Instance<__half, 64>{}) : f(Instance<__half, 128>{});
  return d64 ? f(Instance<__nv_bfloat16, 64>{}) : f(Instance<__nv_bfloat16, 128>{});
}

// o (and lse unless p.lse is nullptr) for every (query, b, h). Nq, Nk, B, H >= 1.
cudaError_t forward(DType t, const FwdParams& p, cudaStream_t stream);

// dq, dk, dv: delta = rowsum(dO * O), then the key-block kernel, then (p.splits > 1) the split
// reduction. p.splits, p.blocks_per_split and the workspaces come from plan_bwd.
cudaError_t backward(DType t, const BwdParams& p, cudaStream_t stream);

// The Hopper forward (attention_sm90.cu): TMA, wgmma, warp specialisation. serves(p) says whether it
// takes p on the current device (see that file); forward() then runs it instead of the mma.sync one.
// serves_backward(p) likewise for the backward, whose plan_bwd then takes sm90 = true; backward()
// launches its key-block kernel (the delta and split-reduction kernels are attention.cu's).
namespace sm90 {
bool serves(const FwdParams& p);
cudaError_t forward(DType t, const FwdParams& p, cudaStream_t stream);
bool serves_backward(const BwdParams& p);
cudaError_t backward(DType t, const BwdParams& p, cudaStream_t stream);
}  // namespace sm90

}  // namespace attention
}  // namespace fastvit
