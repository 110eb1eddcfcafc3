// Attention family, Hopper (sm_90a): the forward and backward kernel bodies and their configurations
// (Fwd<T, DP>, Bwd<T, DP>), in a header so that tests/cuda/attention_sm90_fragments.cu can check their
// fragment-layout assumptions on the host with CuTe. Kernels, TMA descriptors, launchers and the dispatch
// are in attention_sm90.cu, which describes the forward's schedule.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/cutlass.h>
#include <cutlass/gemm/collective/builders/sm90_common.inl>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "attention_kernel.h"

namespace fastvit {
namespace attention {
namespace sm90 {

using namespace cute;

// The accumulator of one wgmma (per thread: (2 columns, 2 row halves, N / 8 column groups), MMA_M,
// MMA_N) as the A operand of the next one: ((2, 2, 2), MMA_M, N / 16), P's registers reused in place.
template <class Layout0>
CUTE_HOST_DEVICE auto acc_as_a_operand(Layout0 acc) {
  auto l = logical_divide(get<0, 2>(acc), Tile<_2>{});  // ((2, N / 16))
  return make_layout(make_layout(get<0, 0>(acc), get<0, 1>(acc), get<0, 0>(l)), get<1>(acc),
                     coalesce(make_layout(get<0, 1>(l), get<2>(acc))));
}

// C += A B on a tiled wgmma: A and B are descriptor fragments (SS) or A is registers (RS); issues the
// k-slices and commits them as one wgmma group without waiting. C (and A in registers) must not be
// touched until a warpgroup_wait<n>() has retired the group; then fence them with warpgroup_fence_operand.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
CUTLASS_DEVICE void gemm_issue(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRs = !is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  if constexpr (kRs) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
  CUTLASS_PRAGMA_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    cute::gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(c);
}

// gemm_issue, then wait for every wgmma group of this warpgroup.
template <bool kZeroInit, class Mma, class TA, class TB, class TC>
CUTLASS_DEVICE void gemm(Mma& mma, TA const& a, TB const& b, TC& c) {
  constexpr bool kRs = !is_base_of<GMMA::DescriptorIterator, typename Mma::FrgTypeA>::value;
  gemm_issue<kZeroInit>(mma, a, b, c);
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRs) warpgroup_fence_operand(const_cast<TA&>(a));
}

// The kernel's configuration for a padded head dim DP: the kernel table's sm_90 rows (attention.cu).
template <class T, int DP>
struct Fwd {
  using Element = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  static constexpr int kBlockM = 128;  // two consumer warpgroups of 64 rows
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = 128 + kConsumers;
  // setmaxnreg: the producer's TMA loop spills below 40 registers; the consumers hold S and O in fp32 and
  // the previous tile's P
  static constexpr int kProducerRegs = 40, kConsumerRegs = 232;  // 40 x 128 + 232 x 256 <= 65536

