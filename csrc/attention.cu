// Attention family: CUDA kernels and launchers around the block bodies of attention_kernel.h, which
// run here with one CUDA thread per body thread and mma.sync tensor-core instructions (sm_80 and
// later), and the dispatch to the Hopper forward of attention_sm90.cu.
//
// Kernel table, per (head dim, sequence length, dtype, arch); fp16 and bf16 share every entry, and the
// head dim is padded to DP = 64 or 128:
//   forward, sm_90 (TMA-readable q, k, v)  128 x 128 tiles, 2-stage K / V ring, 1 producer warp + 2 consumer
//                                          warpgroups (attention_sm90.cu)
//   forward, otherwise                     64 x 64 tiles, 4 warps, next K / V tile prefetched into registers
//   backward, sm_90 (TMA-readable q, k, v, do)  128 keys x 64 queries per step, 1 producer warp (K / V per key
//                                          block, 2-stage Q / dO ring) + 2 consumer warpgroups of 64 keys
//   backward, otherwise                    64 x 64 tiles, 4 warps
// and in both backwards the key blocks split over CTAs per plan_bwd.
// How they were chosen, none of them on a GPU yet (none was at hand, see the README): the mma.sync tiles
// by the register budget of the backward at D = 128 (fp32 dK, dV and dQ fragments, 64 values each, in
// 255 registers per thread) and a 16-row warp slice per mma.sync; the sm_90 forward by FlashAttention-3's
// published tile sizes for head dims 64 and 128, cut to 128 keys per tile: with its intra-warpgroup
// overlap S (64 fp32 per thread), the previous tile's P (32) and O (up to 64) are live together within
// the consumers' 232 registers (no spill), and two stages of K and V (160 KiB with Q at DP = 128) fit
// the 227 KiB of shared memory; the sm_90
// backward by FlashAttention-3's head-dim-128 backward tiles (64 queries x 128 keys, two consumer
// warpgroups), whose dK, dV, S^T, dP^T and dQ fragments (64 + 64 + 32 + 32 + 32 fp32 per thread at
// DP = 128) fill the 240 registers setmaxnreg gives (ptxas still spills ~640 bytes there; none at 64).
// The sequence length does not enter yet: at N = 197 a 128-row tile computes 256 rows (77 % useful).
#include <type_traits>

#include "attention.cuh"
#include "device_ctx.cuh"

namespace fastvit {
namespace attention {
namespace {

template <class T, int DP>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceCtx cx{smem};
  fwd_block<T, DP>(cx, p, blockIdx.x, blockIdx.y, blockIdx.z);
}

template <class T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const BwdParams p) {
  DeviceCtx cx{nullptr};
  delta_block<T>(cx, p, blockIdx.x);
}

template <class T, int DP>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceCtx cx{smem};
  bwd_block<T, DP>(cx, p, blockIdx.x, blockIdx.y, blockIdx.z);
}

template <class T>
__global__ void __launch_bounds__(kThreads) dq_reduce_kernel(const BwdParams p) {
  DeviceCtx cx{nullptr};
  dq_reduce_block<T>(cx, p, blockIdx.x);
}

unsigned blocks(int64_t n, int64_t per) { return unsigned((n + per - 1) / per); }

template <class T, int DP>
cudaError_t forward_t(const FwdParams& p, cudaStream_t stream) {
  constexpr int bytes = fwd_smem_bytes<DP>();
  cudaError_t err = allow_smem<fwd_kernel<T, DP>>(bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(blocks(p.Nq, kBlockM), p.H, p.B);
  fwd_kernel<T, DP><<<grid, kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

template <class T, int DP>
cudaError_t backward_t(const BwdParams& p, cudaStream_t stream) {
  delta_kernel<T><<<blocks(int64_t(p.B) * p.H * p.delta_ld, kWarps), kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if (p.sm90) {
    err = sm90::backward(std::is_same_v<T, __half> ? DType::f16 : DType::bf16, p, stream);
  } else {
    const int bytes = bwd_smem_bytes<DP>(p.dq_smem_rows);
    err = allow_smem<bwd_kernel<T, DP>>(bytes);
    if (err != cudaSuccess) return err;
    bwd_kernel<T, DP><<<dim3(p.splits, p.H, p.B), kThreads, bytes, stream>>>(p);
    err = cudaGetLastError();
  }
  if (err != cudaSuccess || p.splits == 1) return err;
  dq_reduce_kernel<T><<<blocks(int64_t(p.B) * p.H * p.Nq * p.D, kThreads), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t forward(DType t, const FwdParams& p, cudaStream_t stream) {
  if (sm90::serves(p)) return sm90::forward(t, p, stream);
  return dispatch(t, p.D, [&](auto i) { return forward_t<typename decltype(i)::type, decltype(i)::dp>(p, stream); });
}

cudaError_t backward(DType t, const BwdParams& p, cudaStream_t stream) {
  return dispatch(t, p.D, [&](auto i) { return backward_t<typename decltype(i)::type, decltype(i)::dp>(p, stream); });
}

}  // namespace attention
}  // namespace fastvit
