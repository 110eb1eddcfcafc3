// MLP family (LayerNorm, LayerNorm + Linear + activation + Linear): the torch-free CUDA interface.
//
// Everything here takes raw pointers, sizes, row strides (in elements) and a cudaStream_t; only
// bindings.cpp knows torch. Matrices are row-major with unit column stride. Element types are named
// by DType so that the launchers can be called without templates; each launcher dispatches to its
// templated kernels (fp32, fp16, bf16) and returns cudaSuccess or the first CUDA error.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastvit {
namespace mlp {

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

// The MLP's activation, numbered as the ops' ``activation`` argument: exact (erf) GELU, GELU's tanh
// approximation (SigLIP), QuickGELU u * sigmoid(1.702 u) (CLIP).
enum class Act : int { gelu = 0, gelu_tanh = 1, quick_gelu = 2 };

// ---------------------------------------------------------------------------------------------
// LayerNorm (csrc/mlp.cu)
// ---------------------------------------------------------------------------------------------

// y[i, :] = (x[i, :] - mean_i) * rstd_i * w + b over C features, one warp per row. The statistics
// are fp32 and two-pass (mean, then the centred sum of squares), so offset data keeps its
// precision. w, b: fp32 (C,) or nullptr. mean, rstd: fp32 (M,) or nullptr (inference).
cudaError_t layer_norm_fwd(DType x_type, DType y_type, const void* x, int64_t x_row_stride, const float* w,
                           const float* b, void* y, int64_t y_row_stride, float* mean, float* rstd, int64_t M,
                           int64_t C, float eps, cudaStream_t stream);

// dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) with g = dy * w, xhat = (x - mean) * rstd.
// dx has x's type; dy may have another (the GEMM dtype of layernorm_mlp's backward).
cudaError_t layer_norm_bwd_dx(DType x_type, DType dy_type, const void* dy, int64_t dy_row_stride, const void* x,
                              int64_t x_row_stride, const float* w, const float* mean, const float* rstd, void* dx,
                              int64_t dx_row_stride, int64_t M, int64_t C, cudaStream_t stream);

// Column sums in a fixed order (deterministic, no atomics), as fp32 partials over row splits:
// part0[p, j] = sum_{i in split p} a[i, j] * s_i, with s_i = (x[i, j] - mean_i) * rstd_i when x is
// given (LayerNorm's dW with a = dy) and 1 otherwise (bias gradients);
// part1[p, j] = sum_{i in split p} a[i, j] when part1 is not nullptr (LayerNorm's dB).
// part0 and part1 are (splits, C) fp32; the caller sums them over splits.
cudaError_t column_sums(DType a_type, const void* a, int64_t a_row_stride, DType x_type, const void* x,
                        int64_t x_row_stride, const float* mean, const float* rstd, float* part0, float* part1,
                        int64_t M, int64_t C, int splits, cudaStream_t stream);

// The number of row splits column_sums should use for an (M, C) input on a GPU with num_sms SMs.
int column_sum_splits(int64_t M, int64_t C, int num_sms);

// ---------------------------------------------------------------------------------------------
// GEMMs with fused epilogues (csrc/mlp_gemm.cuh, instantiated per dtype in csrc/mlp_gemm_*.cu)
// ---------------------------------------------------------------------------------------------
// T is the GEMM dtype; accumulation is fp32. fp32 GEMMs use 3xTF32 tensor-core arithmetic (fp32
// accuracy). Every leading dimension and the inner sizes must be multiples of gemm_alignment(T)
// and every pointer 16-byte aligned (bindings.cpp checks).

int gemm_alignment(DType t);

// fc1: out[M, N] = act(a[M, K] @ w[N, K]^T + bias[N]); pre[M, N] = the argument of act when pre is
// not nullptr (training). bias may be nullptr.
cudaError_t linear_bias_act(DType t, Act act, int M, int N, int K, const void* a, int64_t lda, const void* w,
                            int64_t ldw, const void* bias, void* out, int64_t ldo, void* pre, int64_t ldp,
                            cudaStream_t stream);

// fc2: out[M, N] = a[M, K] @ w[N, K]^T + bias[N] (+ residual[M, N]); out and residual have type
// out_type (T, or fp32 when T is 16-bit: autocast with an fp32 residual stream).
cudaError_t linear_bias_residual(DType t, DType out_type, int M, int N, int K, const void* a, int64_t lda,
                                 const void* w, int64_t ldw, const void* bias, const void* residual, int64_t ldr,
                                 void* out, int64_t ldo, cudaStream_t stream);

// dgrad through the activation: out[M, N] = (a[M, K] @ b[K, N]) * act'(pre[M, N]), and the column sums
// of out (before rounding) as fp32 partials: col_partials is (matmul_dact_partial_rows(t, M), N), row r
// summing rows [r * tile, (r + 1) * tile) of out; the caller adds the rows (the fc1 bias gradient).
cudaError_t matmul_dact(DType t, Act act, int M, int N, int K, const void* a, int64_t lda, const void* b,
                        int64_t ldb, const void* pre, int64_t ldp, void* out, int64_t ldo, float* col_partials,
                        cudaStream_t stream);
int matmul_dact_partial_rows(DType t, int M);

// out[M, N] = a[M, K] @ b[K, N].
cudaError_t matmul_nn(DType t, int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, void* out,
                      int64_t ldo, cudaStream_t stream);

// Weight gradient: out[M, N] = a[K, M]^T @ b[K, N] (K = rows of the activations), out in fp32. With
// split_k > 1 the K range is split over serially reduced slices (deterministic, fp32 partial sums),
// which needs matmul_tn_workspace_bytes() of workspace (any contents).
cudaError_t matmul_tn(DType t, int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, float* out,
                      int64_t ldo, int split_k, void* workspace, cudaStream_t stream);
size_t matmul_tn_workspace_bytes(DType t, int M, int N, int K, int split_k);

// The split_k matmul_tn should use: enough tiles to fill num_sms SMs when K is long.
int matmul_tn_split_k(DType t, int M, int N, int K, int num_sms);

}  // namespace mlp
}  // namespace fastvit

