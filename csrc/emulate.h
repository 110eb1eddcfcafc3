// The CPU warp emulator the tests build (attention_emulate.cpp, embed_emulate.cpp) to run the CUDA
// families' block bodies (attention_kernel.h, embed_kernel.h) on the host, with no GPU.
//
// Each CUDA thread of a block is a coroutine (ucontext) on one OS thread; __syncthreads, the warp
// shuffles, ldmatrix and mma.sync are cooperative barriers, and mma.sync gathers the warp's fragments by the PTX
// ISA's m16n8k16 layouts, multiplies in fp32 and hands each lane its C elements. Shared memory starts
// filled with 0xff bytes (NaN in fp16, bf16 and fp32), so a read of an element nobody wrote shows. A
// barrier that not all threads reach is reported as an error instead of hanging.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernel_common.h"

namespace fastvit {
namespace emulate {

constexpr int kThreads = 128;  // every body of every family runs 4 warps per block
constexpr int kWarps = kThreads / 32;

class Block {
 public:
  explicit Block(int smem_bytes) : smem_(size_t(smem_bytes) + 16, 0xff), stacks_(kThreads) {
    for (auto& s : stacks_) s.resize(kStack);
  }

  // Runs body(cx) on every thread of one block; throws if the threads deadlock on a barrier.
  template <class Body>
  void run(const Body& body);

  unsigned char* smem() { return smem_.data(); }
  int current() const { return current_; }

  void block_barrier() { barrier(block_count_, block_gen_, kThreads); }
  void warp_barrier(int w) { barrier(warp_count_[w], warp_gen_[w], 32); }

  float shfl[kThreads];
  uint32_t frag_a[kThreads][4], frag_b[kThreads][2];
  const uint16_t* rows[kThreads];

 private:
  static constexpr size_t kStack = 256 * 1024;

  void barrier(int& count, unsigned& gen, int size) {
    const unsigned my = gen;
    ++progress_;
    if (++count == size) {
      count = 0;
      ++gen;
      return;
    }
    while (gen == my) swapcontext(&threads_[current_], &scheduler_);
  }

  static void trampoline();

  std::vector<unsigned char> smem_;
  std::vector<std::vector<char>> stacks_;
  ucontext_t scheduler_;
  std::vector<ucontext_t> threads_ = std::vector<ucontext_t>(kThreads);
  std::vector<char> done_ = std::vector<char>(kThreads);
  const std::function<void()>* entry_ = nullptr;
  int current_ = 0;
  uint64_t progress_ = 0;
  int block_count_ = 0;
  unsigned block_gen_ = 0;
  int warp_count_[kWarps] = {};
  unsigned warp_gen_[kWarps] = {};

  static inline thread_local Block* active_ = nullptr;
};

inline void Block::trampoline() {
  Block* self = active_;
  (*self->entry_)();
  self->done_[self->current_] = 1;
  ++self->progress_;
}  // returns to uc_link: the scheduler

template <class T>
float to_float(uint16_t bits) {
  return Elem<T>::to_float(bits);
}

struct HostCtx {
  Block* blk;
  int id;
  int tid() const { return id; }
  void sync() { blk->block_barrier(); }
  unsigned char* smem() { return blk->smem(); }

  float shfl_xor(float v, int m) {
    const int w = id / 32, lane = id % 32;
    blk->shfl[id] = v;
    blk->warp_barrier(w);
    const float r = blk->shfl[w * 32 + (lane ^ m)];
    blk->warp_barrier(w);
    return r;
  }

