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

// The head dims the kernels take: 1 .. kMaxHeadDim (padded inside to 64 or 128).
constexpr int kMaxHeadDim = 128;

// The padded head dim a kernel instantiation serves D with (64 or 128); 0 when D is not served.
inline int padded_head_dim(int D) { return D < 1 ? 0 : D <= 64 ? 64 : D <= kMaxHeadDim ? 128 : 0; }

// o (and lse unless p.lse is nullptr) for every (query, b, h). Nq, Nk, B, H >= 1.
cudaError_t forward(DType t, const FwdParams& p, cudaStream_t stream);

// dq, dk, dv: delta = rowsum(dO * O), then the key-block kernel, then (p.splits > 1) the split
// reduction. p.splits, p.blocks_per_split and the workspaces come from plan_bwd.
cudaError_t backward(DType t, const BwdParams& p, cudaStream_t stream);

}  // namespace attention
}  // namespace fastvit
