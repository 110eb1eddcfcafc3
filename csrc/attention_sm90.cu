// Attention family, Hopper (sm_90a): the kernels of attention_sm90.cuh (TMA loads, wgmma, warp
// specialisation, written with CuTe), their TMA descriptors, launchers and the dispatch.
//
// Forward: one CTA per (128-query block, h, b), three warpgroups:
//   - warpgroup 0 is the producer: one thread issues TMA loads of the Q tile (once) and of the K and V
//     tiles of every key block into a kStages-deep ring of shared-memory buffers, each guarded by a full /
//     empty mbarrier pair (CUTLASS's PipelineTmaAsync). Its registers go to the consumers (setmaxnreg).
//   - warpgroups 1 and 2 are the consumers, 64 query rows each: S = Q K^T with wgmma, both operands in
//     shared memory (K-major); the online softmax of attention_kernel.h's forward on the accumulator in
//     registers; O += P V with wgmma, P from registers (RS) and V read from shared memory as an MN-major
//     B operand, so V is never transposed. Each consumer releases a buffer as soon as its MMA is done.
//     Within a warpgroup the products overlap the softmax as in FlashAttention-3: step n issues S_n = Q K_n^T,
//     rescales O while it runs, issues O += P_{n-1} V_{n-1} and starts S_n's softmax while that is in
//     flight (ptxas 13.0 leaves the exponentials after PV's wait: only scaling, masking and the row max overlap).
// Backward: see Bwd in attention_sm90.cuh; attention.cu runs the delta and split-reduction kernels around it.
// TMA reads the (B, H, N, D) and packed (B, N, 3 * H * D) operands in place through their strides and
// fills rows past the sequence end and features past D with zeros, so any D <= 128 that is a multiple of
// 8 (the 16-byte stride rule) runs on the two instantiated head dims (64, 128) without a padded copy. Outputs and the log-sum-exp are written from
// registers through their strides, as the mma.sync kernels do; the numerics (exp2 domain, -inf rows
// giving 0, the lse in base 2, dQ summed in a fixed order) are the same.
//
// Served (serves(), serves_backward()): an sm_90 device, an sm_90a image in the build (FASTVIT_SM90A),
// q, k, v (and do) with unit feature stride, 16-byte aligned starts and 16-byte multiple strides (TMA's
// rules; a stride-0 broadcast is not one; D a multiple of 8), and FASTVIT_ATTENTION_SM90 not set to 0 (the switch that runs
// the mma.sync kernels instead, for comparing the two on one GPU). Neither has run on a GPU yet.
#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>

#include "attention.cuh"
#include "attention_sm90.cuh"
#include "device_ctx.cuh"

