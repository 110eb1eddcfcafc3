// The split-K rule of the MLP's weight-gradient GEMMs (K = rows), shared word for word with
// kernels/mlp.py's wave_split_k (tests/test_mlp.py compiles this header with g++ and compares).
//
// A dW GEMM of ViT-B (3072 x 768 output, 128 x 128 tiles) has 144 tiles for 132 SMs: unsplit it runs
// 2 waves at 55 % efficiency. Splitting K into s slices makes tiles * s work units; the rule takes the
// smallest s whose wave efficiency, units / (waves * slots), reaches 0.85 (fewest fp32 partials to
// sum), else the most efficient s, with at least 1024 rows per slice and at most 16 slices.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastvit {
namespace mlp {

constexpr int kSplitKMax = 16;
constexpr int64_t kSplitKMinRows = 1024;
constexpr double kSplitKTargetEfficiency = 0.85;

inline double wave_efficiency(int64_t units, int64_t slots) {
  const int64_t waves = (units + slots - 1) / slots;
  return static_cast<double>(units) / static_cast<double>(waves * slots);
}

// tiles: output tiles of the GEMM; K: its reduction length (rows); slots: blocks the GPU runs at once.
inline int wave_split_k(int64_t tiles, int64_t K, int64_t slots) {
  if (tiles <= 0 || slots <= 0) return 1;
  const int64_t most = std::max<int64_t>(1, std::min<int64_t>(kSplitKMax, K / kSplitKMinRows));
  int best = 1;
  double best_eff = wave_efficiency(tiles, slots);
  for (int64_t s = 1; s <= most; ++s) {
    const double eff = wave_efficiency(tiles * s, slots);
    if (eff >= kSplitKTargetEfficiency) return static_cast<int>(s);
    if (eff > best_eff + 1e-9) {
      best = static_cast<int>(s);
      best_eff = eff;
    }
  }
  return best;
}

}  // namespace mlp
}  // namespace fastvit
