// Host check of the Hopper attention kernels' fragment-layout assumptions (csrc/attention_sm90.cuh),
// with CuTe's own layouts, for every instantiation and every consumer thread; no GPU needed. The kernel
// assumes that
//   1. register i of S (and of O) lies in row (i / 2) % 2 of the thread's two rows, and registers 0
//      and 2 name them;
//   2. the four threads holding a row are lanes 4g .. 4g + 3 of one warp (the two-step shuffle reduction);
//   3. the S and O registers of all consumer threads cover their tiles exactly once;
//   4. P's registers, re-viewed by acc_as_a_operand, are the A fragment the RS wgmma of O += P V reads:
//      register j of that view holds the (query, key) element that the MMA's A partition puts at j;
//   5. the backward's P^T and dS^T likewise for dV += P^T dO and dK += dS^T Q, and its S^T, dK / dV and
//      dQ fragments cover their tiles once.
// Prints "ok" and exits 0, or prints the first violation and exits 1.
#include <cstdio>
#include <vector>

#include "attention_sm90.cuh"

using namespace cute;
namespace S = fastvit::attention::sm90;

#define CHECK(cond, ...)                                    \
  do {                                                      \
    if (!(cond)) {                                          \
      std::printf("%s D=%d: ", name, DP);                   \
      std::printf(__VA_ARGS__);                             \
      std::printf("\n");                                    \
      return false;                                         \
    }                                                       \
  } while (0)

template <class T, int DP>
bool check(const char* name) {
  using K = S::Fwd<T, DP>;
  typename K::MmaQK mma_qk;
  typename K::MmaPV mma_pv;
  constexpr int M = K::kBlockM, N = K::kBlockN;
  std::vector<int> seen_s(M * N, 0), seen_o(M * DP, 0);
  std::vector<int> row_of_thread(K::kConsumers * 2);
  for (int t = 0; t < K::kConsumers; ++t) {
    auto thr_qk = mma_qk.get_thread_slice(t);
    auto thr_pv = mma_pv.get_thread_slice(t);
    Tensor tSrS = partition_fragment_C(mma_qk, typename K::TileS{});
    Tensor tScS = thr_qk.partition_C(make_identity_tensor(typename K::TileS{}));
    Tensor tOcO = thr_pv.partition_C(make_identity_tensor(typename K::TileO{}));
    CHECK(size(tSrS) == size(tScS), "S registers %d vs coordinates %d", int(size(tSrS)), int(size(tScS)));
    const int rows[2] = {int(get<0>(tScS(0))), int(get<0>(tScS(2)))};
    row_of_thread[2 * t] = rows[0];
    row_of_thread[2 * t + 1] = rows[1];
    for (int i = 0; i < size(tScS); ++i) {
      const int r = get<0>(tScS(i)), c = get<1>(tScS(i));
      CHECK(r == rows[(i / 2) % 2], "thread %d S register %d is in row %d, not %d", t, i, r, rows[(i / 2) % 2]);
      CHECK(tSrS.layout()(i) == i, "S fragment is not compact at %d", i);
      ++seen_s[r * N + c];
    }
    for (int i = 0; i < size(tOcO); ++i) {
      const int r = get<0>(tOcO(i)), c = get<1>(tOcO(i));
      CHECK(r == rows[(i / 2) % 2], "thread %d O register %d is in row %d, not %d", t, i, r, rows[(i / 2) % 2]);
      ++seen_o[r * DP + c];
    }
    // 4: P as the RS wgmma's A operand
    auto p_view = S::acc_as_a_operand(tSrS.layout());
    Tensor tOcP = thr_pv.partition_A(make_identity_tensor(Shape<Int<M>, Int<N>>{}));
    CHECK(size(p_view) == size(tOcP), "P view %d vs A partition %d", int(size(p_view)), int(size(tOcP)));
    CHECK(rank(p_view) == rank(tOcP.layout()), "P view rank differs from the A partition's");
    for (int j = 0; j < size(tOcP); ++j) {
      const int reg = p_view(j);
      const auto want = tOcP(j), got = tScS(reg);
      CHECK(get<0>(want) == get<0>(got) && get<1>(want) == get<1>(got),
            "thread %d A register %d should hold P(%d, %d), holds P(%d, %d)", t, j, int(get<0>(want)),
            int(get<1>(want)), int(get<0>(got)), int(get<1>(got)));
    }
  }
  // 2: a row's threads are one quad of one warp
  for (int t = 0; t < K::kConsumers; ++t)
    for (int m : {1, 2, 3})
      for (int r = 0; r < 2; ++r)
        CHECK(row_of_thread[2 * t + r] == row_of_thread[2 * ((t & ~3) | ((t + m) & 3)) + r],
              "threads %d and %d of a quad hold different rows", t, (t & ~3) | ((t + m) & 3));
  for (int e = 0; e < M * N; ++e) CHECK(seen_s[e] == 1, "S element %d is held %d times", e, seen_s[e]);
  for (int e = 0; e < M * DP; ++e) CHECK(seen_o[e] == 1, "O element %d is held %d times", e, seen_o[e]);
  return true;
}