namespace fastvit {
namespace attention {
namespace sm90 {
namespace {

// Fwd or Bwd's body as a kernel. Images without sm_90a features never launch it (serves() says no); if
// one ever did, it traps rather than leave the outputs unwritten.
template <class K>
__global__ void __launch_bounds__(K::kThreads, 1) kernel(const __grid_constant__ typename K::Params params) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ __align__(16) unsigned char smem[];
  K::run(params, smem);
#else
  __trap();
#endif
}

// (N, D, H, B) strides of a TMA operand: a size-1 dim (stride 0 in FwdParams) gets the stride a
// contiguous tensor would have, as TMA wants strides that are positive multiples of 16 bytes.
std::array<int64_t, 3> tma_strides(const Operand& g, int N, int H, int B, int D) {
  int64_t sn = g.sn, sh = g.sh, sb = g.sb;
  const int64_t span = std::max({int64_t(D), sn * N, sh * H, sb * B});
  const int64_t fill = (span + 7) / 8 * 8;
  if (N == 1) sn = fill;
  if (H == 1) sh = fill;
  if (B == 1) sb = fill;
  return {sn, sh, sb};
}

bool tma_ok(const Operand& g, int N, int H, int B) {
  if (!g.vec8 || g.sd != 1) return false;
  const int64_t strides[3] = {g.sn, g.sh, g.sb};
  const int extents[3] = {N, H, B};
  for (int i = 0; i < 3; ++i)
    if (extents[i] > 1 && (strides[i] <= 0 || strides[i] % 8 != 0 || strides[i] >= (int64_t(1) << 38))) return false;
  return true;
}

// A (N, D, H, B) operand as the global tensor its TMA descriptor describes: (N, D, H, B), or with kT
// (V read as V^T) (D, N, H, B).
template <class E, bool kT = false>
auto tma_tensor(const Operand& g, int N, int H, int B, int D) {
  const auto st = tma_strides(g, N, H, B, D);
  const auto ptr = make_gmem_ptr(static_cast<E const*>(g.ptr));
  if constexpr (kT)
    return make_tensor(ptr, make_shape(D, N, H, B), make_stride(_1{}, st[0], st[1], st[2]));
  else
    return make_tensor(ptr, make_shape(N, D, H, B), make_stride(st[0], _1{}, st[1], st[2]));
}

template <class T, int DP>
cudaError_t forward_t(const FwdParams& p, cudaStream_t stream) {
  using K = Fwd<T, DP>;
  using E = typename K::Element;
  const auto mq = tma_tensor<E>(p.q, p.Nq, p.H, p.B, p.D);
  const auto mk = tma_tensor<E>(p.k, p.Nk, p.H, p.B, p.D);
  const auto mvt = tma_tensor<E, true>(p.v, p.Nk, p.H, p.B, p.D);
  typename K::Params params{
      make_tma_copy(SM90_TMA_LOAD{}, mq, typename K::SmemLayoutQ{}, typename K::TileQ{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mk, take<0, 2>(typename K::SmemLayoutK{}), typename K::TileK{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, mvt, take<0, 2>(typename K::SmemLayoutVt{}), typename K::TileVt{}, _1{}), p};
  cudaError_t err = allow_smem<kernel<K>>(K::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned((p.Nq + K::kBlockM - 1) / K::kBlockM), unsigned(p.H), unsigned(p.B));
  kernel<K><<<grid, K::kThreads, K::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

template <class T, int DP>
cudaError_t backward_t(const BwdParams& p, cudaStream_t stream) {
  using K = Bwd<T, DP>;
  using E = typename K::Element;
  const auto mq = tma_tensor<E>(p.q, p.Nq, p.H, p.B, p.D);
  const auto mdo = tma_tensor<E>(p.dout, p.Nq, p.H, p.B, p.D);
  const auto mk = tma_tensor<E>(p.k, p.Nk, p.H, p.B, p.D);
  const auto mv = tma_tensor<E>(p.v, p.Nk, p.H, p.B, p.D);
  const auto q_tile = take<0, 2>(typename K::SmemLayoutQ{});
  typename K::Params params{make_tma_copy(SM90_TMA_LOAD{}, mq, q_tile, typename K::TileQ{}, _1{}),
                            make_tma_copy(SM90_TMA_LOAD{}, mdo, q_tile, typename K::TileQ{}, _1{}),
                            make_tma_copy(SM90_TMA_LOAD{}, mk, typename K::SmemLayoutK{}, typename K::TileKV{}, _1{}),
                            make_tma_copy(SM90_TMA_LOAD{}, mv, typename K::SmemLayoutV{}, typename K::TileKV{}, _1{}),
                            p};
  cudaError_t err = allow_smem<kernel<K>>(K::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<K><<<dim3(unsigned(p.splits), unsigned(p.H), unsigned(p.B)), K::kThreads, K::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

bool device_is_sm90() {
  static int cached[64];  // per device: 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (dev < 0 || dev >= 64) return false;
  if (cached[dev] == 0) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev);
    cached[dev] = major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[dev] == 1;
}

// Read at every call, so that a test can run both forwards in one process.
bool enabled() {
  const char* env = std::getenv("FASTVIT_ATTENTION_SM90");
  return env == nullptr || std::strcmp(env, "0") != 0;
}

// This build and device can run the Hopper kernels, and FASTVIT_ATTENTION_SM90 does not say no.
bool ready() {
#if defined(FASTVIT_SM90A)
  return enabled() && device_is_sm90();
#else
  return false;
#endif
}

}  // namespace

bool serves(const FwdParams& p) {
  return ready() && tma_ok(p.q, p.Nq, p.H, p.B) && tma_ok(p.k, p.Nk, p.H, p.B) && tma_ok(p.v, p.Nk, p.H, p.B);
}

bool serves_backward(const BwdParams& p) {
  return ready() && tma_ok(p.q, p.Nq, p.H, p.B) && tma_ok(p.dout, p.Nq, p.H, p.B) && tma_ok(p.k, p.Nk, p.H, p.B) &&
         tma_ok(p.v, p.Nk, p.H, p.B);
}

cudaError_t forward(DType t, const FwdParams& p, cudaStream_t stream) {
  return dispatch(t, p.D, [&](auto i) { return forward_t<typename decltype(i)::type, decltype(i)::dp>(p, stream); });
}

cudaError_t backward(DType t, const BwdParams& p, cudaStream_t stream) {
  return dispatch(t, p.D, [&](auto i) { return backward_t<typename decltype(i)::type, decltype(i)::dp>(p, stream); });
}

}  // namespace sm90
}  // namespace attention
}  // namespace fastvit