  using TileS = Shape<Int<kBlockM>, Int<kBlockN>>;
  using TileO = Shape<Int<kBlockM>, Int<DP>>;
  using TileQ = Shape<Int<kBlockM>, Int<DP>>;
  using TileK = Shape<Int<kBlockN>, Int<DP>>;
  using TileVt = Shape<Int<DP>, Int<kBlockN>>;
  using AtomLayout = Layout<Shape<_2, _1, _1>>;  // one 64-row wgmma per consumer warpgroup
  using MmaQK = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<kBlockN>, Int<DP>>>(), AtomLayout{}));
  using MmaPV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<DP>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AtomLayout{}));
  static_assert(size(MmaQK{}) == kConsumers && size(MmaPV{}) == kConsumers);

  using SmemLayoutQ = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>, Int<DP>>(), TileQ{}));
  using SmemLayoutK = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>, Int<DP>>(),
      Shape<Int<kBlockN>, Int<DP>, Int<kStages>>{}));
  // V^T: (DP, keys) with DP the contiguous (MN-major) mode, which is V's row-major (keys, DP) tile
  using SmemLayoutVt = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::MN, Element, Int<DP>, Int<kBlockN>>(),
      Shape<Int<DP>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}));

  // global tensors as TMA sees them: (N, D, H, B) for Q and K, (D, N, H, B) for V^T
  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;
  using GStrideQK = Stride<int64_t, _1, int64_t, int64_t>;
  using GStrideVt = Stride<_1, int64_t, int64_t, int64_t>;
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{},
                                                  GStrideQK{}),
                                      SmemLayoutQ{}, TileQ{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{},
                                                  GStrideQK{}),
                                      take<0, 2>(SmemLayoutK{}), TileK{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{},
                                      make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{},
                                                  GStrideVt{}),
                                      take<0, 2>(SmemLayoutVt{}), TileVt{}, _1{}));
  static constexpr uint32_t kBytesQ = kBlockM * DP * sizeof(Element);
  static constexpr uint32_t kBytesKV = kBlockN * DP * sizeof(Element);

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutVt>, 1024> v;
    typename Pipeline::SharedStorage pipe_k, pipe_v;
    cutlass::arch::ClusterTransactionBarrier bar_q;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;  // + the base's alignment to 1024

  struct Params {
    TmaQ tma_q;
    TmaK tma_k;
    TmaV tma_v;
    FwdParams p;
  };

  static CUTLASS_DEVICE void run(const Params& params, unsigned char* smem_raw) {
    const FwdParams& p = params.p;
    // the 128-byte swizzle is a function of the address bits: buffers start at 1024-byte multiples
    const uint32_t base = cast_smem_ptr_to_uint(smem_raw);
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw + ((1024 - base % 1024) % 1024));
    const int m_block = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warpgroup = cutlass::canonical_warp_group_idx();
    const int n_blocks = (p.Nk + kBlockN - 1) / kBlockN;

    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sVt = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutVt{});

    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
      ss.bar_q.init(1);
    }
    typename Pipeline::Params pp;
    pp.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pp.is_leader = threadIdx.x == 0;
    pp.num_consumers = kConsumers;
    pp.transaction_bytes = kBytesKV;
    Pipeline pipe_k(ss.pipe_k, pp, Shape<_1, _1, _1>{});  // initialises the barriers, fence included
    Pipeline pipe_v(ss.pipe_v, pp, Shape<_1, _1, _1>{});
    __syncthreads();

    if (warpgroup == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (threadIdx.x != 0) return;  // the pipelines' leader thread issues every load
      Tensor mQ = params.tma_q.get_tma_tensor(make_shape(p.Nq, p.D, p.H, p.B))(_, _, h, b);
      Tensor mK = params.tma_k.get_tma_tensor(make_shape(p.Nk, p.D, p.H, p.B))(_, _, h, b);
      Tensor mVt = params.tma_v.get_tma_tensor(make_shape(p.D, p.Nk, p.H, p.B))(_, _, h, b);
      Tensor gQ = local_tile(mQ, TileQ{}, make_coord(m_block, _0{}));    // (M, DP)
      Tensor gK = local_tile(mK, TileK{}, make_coord(_, _0{}));          // (N, DP, n_blocks)
      Tensor gVt = local_tile(mVt, TileVt{}, make_coord(_0{}, _));       // (DP, N, n_blocks)
      auto cq = params.tma_q.get_slice(_0{});
      auto ck = params.tma_k.get_slice(_0{});
      auto cv = params.tma_v.get_slice(_0{});
      Tensor tQg = group_modes<0, 3>(cq.partition_S(gQ));
      Tensor tQs = group_modes<0, 3>(cq.partition_D(sQ));
      Tensor tKg = group_modes<0, 3>(ck.partition_S(gK));  // (TMA, n_blocks)
      Tensor tKs = group_modes<0, 3>(ck.partition_D(sK));  // (TMA, stages)
      Tensor tVg = group_modes<0, 3>(cv.partition_S(gVt));
      Tensor tVs = group_modes<0, 3>(cv.partition_D(sVt));

      ss.bar_q.arrive_and_expect_tx(kBytesQ);
      copy(params.tma_q.with(reinterpret_cast<uint64_t&>(ss.bar_q), 0), tQg, tQs);
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int n = 0; n < n_blocks; ++n) {
        pipe_k.producer_acquire(write);
        copy(params.tma_k.with(*pipe_k.producer_get_barrier(write), 0), tKg(_, n), tKs(_, write.index()));
        pipe_v.producer_acquire(write);
        copy(params.tma_v.with(*pipe_v.producer_get_barrier(write), 0), tVg(_, n), tVs(_, write.index()));
        ++write;
      }
      pipe_k.producer_tail(write);  // the CTA outlives its last loads
      pipe_v.producer_tail(write);
      return;
    }

    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    const int tidx = threadIdx.x - 128, lane = threadIdx.x % 32;
    MmaQK mma_qk;
    MmaPV mma_pv;
    auto thr_qk = mma_qk.get_thread_slice(tidx);
    auto thr_pv = mma_pv.get_thread_slice(tidx);
    Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
    Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stages)
    Tensor tOrO = partition_fragment_C(mma_pv, TileO{});
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(TileS{}));  // (row, col) of each S register
    Tensor tOcO = thr_pv.partition_C(make_identity_tensor(TileO{}));
    static_assert(size<1>(decltype(tOrO){}) == 1 && size<2>(decltype(tOrO){}) == 1);
    clear(tOrO);

    const int m0 = m_block * kBlockM;
    const int rows[2] = {m0 + int(get<0>(tScS(0))), m0 + int(get<0>(tScS(2)))};
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

    Tensor tSrS = partition_fragment_C(mma_qk, TileS{});
    Tensor rP = make_tensor_like<Element>(tSrS);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(tSrS.layout()));
    // S = the scaled, masked scores of key block n0 in base 2; the online softmax turns them into
    // exp2(S - row max) and returns how much the running max grew (alpha), by which O and the sums scale
    auto softmax = [&](int n0, float (&alpha)[2]) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrS); ++i) {
        const int row = rows[(i / 2) % 2], col = n0 + int(get<1>(tScS(i)));
        float x = tSrS(i) * p.scale_log2;
        if (col >= p.Nk)
          x = -INFINITY;
        else if (p.mask.kind != MaskKind::none && row < p.Nq)
          x += mask_term(p.mask, b, h, row, col);
        tSrS(i) = x;
      }
      CUTLASS_PRAGMA_UNROLL
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i)
          if ((i / 2) % 2 == r) mx = fmaxf(mx, tSrS(i));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far stays 0, not NaN
        alpha[r] = exp2f(row_max[r] - m_use);
        row_max[r] = m_new;
        row_sum[r] *= alpha[r];
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i)
          if ((i / 2) % 2 == r) {
            const float e = exp2f(tSrS(i) - m_use);
            tSrS(i) = e;
            row_sum[r] += e;
          }
      }
    };
    auto to_p = [&] {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tSrS); ++i) rP(i) = Element(tSrS(i));
    };

    auto rescale_o = [&](const float (&alpha)[2]) {
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= alpha[(i / 2) % 2];
    };

    // FA3's overlap within a warpgroup: step n issues S_n = Q K_n^T, rescales O while it runs, issues
    // O += P_{n-1} V_{n-1}, and starts S_n's softmax while that product is in flight (wgmma groups retire
    // in order). ptxas 13.0 keeps the scaling, masking and row max before PV's wait but schedules the
    // exponentials after it (SASS of all four instantiations), although the PTX has them before.
    // K and V advance through their rings one step apart.
    ss.bar_q.wait(0);
    PipelineState read_k, read_v;
    float alpha[2];
    pipe_k.consumer_wait(read_k);
    gemm<true>(mma_qk, tSrQ, tSrK(_, _, _, read_k.index()), tSrS);
    pipe_k.consumer_release(read_k);
    ++read_k;
    softmax(0, alpha);  // alpha = 0: O is still 0
    to_p();
    for (int n = 1; n < n_blocks; ++n) {
      pipe_k.consumer_wait(read_k);
      gemm_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, read_k.index()), tSrS);
      rescale_o(alpha);
      pipe_v.consumer_wait(read_v);
      gemm_issue<false>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO);
      warpgroup_wait<1>();
      warpgroup_fence_operand(tSrS);
      pipe_k.consumer_release(read_k);
      ++read_k;
      softmax(n * kBlockN, alpha);
      warpgroup_fence_operand(tSrS);  // the softmax is done before the wait (in PTX order)
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(rP);
      pipe_v.consumer_release(read_v);
      ++read_v;
      to_p();
    }
    rescale_o(alpha);
    pipe_v.consumer_wait(read_v);
    gemm<false>(mma_pv, tOrP, tOrV(_, _, _, read_v.index()), tOrO);
    pipe_v.consumer_release(read_v);

    float inv[2];
    CUTLASS_PRAGMA_UNROLL
    for (int r = 0; r < 2; ++r) {
      float l = row_sum[r];
      l += __shfl_xor_sync(0xffffffff, l, 1);
      l += __shfl_xor_sync(0xffffffff, l, 2);
      inv[r] = l > 0.f ? 1.f / l : 0.f;  // nothing to attend: output 0
      if (p.lse != nullptr && lane % 4 == 0 && rows[r] < p.Nq)
        p.lse[(int64_t(b) * p.H + h) * p.Nq + rows[r]] = l > 0.f ? row_max[r] + log2f(l) : -INFINITY;
    }
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < size(tOrO); ++i) {
      const int row = m0 + int(get<0>(tOcO(i))), col = int(get<1>(tOcO(i)));
      if (row < p.Nq && col < p.D) store(p.o, b, h, row, col, Elem<T>::from_float(tOrO(i) * inv[(i / 2) % 2]));
    }
  }
};


