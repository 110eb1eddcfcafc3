// MLP family, CUDA: LayerNorm forward/backward and deterministic column sums (torch-free).
//
// LayerNorm runs one warp per row and reads the row three times (sum, centred sum of squares,
// normalise); the second and third reads hit L1/L2, so DRAM sees one read and one write per element.
// Loads and stores are 16-byte vectors when the row strides, C and the pointers allow, else scalar.
// Weight and bias gradients never use float atomics: column_sums writes fp32 partials per row split
// in a fixed order, which the caller sums.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "mlp.cuh"
#include "mlp_split_k.h"

namespace fastvit {
namespace mlp {
namespace {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// VEC consecutive elements, loaded or stored as one access when VEC * sizeof(T) is 16 bytes.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* p, float (&out)[VEC]) {
  Pack<T, VEC> pack = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int i = 0; i < VEC; ++i) out[i] = to_float(pack.v[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* p, const float (&in)[VEC]) {
  Pack<T, VEC> pack;
#pragma unroll
  for (int i = 0; i < VEC; ++i) pack.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pack;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

constexpr int kRowsPerBlock = 8;  // warps per block; one row per warp

template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    ln_fwd_kernel(const Tin* __restrict__ x, int64_t sx, const float* __restrict__ w, const float* __restrict__ b,
                  Tout* __restrict__ y, int64_t sy, float* __restrict__ mean, float* __restrict__ rstd, int64_t M,
                  int C, float eps) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= M) return;
  const Tin* xr = x + row * sx;
  Tout* yr = y + row * sy;
  float v[VEC];

  float s = 0.f;
  for (int j = lane * VEC; j < C; j += 32 * VEC) {
    load<Tin, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) s += v[i];
  }
  const float mu = warp_sum(s) / C;
  float ss = 0.f;
  for (int j = lane * VEC; j < C; j += 32 * VEC) {
    load<Tin, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) ss += (v[i] - mu) * (v[i] - mu);
  }
  const float r = 1.f / sqrtf(warp_sum(ss) / C + eps);
  for (int j = lane * VEC; j < C; j += 32 * VEC) {
    load<Tin, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float t = (v[i] - mu) * r;
      if (w != nullptr) t *= w[j + i];
      if (b != nullptr) t += b[j + i];
      v[i] = t;
    }
    store<Tout, VEC>(yr + j, v);
  }
  if (lane == 0 && mean != nullptr) {
    mean[row] = mu;
    rstd[row] = r;
  }
}

template <typename Tx, typename Tdy, int VEC>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    ln_bwd_dx_kernel(const Tdy* __restrict__ dy, int64_t sdy, const Tx* __restrict__ x, int64_t sx,
                     const float* __restrict__ w, const float* __restrict__ mean, const float* __restrict__ rstd,
                     Tx* __restrict__ dx, int64_t sdx, int64_t M, int C) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  if (row >= M) return;
  const Tdy* dyr = dy + row * sdy;
  const Tx* xr = x + row * sx;
  const float mu = mean[row], r = rstd[row];
  float g[VEC], v[VEC];

  float s_gx = 0.f, s_g = 0.f;
  for (int j = lane * VEC; j < C; j += 32 * VEC) {
    load<Tdy, VEC>(dyr + j, g);
    load<Tx, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float gi = w != nullptr ? g[i] * w[j + i] : g[i];
      s_gx += gi * (v[i] - mu) * r;
      s_g += gi;
    }
  }
  const float c1 = warp_sum(s_gx) / C, c2 = warp_sum(s_g) / C;
  for (int j = lane * VEC; j < C; j += 32 * VEC) {
    load<Tdy, VEC>(dyr + j, g);
    load<Tx, VEC>(xr + j, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float gi = w != nullptr ? g[i] * w[j + i] : g[i];
      v[i] = r * (gi - (v[i] - mu) * r * c1 - c2);
    }
    store<Tx, VEC>(dx + row * sdx + j, v);
  }
}

constexpr int kSumCols = 32, kSumRows = 8;

