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