// The backward for a padded head dim DP: one CTA per (split, h, b) walks its key blocks of 128 keys (64 per
// consumer warpgroup), as the mma.sync backward's plan does (plan_bwd with sm90 = true), and for each key
// block all query blocks of 64 queries, five wgmma products per step, FlashAttention-2's work:
//   S^T = K Q^T and dP^T = V dO^T (SS; keys are the M mode, so each warpgroup owns its keys' dK, dV rows),
//   P^T and dS^T = P^T (dP^T - delta) in registers,
//   dV += P^T dO and dK += dS^T Q (RS: P^T and dS^T stay in registers; dO and Q read transposed, MN-major),
//   dQ = dS K (SS: dS^T goes through shared memory; the warpgroups split dQ's head dim, K read transposed),
// dQ accumulated in fp32 by the thread that owns each element, in key-block order (the workspace, or dq
// itself for the only key block), so the result is deterministic. The producer warp loads K, V once per
// key block and Q, dO through a two-stage ring.
template <class T, int DP>
struct Bwd {
  using Element = std::conditional_t<std::is_same_v<T, __half>, cutlass::half_t, cutlass::bfloat16_t>;
  static constexpr int kBlockM = 64;   // queries per step
  static_assert(kBlockM == attention::kBlockM, "plan_bwd pads delta and lse rows to attention::kBlockM");
  static constexpr int kBlockN = 128;  // keys per key block: 64 per consumer warpgroup
  static constexpr int kStages = 2;    // the Q / dO ring
  static constexpr int kConsumers = 256;
  static constexpr int kThreads = 128 + kConsumers;
  // setmaxnreg: at DP = 128 dK, dV (64 fp32 each), S^T, dP^T (32 each) and dQ (32) want every register
  // (and still spill: ptxas -v reports ~640 bytes); at DP = 64 the producer's TMA loop wants 40
  static constexpr int kProducerRegs = DP == 64 ? 40 : 24, kConsumerRegs = DP == 64 ? 232 : 240;

