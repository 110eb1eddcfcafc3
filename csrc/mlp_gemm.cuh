// MLP family, CUDA: the GEMMs with fused epilogues, on CUTLASS 2.x tensor-core kernels (Sm80 mma.sync,
// multistage cp.async pipeline; they run on sm_80 and sm_90). Included only by mlp_gemm_<dtype>.cu,
// one translation unit per dtype.
//
// - linear_bias_act: the fc1 epilogue adds the bias, applies the activation (exact GELU, tanh GELU or
//   QuickGELU, in fp32 with libm's erff / tanhf / expf) and, in training, also writes the
//   pre-activation the backward needs (CUTLASS's broadcast epilogue: Z and T outputs).
// - linear_bias_residual: the fc2 epilogue adds the bias and the residual (CUTLASS's source operand C).
// - matmul_dact: the dgrad GEMM multiplies by act'(pre) in its epilogue (DAct below; CUTLASS's own
//   dGELU is the tanh approximation's with a fast tanh) and reduces the result's columns per row tile
//   (CUTLASS's reduction epilogue: fp32 partials of the fc1 bias gradient, no atomics).
// - matmul_nn / matmul_tn: plain dgrad / wgrad; wgrad writes fp32 and may split K serially
//   (deterministic, every partial sum in fp32).
#pragma once

#include <cmath>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/epilogue/thread/linear_combination_bias_elementwise.h"
#include "cutlass/epilogue/thread/linear_combination_dgelu.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/device/gemm_universal.h"
#include "cutlass/gemm/device/gemm_universal_base.h"
#include "cutlass/gemm/device/gemm_universal_with_broadcast.h"
#include "cutlass/gemm/kernel/default_gemm_with_reduction.h"
#include "cutlass/numeric_types.h"

#include "mlp.cuh"

namespace fastvit {
namespace mlp {
namespace detail {

using cutlass::gemm::GemmShape;
using cutlass::layout::ColumnMajor;
using cutlass::layout::RowMajor;

template <DType D>
struct Config;

template <>
struct Config<DType::f16> {
  using T = cutlass::half_t;
  using Operator = cutlass::arch::OpMultiplyAdd;
  using Instruction = GemmShape<16, 8, 16>;
  using Threadblock = GemmShape<128, 128, 32>;
  using Warp = GemmShape<64, 64, 32>;
  static constexpr int kStages = 4;
};

template <>
struct Config<DType::bf16> : Config<DType::f16> {
  using T = cutlass::bfloat16_t;
};

// fp32 operands: 3xTF32 (each operand split into a TF32 high and low part), fp32-accurate.
template <>
struct Config<DType::f32> {
  using T = float;
  using Operator = cutlass::arch::OpMultiplyAddFastF32;
  using Instruction = GemmShape<16, 8, 8>;
  using Threadblock = GemmShape<128, 128, 16>;
  using Warp = GemmShape<64, 64, 16>;
  static constexpr int kStages = 4;
};

template <typename T>
constexpr int kAlign = 128 / cutlass::sizeof_bits<T>::value;

using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<8>;

// A GEMM whose epilogue gets a broadcast row vector (the bias) and may write a second tensor.
template <DType D, typename LayoutA, typename LayoutB, typename ElementC, typename OutputOp>
using BroadcastGemm = cutlass::gemm::device::GemmUniversalWithBroadcast<
    typename Config<D>::T, LayoutA, typename Config<D>::T, LayoutB, ElementC, RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Config<D>::Threadblock, typename Config<D>::Warp,
    typename Config<D>::Instruction, OutputOp, Swizzle, Config<D>::kStages, kAlign<typename Config<D>::T>,
    kAlign<typename Config<D>::T>, typename Config<D>::Operator>;

// A GEMM with an fp32 output (weight gradients: split-K slices add up in fp32).
template <DType D, typename LayoutA, typename LayoutB>
using Fp32OutGemm = cutlass::gemm::device::GemmUniversal<
    typename Config<D>::T, LayoutA, typename Config<D>::T, LayoutB, float, RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Config<D>::Threadblock, typename Config<D>::Warp,
    typename Config<D>::Instruction, cutlass::epilogue::thread::LinearCombination<float, kAlign<float>, float, float>,
    Swizzle, Config<D>::kStages, kAlign<typename Config<D>::T>, kAlign<typename Config<D>::T>,
    typename Config<D>::Operator>;

template <DType D, typename LayoutA, typename LayoutB>
using PlainGemm = cutlass::gemm::device::GemmUniversal<
    typename Config<D>::T, LayoutA, typename Config<D>::T, LayoutB, typename Config<D>::T, RowMajor, float,
    cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80, typename Config<D>::Threadblock, typename Config<D>::Warp,
    typename Config<D>::Instruction,
    cutlass::epilogue::thread::LinearCombination<typename Config<D>::T, kAlign<typename Config<D>::T>, float, float>,
    Swizzle, Config<D>::kStages, kAlign<typename Config<D>::T>, kAlign<typename Config<D>::T>,
    typename Config<D>::Operator>;

// The activations and their derivatives, in fp32 (accurate libm functions: the fp32 GEMMs are
// judged at fp32 precision, which CUTLASS's tanh.approx-based GELU_taylor would miss).
template <Act A>
struct Activation {
  static const bool kIsHeavy = true;