// part0[p, j] = sum_i a[i, j] * s_i and part1[p, j] = sum_i a[i, j] over the rows of split p, each
// thread walking its rows in order and the block adding its kSumRows lanes in order.
template <typename Ta, typename Tx>
__global__ void __launch_bounds__(kSumCols * kSumRows)
    column_sums_kernel(const Ta* __restrict__ a, int64_t sa, const Tx* __restrict__ x, int64_t sx,
                       const float* __restrict__ mean, const float* __restrict__ rstd, float* __restrict__ part0,
                       float* __restrict__ part1, int64_t M, int C, int64_t rows_per_split) {
  __shared__ float red0[kSumRows][kSumCols + 1];
  __shared__ float red1[kSumRows][kSumCols + 1];
  const int tx = threadIdx.x % kSumCols, ty = threadIdx.x / kSumCols;
  const int col = blockIdx.x * kSumCols + tx;
  const int p = blockIdx.y;
  const int64_t start = static_cast<int64_t>(p) * rows_per_split;
  const int64_t end = min(M, start + rows_per_split);
  float acc0 = 0.f, acc1 = 0.f;
  if (col < C) {
    for (int64_t i = start + ty; i < end; i += kSumRows) {
      const float ai = to_float(a[i * sa + col]);
      const float si = x != nullptr ? (to_float(x[i * sx + col]) - mean[i]) * rstd[i] : 1.f;
      acc0 += ai * si;
      acc1 += ai;
    }
  }
  red0[ty][tx] = acc0;
  red1[ty][tx] = acc1;
  __syncthreads();
  if (ty == 0 && col < C) {
    float t0 = 0.f, t1 = 0.f;
#pragma unroll
    for (int k = 0; k < kSumRows; ++k) {
      t0 += red0[k][tx];
      t1 += red1[k][tx];
    }
    part0[static_cast<int64_t>(p) * C + col] = t0;
    if (part1 != nullptr) part1[static_cast<int64_t>(p) * C + col] = t1;
  }
}

// The CUDA element type behind a DType.
template <typename F>
cudaError_t with_type(DType t, F&& f) {
  switch (t) {
    case DType::f32: return f(float{});
    case DType::f16: return f(__half{});
    case DType::bf16: return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

int blocks_for(int64_t M) { return static_cast<int>((M + kRowsPerBlock - 1) / kRowsPerBlock); }

}  // namespace

cudaError_t layer_norm_fwd(DType x_type, DType y_type, const void* x, int64_t x_row_stride, const float* w,
                           const float* b, void* y, int64_t y_row_stride, float* mean, float* rstd, int64_t M,
                           int64_t C, float eps, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return with_type(x_type, [&](auto xt) {
    using Tin = decltype(xt);
    return with_type(y_type, [&](auto yt) {
      using Tout = decltype(yt);
      constexpr int kVec = 16 / (sizeof(Tin) > sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));
      const bool vec = C % kVec == 0 && aligned16(x) && aligned16(y) && x_row_stride % kVec == 0 &&
                       y_row_stride % kVec == 0;
      if (vec) {
        ln_fwd_kernel<Tin, Tout, kVec><<<blocks_for(M), kRowsPerBlock * 32, 0, stream>>>(
            static_cast<const Tin*>(x), x_row_stride, w, b, static_cast<Tout*>(y), y_row_stride, mean, rstd, M,
            static_cast<int>(C), eps);
      } else {
        ln_fwd_kernel<Tin, Tout, 1><<<blocks_for(M), kRowsPerBlock * 32, 0, stream>>>(
            static_cast<const Tin*>(x), x_row_stride, w, b, static_cast<Tout*>(y), y_row_stride, mean, rstd, M,
            static_cast<int>(C), eps);
      }
      return cudaGetLastError();
    });
  });
}

cudaError_t layer_norm_bwd_dx(DType x_type, DType dy_type, const void* dy, int64_t dy_row_stride, const void* x,
                              int64_t x_row_stride, const float* w, const float* mean, const float* rstd, void* dx,
                              int64_t dx_row_stride, int64_t M, int64_t C, cudaStream_t stream) {
  if (M == 0) return cudaSuccess;
  return with_type(x_type, [&](auto xt) {
    using Tx = decltype(xt);
    return with_type(dy_type, [&](auto dyt) {
      using Tdy = decltype(dyt);
      constexpr int kVec = 16 / (sizeof(Tx) > sizeof(Tdy) ? sizeof(Tx) : sizeof(Tdy));
      const bool vec = C % kVec == 0 && aligned16(dy) && aligned16(x) && aligned16(dx) && dy_row_stride % kVec == 0 &&
                       x_row_stride % kVec == 0 && dx_row_stride % kVec == 0;
      if (vec) {
        ln_bwd_dx_kernel<Tx, Tdy, kVec><<<blocks_for(M), kRowsPerBlock * 32, 0, stream>>>(
            static_cast<const Tdy*>(dy), dy_row_stride, static_cast<const Tx*>(x), x_row_stride, w, mean, rstd,
            static_cast<Tx*>(dx), dx_row_stride, M, static_cast<int>(C));
      } else {
        ln_bwd_dx_kernel<Tx, Tdy, 1><<<blocks_for(M), kRowsPerBlock * 32, 0, stream>>>(
            static_cast<const Tdy*>(dy), dy_row_stride, static_cast<const Tx*>(x), x_row_stride, w, mean, rstd,
            static_cast<Tx*>(dx), dx_row_stride, M, static_cast<int>(C));
      }
      return cudaGetLastError();
    });
  });
}

int column_sum_splits(int64_t M, int64_t C, int num_sms) {
  const int64_t col_blocks = (C + kSumCols - 1) / kSumCols;
  const int64_t want = (4LL * std::max(num_sms, 1) + col_blocks - 1) / col_blocks;
  const int64_t most = std::max<int64_t>(1, (M + 63) / 64);  // at least 64 rows per split
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, most, 1024})));
}

