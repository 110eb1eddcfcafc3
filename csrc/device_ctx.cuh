// The CUDA executor context the block bodies (attention_kernel.h, embed_kernel.h) run on: one CUDA
// thread per body thread, mma.sync tensor-core instructions (sm_80 and later). The CPU warp emulator
// (emulate.h) provides the same interface on the host.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <type_traits>

#include "kernel_common.h"

namespace fastvit {

struct DeviceCtx {
  unsigned char* s;
  __device__ __forceinline__ int tid() const { return threadIdx.x; }
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ float shfl_xor(float v, int m) const { return __shfl_xor_sync(0xffffffffu, v, m); }
  __device__ __forceinline__ unsigned char* smem() const { return s; }

  // r[i] = this lane's two elements of 8 x 8 matrix i of 16-bit values, whose rows start at the shared
  // addresses lanes 8i .. 8i + 7 pass as `row` (16-byte aligned): (row lane / 4, columns 2 (lane % 4) + 0, 1);
  // with kTrans of the matrix's transpose. One ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16.
  template <bool kTrans>
  __device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (kTrans)
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
    else
      asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                   : "r"(a));
#else
    __trap();
#endif
  }

  // d += A B, one mma.sync.m16n8k16.row.col with fp32 accumulation (fragments as in attention_kernel.h).
  template <class T>
  __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) const {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same_v<T, __half>) {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
      asm volatile(
          "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};\n"
          : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
          : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#else
    __trap();  // built for an arch without mma.sync m16n8k16: the launchers refuse it first
#endif
  }
};

}  // namespace fastvit

namespace fastvit {

// One CUDA block per block body of a kernel object K (embed_kernel.h's form: K::kThreads, k.grid(),
// k.smem_bytes(), k(cx, blockIdx.x, blockIdx.y, blockIdx.z)).
template <class K>
__global__ void __launch_bounds__(K::kThreads) run_kernel(const K k) {
  extern __shared__ __align__(16) unsigned char smem[];
  DeviceCtx cx{smem};
  k(cx, blockIdx.x, blockIdx.y, blockIdx.z);
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device: above 48 KiB that
// needs cudaFuncSetAttribute, called once per (kernel, device) and size increase, not at every launch.
template <auto kernel>
cudaError_t allow_smem(int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  constexpr int kDevices = 64;
  static std::atomic<int> granted[kDevices] = {};  // per kernel: the largest size set on each device
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev < kDevices && granted[dev].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && dev < kDevices) {
    int seen = granted[dev].load(std::memory_order_relaxed);
    while (seen < bytes && !granted[dev].compare_exchange_weak(seen, bytes, std::memory_order_relaxed)) {
    }
  }
  return err;
}

// Launches k on stream (nothing for an empty grid), opting in to more than 48 KiB of shared memory
// when the body asks for it.
template <class K>
cudaError_t launch_kernel(const K& k, cudaStream_t stream) {
  const auto g = k.grid();
  if (g.x == 0 || g.y == 0 || g.z == 0) return cudaSuccess;
  const int bytes = k.smem_bytes();
  const cudaError_t err = allow_smem<run_kernel<K>>(bytes);
  if (err != cudaSuccess) return err;
  run_kernel<K><<<dim3(g.x, g.y, g.z), K::kThreads, bytes, stream>>>(k);
  return cudaGetLastError();
}

}  // namespace fastvit