  CUTLASS_HOST_DEVICE
  static float value(float u) {
    if constexpr (A == Act::gelu) {
      return 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
    } else if constexpr (A == Act::gelu_tanh) {
      return 0.5f * u * (1.f + tanhf(0.79788456080286536f * (u + 0.044715f * u * u * u)));
    } else {
      return u / (1.f + expf(-1.702f * u));
    }
  }

  CUTLASS_HOST_DEVICE
  static float derivative(float u) {
    if constexpr (A == Act::gelu) {  // Phi(u) + u * phi(u)
      return 0.5f * (1.f + erff(u * 0.70710678118654752f)) + u * 0.39894228040143268f * expf(-0.5f * u * u);
    } else if constexpr (A == Act::gelu_tanh) {
      const float k = 0.79788456080286536f;
      const float t = tanhf(k * (u + 0.044715f * u * u * u));
      return 0.5f * (1.f + t) + 0.5f * u * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * u * u);
    } else {
      const float sig = 1.f / (1.f + expf(-1.702f * u));
      return sig + 1.702f * u * sig * (1.f - sig);
    }
  }

  CUTLASS_HOST_DEVICE
  float operator()(float const& u) const { return value(u); }
};

// Z = act(acc + bias) and T = acc + bias (T written only when its pointer is not null).
template <typename T, Act A>
using BiasAct = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    T, float, float, T, T, kAlign<T>, Activation<A>, cutlass::plus<float>, true, T>;

// Z = acc + bias (+ beta * C, the residual), in the output type TO; the bias stays in the GEMM type T.
template <typename T, typename TO>
using BiasResidual = cutlass::epilogue::thread::LinearCombinationBiasElementwise<
    TO, float, float, TO, TO, kAlign<TO>, cutlass::epilogue::thread::Identity<float>, cutlass::plus<float>, false, T>;

// D = acc * act'(pre); pre is the epilogue's "tensor" operand. The interface (Params, reduction
// participation) is LinearCombinationDGelu's.
template <typename T, Act A>
class DAct : public cutlass::epilogue::thread::LinearCombinationDGelu<float, float, T, T, kAlign<T>> {
  using Base = cutlass::epilogue::thread::LinearCombinationDGelu<float, float, T, T, kAlign<T>>;

 public:
  using typename Base::FragmentAccumulator;
  using typename Base::FragmentCompute;
  using typename Base::FragmentSource;
  using typename Base::FragmentTensor;
  using typename Base::Params;
  static int const kN = kAlign<T>;

  CUTLASS_HOST_DEVICE
  explicit DAct(Params const& params) : Base(params) {}