namespace fastvit {
namespace mlp {
namespace detail {

// The GEMMs of one dtype: defined in mlp_gemm.cuh (CUTLASS), instantiated once per dtype in its own
// translation unit (mlp_gemm_f32.cu, mlp_gemm_f16.cu, mlp_gemm_bf16.cu) so they compile in parallel.
template <DType D>
struct Gemm {
  static cudaError_t linear_bias_act(Act act, int M, int N, int K, const void* a, int64_t lda, const void* w,
                                     int64_t ldw, const void* bias, void* out, int64_t ldo, void* pre, int64_t ldp,
                                     cudaStream_t stream);
  static cudaError_t linear_bias_residual(bool out_fp32, int M, int N, int K, const void* a, int64_t lda,
                                          const void* w, int64_t ldw, const void* bias, const void* residual,
                                          int64_t ldr, void* out, int64_t ldo, cudaStream_t stream);
  static cudaError_t matmul_dact(Act act, int M, int N, int K, const void* a, int64_t lda, const void* b,
                                 int64_t ldb, const void* pre, int64_t ldp, void* out, int64_t ldo, float* col_partials,
                                 cudaStream_t stream);
  static cudaError_t matmul_nn(int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, void* out,
                               int64_t ldo, cudaStream_t stream);
  static cudaError_t matmul_tn(int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, float* out,
                               int64_t ldo, int split_k, void* workspace, cudaStream_t stream);
  static size_t matmul_tn_workspace_bytes(int M, int N, int K, int split_k);
  static int alignment();
  static int tile_m();
  static int tile_n();
};

}  // namespace detail
}  // namespace mlp
}  // namespace fastvit
