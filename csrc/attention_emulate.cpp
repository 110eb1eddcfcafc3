// The CPU warp emulator (emulate.h) for the attention kernels' block bodies (attention_kernel.h), built by
// the tests (tests/test_attention_cuda.py) as a CPU torch extension with the host compiler: no GPU needed.
//
// The ops run the same tensor-side code as the CUDA ones (attention_ops.h): this library registers the
// CUDA ops' CPU kernels, so that fastvit.csrc.attention (fakes, autograd, fronts) runs on CPU tensors.
#include <torch/library.h>

#include "attention_ops.h"
#include "emulate_exec.h"

namespace {

namespace A = fastvit::attention;
namespace O = fastvit::attention_ops;
using fastvit::emulate::Block;
using fastvit::emulate::HostCtx;
using at::Tensor;

int g_num_sms = 132;

struct EmuExec : fastvit::EmuExec {
  int num_sms() const { return g_num_sms; }
  int smem_per_sm() const { return 228 * 1024; }  // H100 / H200
  bool sm90_backward(const A::BwdParams&) const { return false; }  // TMA and wgmma do not emulate

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