  // ldmatrix.x4[.trans] by the PTX ISA: matrix i's rows come from lanes 8i .. 8i + 7.
  template <bool kTrans>
  void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
    const int w = id / 32, lane = id % 32, g = lane / 4, t = lane % 4;
    if (reinterpret_cast<uintptr_t>(row) % 16 != 0) throw std::logic_error("ldmatrix: a row address is not 16-byte aligned");
    blk->rows[id] = row;
    blk->warp_barrier(w);
    for (int i = 0; i < 4; ++i) {
      const uint16_t* const* m = &blk->rows[w * 32 + 8 * i];
      const uint16_t lo = kTrans ? m[2 * t][g] : m[g][2 * t], hi = kTrans ? m[2 * t + 1][g] : m[g][2 * t + 1];
      r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    blk->warp_barrier(w);
  }

  template <class T>
  void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const int w = id / 32, lane = id % 32;
    for (int i = 0; i < 4; ++i) blk->frag_a[id][i] = a[i];
    for (int i = 0; i < 2; ++i) blk->frag_b[id][i] = b[i];
    blk->warp_barrier(w);
    float Am[16][16], Bm[16][8];
    for (int L = 0; L < 32; ++L) {
      const int g = L / 4, t = L % 4;
      const uint32_t* fa = blk->frag_a[w * 32 + L];
      const uint32_t* fb = blk->frag_b[w * 32 + L];
      for (int j = 0; j < 2; ++j) {
        const int sh = 16 * j;
        Am[g][2 * t + j] = to_float<T>(uint16_t(fa[0] >> sh));
        Am[g + 8][2 * t + j] = to_float<T>(uint16_t(fa[1] >> sh));
        Am[g][2 * t + 8 + j] = to_float<T>(uint16_t(fa[2] >> sh));
        Am[g + 8][2 * t + 8 + j] = to_float<T>(uint16_t(fa[3] >> sh));
        Bm[2 * t + j][g] = to_float<T>(uint16_t(fb[0] >> sh));
        Bm[2 * t + 8 + j][g] = to_float<T>(uint16_t(fb[1] >> sh));
      }
    }
    const int g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
      float s = d[i];
      for (int k = 0; k < 16; ++k) s += Am[row][k] * Bm[k][col];
      d[i] = s;
    }
    blk->warp_barrier(w);
  }
};

template <class Body>
void Block::run(const Body& body) {
  const std::function<void()> entry = [this, &body] {
    HostCtx cx{this, current_};
    body(cx);
  };
  entry_ = &entry;
  active_ = this;
  std::fill(smem_.begin(), smem_.end(), 0xff);
  std::fill(done_.begin(), done_.end(), 0);
  block_count_ = 0;
  for (int w = 0; w < kWarps; ++w) warp_count_[w] = 0;
  for (int i = 0; i < kThreads; ++i) {
    getcontext(&threads_[i]);
    threads_[i].uc_stack.ss_sp = stacks_[i].data();
    threads_[i].uc_stack.ss_size = stacks_[i].size();
    threads_[i].uc_link = &scheduler_;
    makecontext(&threads_[i], &Block::trampoline, 0);
  }
  int live = kThreads;
  while (live > 0) {
    const uint64_t before = progress_;
    for (int i = 0; i < kThreads; ++i) {
      if (done_[i]) continue;
      current_ = i;
      swapcontext(&scheduler_, &threads_[i]);
    }
    live = 0;
    for (int i = 0; i < kThreads; ++i) live += !done_[i];
    // Abandoning the suspended coroutines is safe: their stacks hold no objects with destructors.
    if (live > 0 && progress_ == before)
      throw std::runtime_error("fastvit warp emulator: " + std::to_string(live) +
                               " threads wait on a barrier that the others never reach");
  }
}

// Runs a kernel object of embed_kernel.h's form (K::kThreads, k.grid(), k.smem_bytes(), k(cx, x, y, z))
// block by block, in launch order.
template <class K>
void run_grid(const K& k) {
  static_assert(K::kThreads == kThreads, "the emulator runs 128-thread blocks");
  Block blk(k.smem_bytes());
  const auto g = k.grid();
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) blk.run([&](HostCtx& cx) { k(cx, x, y, z); });
}

}  // namespace emulate
}  // namespace fastvit