  using TileSt = Shape<Int<kBlockN>, Int<kBlockM>>;  // S^T, dP^T: (keys, queries)
  using TileKV = Shape<Int<kBlockN>, Int<DP>>;       // K, V, dK, dV
  using TileQ = Shape<Int<kBlockM>, Int<DP>>;        // Q, dO, dQ
  using MmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<kBlockM>, Int<DP>>>(),
      Layout<Shape<_2, _1, _1>>{}));
  using MmadKV = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<Int<kBlockN>, Int<DP>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));
  using MmadQ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM>, Int<DP / 2>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_1, _2, _1>>{}));  // the two warpgroups split dQ's head dim
  static_assert(size(MmaSdP{}) == kConsumers && size(MmadKV{}) == kConsumers && size(MmadQ{}) == kConsumers);

  // K's swizzle atom is half the head dim wide, so that each warpgroup's half of K^T is whole atoms
  using AtomK = std::conditional_t<DP == 64, GMMA::Layout_K_SW64_Atom<Element>, GMMA::Layout_K_SW128_Atom<Element>>;
  using SmemLayoutK = decltype(tile_to_shape(AtomK{}, TileKV{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<DP>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));
  using SmemLayoutV = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockN>, Int<DP>>(),
      TileKV{}));
  using SmemLayoutQ = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>, Int<DP>>(),
      Shape<Int<kBlockM>, Int<DP>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<DP>, Int<kBlockM>, Int<kStages>>{},
                                 Stride<Int<kBlockM>, _1, Int<kBlockM * DP>>{})));
  using SmemLayoutdS = decltype(tile_to_shape(
      cutlass::gemm::collective::detail::ss_smem_selector<GMMA::Major::K, Element, Int<kBlockM>, Int<kBlockN>>(),
      Shape<Int<kBlockM>, Int<kBlockN>>{}));

  using GShape = Shape<int32_t, int32_t, int32_t, int32_t>;  // (N, D, H, B)
  using GStride = Stride<int64_t, _1, int64_t, int64_t>;
  using GTensor = decltype(make_tensor(make_gmem_ptr(static_cast<Element const*>(nullptr)), GShape{}, GStride{}));
  using TmaQ = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, take<0, 2>(SmemLayoutQ{}), TileQ{}, _1{}));
  using TmaK = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, SmemLayoutK{}, TileKV{}, _1{}));
  using TmaV = decltype(make_tma_copy(SM90_TMA_LOAD{}, GTensor{}, SmemLayoutV{}, TileKV{}, _1{}));
  static constexpr uint32_t kBytesKV = 2 * kBlockN * DP * sizeof(Element);   // K and V
  static constexpr uint32_t kBytesQdO = 2 * kBlockM * DP * sizeof(Element) + 2 * kBlockM * sizeof(float);  // + lse, delta

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using PipelineState = cutlass::PipelineState<kStages>;

  struct SharedStorage {
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutK>, 1024> k;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutV>, 1024> v;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> q;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutQ>, 1024> dout;
    alignas(1024) cute::array_aligned<Element, cute::cosize_v<SmemLayoutdS>, 1024> ds;
    alignas(16) float lse[kStages][kBlockM];    // lse_pad and delta of the stage's query block
    alignas(16) float delta[kStages][kBlockM];
    typename Pipeline::SharedStorage pipe_qdo;
    cutlass::arch::ClusterTransactionBarrier kv_full;
    cutlass::arch::ClusterBarrier kv_empty;
  };
  static constexpr int kSmemBytes = int(sizeof(SharedStorage)) + 1024;

  struct Params {
    TmaQ tma_q, tma_do;
    TmaK tma_k;
    TmaV tma_v;
    BwdParams p;
  };

  static constexpr uint32_t kDsBarrier = 1;  // named barrier of the 256 consumer threads around dS

  static CUTLASS_DEVICE void run(const Params& params, unsigned char* smem_raw) {
    const BwdParams& p = params.p;
    const uint32_t base = cast_smem_ptr_to_uint(smem_raw);
    SharedStorage& ss = *reinterpret_cast<SharedStorage*>(smem_raw + ((1024 - base % 1024) % 1024));
    const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int warpgroup = cutlass::canonical_warp_group_idx();
    const int nkb = (p.Nk + kBlockN - 1) / kBlockN, nmb = (p.Nq + kBlockM - 1) / kBlockM;
    const int kb_begin = split * p.blocks_per_split;
    const int kb_end = kb_begin + p.blocks_per_split < nkb ? kb_begin + p.blocks_per_split : nkb;

    Tensor sK = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutK{});
    Tensor sKt = make_tensor(make_smem_ptr(ss.k.data()), SmemLayoutKt{});
    Tensor sV = make_tensor(make_smem_ptr(ss.v.data()), SmemLayoutV{});
    Tensor sQ = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(ss.q.data()), SmemLayoutQt{});
    Tensor sdO = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutQ{});
    Tensor sdOt = make_tensor(make_smem_ptr(ss.dout.data()), SmemLayoutQt{});
    Tensor sdS = make_tensor(make_smem_ptr(ss.ds.data()), SmemLayoutdS{});

    if (threadIdx.x == 0) {
      cute::prefetch_tma_descriptor(params.tma_q.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_do.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_k.get_tma_descriptor());
      cute::prefetch_tma_descriptor(params.tma_v.get_tma_descriptor());
      ss.kv_full.init(1);
      ss.kv_empty.init(kConsumers);
    }
    typename Pipeline::Params pp;
    pp.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
    pp.is_leader = threadIdx.x == 0;
    pp.num_consumers = kConsumers;
    pp.transaction_bytes = kBytesQdO;
    Pipeline pipe(ss.pipe_qdo, pp, Shape<_1, _1, _1>{});  // initialises the barriers, fence included
    __syncthreads();

    if (warpgroup == 0) {
      cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
      if (threadIdx.x != 0) return;  // the pipeline's leader thread issues every load
      Tensor mQ = params.tma_q.get_tma_tensor(make_shape(p.Nq, p.D, p.H, p.B))(_, _, h, b);
      Tensor mdO = params.tma_do.get_tma_tensor(make_shape(p.Nq, p.D, p.H, p.B))(_, _, h, b);
      Tensor mK = params.tma_k.get_tma_tensor(make_shape(p.Nk, p.D, p.H, p.B))(_, _, h, b);
      Tensor mV = params.tma_v.get_tma_tensor(make_shape(p.Nk, p.D, p.H, p.B))(_, _, h, b);
      auto cq = params.tma_q.get_slice(_0{});
      auto cdo = params.tma_do.get_slice(_0{});
      auto ck = params.tma_k.get_slice(_0{});
      auto cv = params.tma_v.get_slice(_0{});
      Tensor tQg = group_modes<0, 3>(cq.partition_S(local_tile(mQ, TileQ{}, make_coord(_, _0{}))));  // (TMA, m)
      Tensor tQs = group_modes<0, 3>(cq.partition_D(sQ));                                           // (TMA, stage)
      Tensor tdOg = group_modes<0, 3>(cdo.partition_S(local_tile(mdO, TileQ{}, make_coord(_, _0{}))));
      Tensor tdOs = group_modes<0, 3>(cdo.partition_D(sdO));
      Tensor tKg = group_modes<0, 3>(ck.partition_S(local_tile(mK, TileKV{}, make_coord(_, _0{}))));  // (TMA, n)
      Tensor tKs = group_modes<0, 3>(ck.partition_D(sK));
      Tensor tVg = group_modes<0, 3>(cv.partition_S(local_tile(mV, TileKV{}, make_coord(_, _0{}))));
      Tensor tVs = group_modes<0, 3>(cv.partition_D(sV));
      PipelineState write = cutlass::make_producer_start_state<Pipeline>();
      for (int kb = kb_begin; kb < kb_end; ++kb) {
        if (kb > kb_begin) ss.kv_empty.wait((kb - kb_begin - 1) & 1);  // the consumers are done with K, V
        ss.kv_full.arrive_and_expect_tx(kBytesKV);
        copy(params.tma_k.with(reinterpret_cast<uint64_t&>(ss.kv_full), 0), tKg(_, kb), tKs);
        copy(params.tma_v.with(reinterpret_cast<uint64_t&>(ss.kv_full), 0), tVg(_, kb), tVs);
        for (int mb = 0; mb < nmb; ++mb) {
          pipe.producer_acquire(write);
          uint64_t* bar = pipe.producer_get_barrier(write);
          copy(params.tma_q.with(*bar, 0), tQg(_, mb), tQs(_, write.index()));
          copy(params.tma_do.with(*bar, 0), tdOg(_, mb), tdOs(_, write.index()));
          const int64_t row0 = (int64_t(b) * p.H + h) * p.delta_ld + int64_t(mb) * kBlockM;
          SM90_BULK_COPY_G2S::copy(p.lse_pad + row0, bar, ss.lse[write.index()], kBlockM * sizeof(float));
          SM90_BULK_COPY_G2S::copy(p.delta + row0, bar, ss.delta[write.index()], kBlockM * sizeof(float));
          ++write;
        }
      }
      pipe.producer_tail(write);
      return;
    }

    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    const int tidx = threadIdx.x - 128;
    MmaSdP mma_sdp;
    MmadKV mma_dkv;
    MmadQ mma_dq;
    auto thr_sdp = mma_sdp.get_thread_slice(tidx);
    auto thr_dkv = mma_dkv.get_thread_slice(tidx);
    auto thr_dq = mma_dq.get_thread_slice(tidx);
    Tensor tSrK = thr_sdp.partition_fragment_A(sK);
    Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);     // (MMA, MMA_N, MMA_K, stages)
    Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
    Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);  // (MMA, MMA_N, MMA_K, stages)
    Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);
    Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
    Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
    Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
    Tensor tdVrdV = partition_fragment_C(mma_dkv, TileKV{});
    Tensor tdKrdK = partition_fragment_C(mma_dkv, TileKV{});
    Tensor tScS = thr_sdp.partition_C(make_identity_tensor(TileSt{}));   // (key, query) of each S^T register
    Tensor tdKcdK = thr_dkv.partition_C(make_identity_tensor(TileKV{}));  // (key, d)
    Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(TileQ{}));    // (query, d)

    const int64_t bh = int64_t(b) * p.H + h;
    float* acc_base = p.dq_acc == nullptr ? nullptr
                                          : p.dq_acc + ((int64_t(split) * p.B * p.H + bh) * p.Nq) * p.D;
    PipelineState read;
    for (int kb = kb_begin; kb < kb_end; ++kb) {
      const int n0 = kb * kBlockN;
      const bool first = kb == kb_begin, direct = kb == kb_end - 1 && p.splits == 1;
      ss.kv_full.wait((kb - kb_begin) & 1);
      clear(tdVrdV);
      clear(tdKrdK);
      for (int mb = 0; mb < nmb; ++mb) {
        const int m0 = mb * kBlockM;
        pipe.consumer_wait(read);
        // S, dP and dQ are fresh fragments in each step, so that they hold registers only while alive
        Tensor tSrS = partition_fragment_C(mma_sdp, TileSt{});
        Tensor tdPrdP = partition_fragment_C(mma_sdp, TileSt{});
        // four wgmma groups, retired in order: S^T, dP^T; P^T from S^T while dP^T runs; dV += P^T dO while
        // dS^T is computed; then dK += dS^T Q
        gemm_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, read.index()), tSrS);
        gemm_issue<true>(mma_sdp, tdPrV, tdPrdO(_, _, _, read.index()), tdPrdP);
        const float* s_lse = ss.lse[read.index()];  // +inf for a row with nothing to attend and past Nq: P = 0
        const float* s_delta = ss.delta[read.index()];
        warpgroup_wait<1>();
        warpgroup_fence_operand(tSrS);
        Tensor rP = make_tensor_like<Element>(tSrS);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tSrS); ++i) {
          const int key = n0 + int(get<0>(tScS(i))), ql = int(get<1>(tScS(i))), query = m0 + ql;
          float x = tSrS(i) * p.scale_log2;
          if (key >= p.Nk)
            x = -INFINITY;
          else if (p.mask.kind != MaskKind::none && query < p.Nq)
            x += mask_term(p.mask, b, h, query, key);
          tSrS(i) = exp2f(x - s_lse[ql]);
          rP(i) = Element(tSrS(i));
        }
        Tensor tdVrP = make_tensor(rP.data(), acc_as_a_operand(tSrS.layout()));
        gemm_issue<false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, read.index()), tdVrdV);
        warpgroup_wait<1>();
        warpgroup_fence_operand(tdPrdP);
        Tensor rdS = make_tensor_like<Element>(tdPrdP);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tdPrdP); ++i) {
          // a softmax over one key is constant: dS = 0 exactly
          const float ds = p.Nk == 1 ? 0.f : tSrS(i) * (tdPrdP(i) - s_delta[int(get<1>(tScS(i)))]);
          rdS(i) = Element(ds);
        }
        Tensor tdKrdS = make_tensor(rdS.data(), acc_as_a_operand(tdPrdP.layout()));
        gemm_issue<false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, read.index()), tdKrdK);
        warpgroup_wait<0>();
        warpgroup_fence_operand(tdVrdV);
        warpgroup_fence_operand(tdKrdK);
        warpgroup_fence_operand(tdVrP);
        warpgroup_fence_operand(tdKrdS);
        pipe.consumer_release(read);
        ++read;

        // dS to shared memory once the previous step's dQ products have read it, then dQ = dS K
        cutlass::arch::NamedBarrier::sync(kConsumers, kDsBarrier);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tScS); ++i) sdS(int(get<1>(tScS(i))), int(get<0>(tScS(i)))) = rdS(i);
        cutlass::arch::fence_view_async_shared();  // the stores are visible to wgmma's reads
        cutlass::arch::NamedBarrier::sync(kConsumers, kDsBarrier);
        Tensor tdQrdQ = partition_fragment_C(mma_dq, TileQ{});
        gemm<true>(mma_dq, tdQrdS, tdQrKt, tdQrdQ);
        CUTLASS_PRAGMA_UNROLL
        for (int i = 0; i < size(tdQrdQ); ++i) {
          const int row = m0 + int(get<0>(tdQcdQ(i))), col = int(get<1>(tdQcdQ(i)));
          if (row >= p.Nq || col >= p.D) continue;
          float v = tdQrdQ(i);
          float* a = acc_base == nullptr ? nullptr : acc_base + int64_t(row) * p.D + col;
          if (!first) v += *a;  // the same thread added the previous key blocks' terms
          if (direct)
            store(p.dq, b, h, row, col, Elem<T>::from_float(v * p.scale));
          else
            *a = v;
        }
      }
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(tdKrdK); ++i) {
        const int row = n0 + int(get<0>(tdKcdK(i))), col = int(get<1>(tdKcdK(i)));
        if (row >= p.Nk || col >= p.D) continue;
        store(p.dk, b, h, row, col, Elem<T>::from_float(tdKrdK(i) * p.scale));
        store(p.dv, b, h, row, col, Elem<T>::from_float(tdVrdV(i)));
      }
      ss.kv_empty.arrive();  // K and V may be overwritten: every product that reads them has completed
    }
  }
};

}  // namespace sm90
}  // namespace attention
}  // namespace fastvit
