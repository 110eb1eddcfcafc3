// The CPU warp emulator (emulate.h) for the embed kernels' block bodies (embed_kernel.h), built by the
// tests into the same library as attention_emulate.cpp: it registers the CUDA embed ops' CPU kernels, so
// that fastvit.csrc.embed (fakes, autograd, fronts) runs the kernels' code on CPU tensors.
#include <torch/library.h>

#include <limits>

#include "embed_ops.h"
#include "emulate.h"

namespace {

namespace O = fastvit::embed_ops;
using at::Tensor;

struct EmuExec {
  int guard(const Tensor&) const { return 0; }  // CPU: no device to make current
  int num_sms() const { return 4; }             // few splits: every split path runs at test sizes

  void check(const char* op, const char* arg, const Tensor& t, const Tensor&) const {
    TORCH_CHECK(t.device().is_cpu(), "fastvit ", op, " (emulated): ", arg, " must be a CPU tensor");
  }

  void fresh(Tensor& t) const { t.fill_(std::numeric_limits<float>::quiet_NaN()); }

  template <class K>
  void run(const K& k) const {
    fastvit::emulate::run_grid(k);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastvit, CPU, m) { O::register_impls<EmuExec>(m); }