cudaError_t column_sums(DType a_type, const void* a, int64_t a_row_stride, DType x_type, const void* x,
                        int64_t x_row_stride, const float* mean, const float* rstd, float* part0, float* part1,
                        int64_t M, int64_t C, int splits, cudaStream_t stream) {
  if (C == 0 || splits <= 0) return cudaSuccess;
  const int64_t rows_per_split = M == 0 ? 1 : (M + splits - 1) / splits;
  const dim3 grid(static_cast<unsigned>((C + kSumCols - 1) / kSumCols), static_cast<unsigned>(splits));
  return with_type(a_type, [&](auto at) {
    using Ta = decltype(at);
    return with_type(x_type, [&](auto xt) {
      using Tx = decltype(xt);
      column_sums_kernel<Ta, Tx><<<grid, kSumCols * kSumRows, 0, stream>>>(
          static_cast<const Ta*>(a), a_row_stride, static_cast<const Tx*>(x), x_row_stride, mean, rstd, part0, part1,
          M, static_cast<int>(C), rows_per_split);
      return cudaGetLastError();
    });
  });
}


// ---------------------------------------------------------------------------------------------
// GEMM entry points: dispatch on the dtype to the instantiations in mlp_gemm_<dtype>.cu.
// ---------------------------------------------------------------------------------------------

namespace {

template <typename F>
auto with_gemm(DType t, F&& f) {
  switch (t) {
    case DType::f16: return f(detail::Gemm<DType::f16>{});
    case DType::bf16: return f(detail::Gemm<DType::bf16>{});
    case DType::f32: break;
  }
  return f(detail::Gemm<DType::f32>{});
}

}  // namespace

int gemm_alignment(DType t) {
  return with_gemm(t, [](auto g) { return decltype(g)::alignment(); });
}

cudaError_t linear_bias_act(DType t, Act act, int M, int N, int K, const void* a, int64_t lda, const void* w,
                            int64_t ldw, const void* bias, void* out, int64_t ldo, void* pre, int64_t ldp,
                            cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  return with_gemm(t, [&](auto g) {
    return decltype(g)::linear_bias_act(act, M, N, K, a, lda, w, ldw, bias, out, ldo, pre, ldp, stream);
  });
}

cudaError_t linear_bias_residual(DType t, DType out_type, int M, int N, int K, const void* a, int64_t lda,
                                 const void* w, int64_t ldw, const void* bias, const void* residual, int64_t ldr,
                                 void* out, int64_t ldo, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (out_type != t && out_type != DType::f32) return cudaErrorInvalidValue;
  return with_gemm(t, [&](auto g) {
    return decltype(g)::linear_bias_residual(out_type == DType::f32, M, N, K, a, lda, w, ldw, bias, residual, ldr,
                                             out, ldo, stream);
  });
}

cudaError_t matmul_dact(DType t, Act act, int M, int N, int K, const void* a, int64_t lda, const void* b,
                        int64_t ldb, const void* pre, int64_t ldp, void* out, int64_t ldo, float* col_partials,
                        cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  return with_gemm(t, [&](auto g) {
    return decltype(g)::matmul_dact(act, M, N, K, a, lda, b, ldb, pre, ldp, out, ldo, col_partials, stream);
  });
}

int matmul_dact_partial_rows(DType t, int M) {
  return with_gemm(t, [&](auto g) { return (M + decltype(g)::tile_m() - 1) / decltype(g)::tile_m(); });
}

cudaError_t matmul_nn(DType t, int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, void* out,
                      int64_t ldo, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  return with_gemm(t, [&](auto g) { return decltype(g)::matmul_nn(M, N, K, a, lda, b, ldb, out, ldo, stream); });
}

cudaError_t matmul_tn(DType t, int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, float* out,
                      int64_t ldo, int split_k, void* workspace, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  return with_gemm(t, [&](auto g) {
    return decltype(g)::matmul_tn(M, N, K, a, lda, b, ldb, out, ldo, split_k, workspace, stream);
  });
}

size_t matmul_tn_workspace_bytes(DType t, int M, int N, int K, int split_k) {
  if (M == 0 || N == 0) return 0;
  return with_gemm(t, [&](auto g) { return decltype(g)::matmul_tn_workspace_bytes(M, N, K, split_k); });
}

int matmul_tn_split_k(DType t, int M, int N, int K, int num_sms) {
  return with_gemm(t, [&](auto g) {
    using G = decltype(g);
    const int64_t tiles = static_cast<int64_t>((M + G::tile_m() - 1) / G::tile_m()) * ((N + G::tile_n() - 1) / G::tile_n());
    return wave_split_k(tiles, K, num_sms);  // one 128 x 128 block per SM (the 4-stage pipeline's shared memory)
  });
}

}  // namespace mlp
}  // namespace fastvit