  CUTLASS_HOST_DEVICE
  FragmentCompute operator()(FragmentAccumulator const& acc, FragmentTensor const& pre) const {
    FragmentCompute d;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < kN; ++i) {
      d[i] = acc[i] * Activation<A>::derivative(static_cast<float>(pre[i]));
    }
    return d;
  }

  // With a source operand (beta != 0); matmul_dact passes beta = 0, so this is never reached.
  CUTLASS_HOST_DEVICE
  FragmentCompute operator()(FragmentAccumulator const& acc, FragmentSource const&, FragmentTensor const& pre) const {
    return (*this)(acc, pre);
  }
};

// dgrad through the activation with the column sums of its result, one fp32 row of partials per row tile.
template <DType D, Act A>
using DActReductionGemm = cutlass::gemm::device::GemmUniversalBase<typename cutlass::gemm::kernel::DefaultGemmWithReduction<
    typename Config<D>::T, RowMajor, cutlass::ComplexTransform::kNone, kAlign<typename Config<D>::T>,
    typename Config<D>::T, RowMajor, cutlass::ComplexTransform::kNone, kAlign<typename Config<D>::T>,
    typename Config<D>::T, RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    typename Config<D>::Threadblock, typename Config<D>::Warp, typename Config<D>::Instruction,
    DAct<typename Config<D>::T, A>, cutlass::plus<float>, Swizzle, Config<D>::kStages,
    typename Config<D>::Operator>::GemmKernel>;

// Calls f(std::integral_constant<Act, a>{}) for the runtime activation a (the kernels are templates).
template <typename F>
cudaError_t with_act(Act act, F&& f) {
  switch (act) {
    case Act::gelu: return f(std::integral_constant<Act, Act::gelu>{});
    case Act::gelu_tanh: return f(std::integral_constant<Act, Act::gelu_tanh>{});
    case Act::quick_gelu: return f(std::integral_constant<Act, Act::quick_gelu>{});
  }
  return cudaErrorInvalidValue;
}

inline cudaError_t to_cuda_error(cutlass::Status status) {
  if (status == cutlass::Status::kSuccess) return cudaGetLastError();
  if (status == cutlass::Status::kErrorMisalignedOperand || status == cutlass::Status::kErrorInvalidProblem ||
      status == cutlass::Status::kErrorNotSupported) {
    return cudaErrorNotSupported;
  }
  const cudaError_t e = cudaGetLastError();
  return e != cudaSuccess ? e : cudaErrorLaunchFailure;
}

template <typename G>
cudaError_t run(typename G::Arguments const& args, void* workspace, cudaStream_t stream) {
  G op;
  cutlass::Status status = op.can_implement(args);
  if (status == cutlass::Status::kSuccess) status = op.initialize(args, workspace, stream);
  if (status == cutlass::Status::kSuccess) status = op.run(stream);
  return to_cuda_error(status);
}

constexpr auto kGemmMode = cutlass::gemm::GemmUniversalMode::kGemm;

template <DType D>
cudaError_t Gemm<D>::linear_bias_act(Act act, int M, int N, int K, const void* a, int64_t lda, const void* w,
                                     int64_t ldw, const void* bias, void* out, int64_t ldo, void* pre, int64_t ldp,
                                     cudaStream_t stream) {
  using T = typename Config<D>::T;
  return with_act(act, [&](auto a_kind) {
    using Op = BiasAct<T, decltype(a_kind)::value>;
    using G = BroadcastGemm<D, RowMajor, ColumnMajor, T, Op>;
    typename G::Arguments args(kGemmMode, {M, N, K}, 1, typename Op::Params(1.f, 0.f), a, w, nullptr, out,
                               const_cast<void*>(bias), pre, 0, 0, 0, 0, 0, 0, lda, ldw, ldo, ldo, 0, ldp);
    return run<G>(args, nullptr, stream);
  });
}

template <DType D>
cudaError_t Gemm<D>::linear_bias_residual(bool out_fp32, int M, int N, int K, const void* a, int64_t lda,
                                          const void* w, int64_t ldw, const void* bias, const void* residual,
                                          int64_t ldr, void* out, int64_t ldo, cudaStream_t stream) {
  using T = typename Config<D>::T;
  auto launch = [&](auto out_element) {
    using TO = decltype(out_element);
    using Op = BiasResidual<T, TO>;
    using G = BroadcastGemm<D, RowMajor, ColumnMajor, TO, Op>;
    const float beta = residual != nullptr ? 1.f : 0.f;
    typename G::Arguments args(kGemmMode, {M, N, K}, 1, typename Op::Params(1.f, beta), a, w, residual, out,
                               const_cast<void*>(bias), nullptr, 0, 0, 0, 0, 0, 0, lda, ldw,
                               residual != nullptr ? ldr : ldo, ldo, 0, 0);
    return run<G>(args, nullptr, stream);
  };
  if constexpr (D == DType::f32) {
    return launch(float{});
  } else {
    return out_fp32 ? launch(float{}) : launch(T{});
  }
}

template <DType D>
cudaError_t Gemm<D>::matmul_dact(Act act, int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb,
                                 const void* pre, int64_t ldp, void* out, int64_t ldo, float* col_partials,
                                 cudaStream_t stream) {
  return with_act(act, [&](auto a_kind) {
    constexpr Act A = decltype(a_kind)::value;
    using G = DActReductionGemm<D, A>;
    static_assert(G::GemmKernel::Epilogue::kIsSingleSource, "argument order below is the single-source kernel's");
    static_assert(std::is_same<typename G::GemmKernel::Epilogue::ElementVector, float>::value, "fp32 partials");
    // ptr_Vector receives the partials: row (tile m) at col_partials + tile_m * N.
    typename G::Arguments args(kGemmMode, {M, N, K}, 1, typename DAct<typename Config<D>::T, A>::Params(1.f, 0.f), a,
                               b, nullptr, out, col_partials, const_cast<void*>(pre), 0, 0, 0, 0, 0, 0, lda, ldb, ldo,
                               ldo, N, ldp);
    return run<G>(args, nullptr, stream);
  });
}

template <DType D>
cudaError_t Gemm<D>::matmul_nn(int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, void* out,
                               int64_t ldo, cudaStream_t stream) {
  using G = PlainGemm<D, RowMajor, RowMajor>;
  typename G::Arguments args(kGemmMode, {M, N, K}, 1, {1.f, 0.f}, a, b, out, out, 0, 0, 0, 0, lda, ldb, ldo, ldo);
  return run<G>(args, nullptr, stream);
}

template <DType D>
cudaError_t Gemm<D>::matmul_tn(int M, int N, int K, const void* a, int64_t lda, const void* b, int64_t ldb, float* out,
                               int64_t ldo, int split_k, void* workspace, cudaStream_t stream) {
  using G = Fp32OutGemm<D, ColumnMajor, RowMajor>;
  typename G::Arguments args(kGemmMode, {M, N, K}, split_k, {1.f, 0.f}, a, b, out, out, 0, 0, 0, 0, lda, ldb, ldo,
                             ldo);
  return run<G>(args, workspace, stream);
}

template <DType D>
size_t Gemm<D>::matmul_tn_workspace_bytes(int M, int N, int K, int split_k) {
  using G = Fp32OutGemm<D, ColumnMajor, RowMajor>;
  typename G::Arguments args(kGemmMode, {M, N, K}, split_k, {1.f, 0.f}, nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0,
                             M, N, N, N);
  return G::get_workspace_size(args);
}

template <DType D>
int Gemm<D>::alignment() {
  return kAlign<typename Config<D>::T>;
}

template <DType D>
int Gemm<D>::tile_m() {
  return Config<D>::Threadblock::kM;
}

template <DType D>
int Gemm<D>::tile_n() {
  return Config<D>::Threadblock::kN;
}

}  // namespace detail
}  // namespace mlp
}  // namespace fastvit
