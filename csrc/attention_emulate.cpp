// A CPU warp emulator for the attention kernels' block bodies (attention_kernel.h), built by the tests
// (tests/test_attention_cuda.py) as a CPU torch extension with the host compiler: no GPU needed.
//
// Each CUDA thread of a block is a coroutine (ucontext) on one OS thread; __syncthreads, the warp
// shuffles and mma.sync are cooperative barriers, and mma.sync gathers the warp's fragments by the PTX
// ISA's m16n8k16 layouts, multiplies in fp32 and hands each lane its C elements. Shared memory starts
// filled with 0xff bytes (NaN in fp16 and bf16), so a read of an element nobody wrote shows. A barrier
// that not all threads reach is reported as an error instead of hanging.
//
// The ops run the same tensor-side code as the CUDA ones (attention_ops.h): this library registers the
// CUDA ops' CPU kernels, so that fastvit.csrc.attention (fakes, autograd, fronts) runs on CPU tensors.
#include <torch/library.h>
#include <ucontext.h>

#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention_ops.h"

namespace {

namespace A = fastvit::attention;
namespace O = fastvit::attention_ops;
using at::Tensor;

class Block {
 public:
  explicit Block(int smem_bytes) : smem_(size_t(smem_bytes) + 16, 0xff), stacks_(A::kThreads) {
    for (auto& s : stacks_) s.resize(kStack);
  }

  // Runs body(cx) on every thread of one block; throws if the threads deadlock on a barrier.
  template <class Body>
  void run(const Body& body);

  unsigned char* smem() { return smem_.data(); }
  int current() const { return current_; }

  void block_barrier() { barrier(block_count_, block_gen_, A::kThreads); }
  void warp_barrier(int w) { barrier(warp_count_[w], warp_gen_[w], 32); }

  float shfl[A::kThreads];
  uint32_t frag_a[A::kThreads][4], frag_b[A::kThreads][2];

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
  std::vector<ucontext_t> threads_ = std::vector<ucontext_t>(A::kThreads);
  std::vector<char> done_ = std::vector<char>(A::kThreads);
  const std::function<void()>* entry_ = nullptr;
  int current_ = 0;
  uint64_t progress_ = 0;
  int block_count_ = 0;
  unsigned block_gen_ = 0;
  int warp_count_[A::kWarps] = {};
  unsigned warp_gen_[A::kWarps] = {};

  static thread_local Block* active_;
};

thread_local Block* Block::active_ = nullptr;

void Block::trampoline() {
  Block* self = active_;
  (*self->entry_)();
  self->done_[self->current_] = 1;
  ++self->progress_;
}  // returns to uc_link: the scheduler

template <class T>
float to_float(uint16_t bits) {
  return A::Elem<T>::to_float(bits);
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
  for (int w = 0; w < A::kWarps; ++w) warp_count_[w] = 0;
  for (int i = 0; i < A::kThreads; ++i) {
    getcontext(&threads_[i]);
    threads_[i].uc_stack.ss_sp = stacks_[i].data();
    threads_[i].uc_stack.ss_size = stacks_[i].size();
    threads_[i].uc_link = &scheduler_;
    makecontext(&threads_[i], &Block::trampoline, 0);
  }
  int live = A::kThreads;
  while (live > 0) {
    const uint64_t before = progress_;
    for (int i = 0; i < A::kThreads; ++i) {
      if (done_[i]) continue;
      current_ = i;
      swapcontext(&scheduler_, &threads_[i]);
    }
    live = 0;
    for (int i = 0; i < A::kThreads; ++i) live += !done_[i];
    // Abandoning the suspended coroutines is safe: their stacks hold no objects with destructors.
    if (live > 0 && progress_ == before)
      throw std::runtime_error("fastvit attention emulator: " + std::to_string(live) +
                               " threads wait on a barrier that the others never reach");
  }
}

int g_num_sms = 132;

struct EmuExec {
  int guard(const Tensor&) const { return 0; }  // CPU: no device to make current
  int num_sms() const { return g_num_sms; }
  int smem_per_sm() const { return 228 * 1024; }  // H100 / H200

  void check(const char* op, const char* arg, const Tensor& t, const Tensor&) const {
    TORCH_CHECK(t.device().is_cpu(), "fastvit ", op, " (emulated): ", arg, " must be a CPU tensor");
  }

  void fresh(Tensor& t) const { t.fill_(std::numeric_limits<float>::quiet_NaN()); }

  template <class T, int DP>
  void forward_t(const A::FwdParams& p) {
    Block blk(A::fwd_smem_bytes<DP>());
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.H; ++h)
        for (int mb = 0; mb < (p.Nq + A::kBlockM - 1) / A::kBlockM; ++mb)
          blk.run([&](HostCtx& cx) { A::fwd_block<T, DP>(cx, p, mb, h, b); });
  }

  template <class T, int DP>
  void backward_t(const A::BwdParams& p) {
    Block blk(A::bwd_smem_bytes<DP>(p.dq_smem_rows));
    const int64_t rows = int64_t(p.B) * p.H * p.Nq;
    for (int64_t i = 0; i < (rows + A::kWarps - 1) / A::kWarps; ++i)
      blk.run([&](HostCtx& cx) { A::delta_block<T>(cx, p, i); });
    for (int b = 0; b < p.B; ++b)
      for (int h = 0; h < p.H; ++h)
        for (int sp = 0; sp < p.splits; ++sp) blk.run([&](HostCtx& cx) { A::bwd_block<T, DP>(cx, p, sp, h, b); });
    if (p.splits > 1) {
      const int64_t n = rows * p.D;
      for (int64_t i = 0; i < (n + A::kThreads - 1) / A::kThreads; ++i)
        blk.run([&](HostCtx& cx) { A::dq_reduce_block<T>(cx, p, i); });
    }
  }

  void forward(A::DType t, const A::FwdParams& p) {
    const int dp = A::padded_head_dim(p.D);
    if (t == A::DType::f16)
      dp == 64 ? forward_t<__half, 64>(p) : forward_t<__half, 128>(p);
    else
      dp == 64 ? forward_t<__nv_bfloat16, 64>(p) : forward_t<__nv_bfloat16, 128>(p);
  }

  void backward(A::DType t, const A::BwdParams& p) {
    const int dp = A::padded_head_dim(p.D);
    if (t == A::DType::f16)
      dp == 64 ? backward_t<__half, 64>(p) : backward_t<__half, 128>(p);
    else
      dp == 64 ? backward_t<__nv_bfloat16, 64>(p) : backward_t<__nv_bfloat16, 128>(p);
  }
};

int64_t set_num_sms(int64_t n) {
  const int64_t old = g_num_sms;
  g_num_sms = int(n);
  return old;
}

}  // namespace

// The CUDA ops' CPU kernels: loaded after the extension (which defines the ops), by the tests only.
TORCH_LIBRARY_IMPL(fastvit, CPU, m) { O::register_impls<EmuExec>(m); }

// The SM count the backward's split plan assumes (the emulator has none): returns the previous one.
TORCH_LIBRARY(fastvit_emulate, m) { m.def("set_num_sms(int n) -> int", &set_num_sms); }