// Every element of a (M, N) tile held by exactly one of the MMA's threads.
template <class Mma, class Tile>
bool covers_once(const char* name, int DP, const char* what, Tile tile) {
  Mma mma;
  std::vector<int> seen(size(tile), 0);
  for (int t = 0; t < size(mma); ++t) {
    Tensor c = mma.get_thread_slice(t).partition_C(make_identity_tensor(tile));
    for (int i = 0; i < size(c); ++i) ++seen[get<0>(c(i)) + size<0>(tile) * get<1>(c(i))];
  }
  for (int e = 0; e < int(seen.size()); ++e) CHECK(seen[e] == 1, "%s element %d is held %d times", what, e, seen[e]);
  return true;
}

// The backward: S^T / dP^T registers re-viewed by acc_as_a_operand are the A fragments (keys, queries) of
// the RS products dV += P^T dO and dK += dS^T Q; S^T, dK / dV and dQ are covered once.
template <class T, int DP>
bool check_bwd(const char* name) {
  using K = S::Bwd<T, DP>;
  typename K::MmaSdP mma_sdp;
  typename K::MmadKV mma_dkv;
  for (int t = 0; t < K::kConsumers; ++t) {
    Tensor tSrS = partition_fragment_C(mma_sdp, typename K::TileSt{});
    Tensor tScS = mma_sdp.get_thread_slice(t).partition_C(make_identity_tensor(typename K::TileSt{}));
    auto view = S::acc_as_a_operand(tSrS.layout());
    Tensor tAc = mma_dkv.get_thread_slice(t).partition_A(make_identity_tensor(typename K::TileSt{}));
    CHECK(size(view) == size(tAc) && rank(view) == rank(tAc.layout()), "P^T view does not match the A partition");
    for (int i = 0; i < size(tSrS); ++i) CHECK(tSrS.layout()(i) == i, "S^T fragment is not compact at %d", i);
    for (int j = 0; j < size(tAc); ++j) {
      const auto want = tAc(j), got = tScS(view(j));
      CHECK(get<0>(want) == get<0>(got) && get<1>(want) == get<1>(got),
            "thread %d A register %d should hold P^T(%d, %d), holds P^T(%d, %d)", t, j, int(get<0>(want)),
            int(get<1>(want)), int(get<0>(got)), int(get<1>(got)));
    }
  }
  return covers_once<typename K::MmaSdP>(name, DP, "S^T", typename K::TileSt{}) &&
         covers_once<typename K::MmadKV>(name, DP, "dK", typename K::TileKV{}) &&
         covers_once<typename K::MmadQ>(name, DP, "dQ", typename K::TileQ{});
}

int main() {
  const bool ok = check<__half, 64>("f16") && check<__half, 128>("f16") && check<__nv_bfloat16, 64>("bf16") &&
                  check<__nv_bfloat16, 128>("bf16") && check_bwd<__half, 64>("bwd f16") &&
                  check_bwd<__half, 128>("bwd f16") && check_bwd<__nv_bfloat16, 64>("bwd bf16") &&
                  check_bwd<__nv_bfloat16, 128>("bwd bf16");
  std::printf(ok ? "ok\n" : "FAILED\n");
  return ok ? 0 : 1;
}
