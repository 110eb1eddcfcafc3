// The emulator's executor of the ops' tensor-side code (attention_ops.h, embed_ops.h, performer_ops.h): CPU
// tensors, every output and workspace NaN-filled, run(k) through the warp emulator (emulate.h). The
// attention emulator extends it with its two launchers and a settable SM count.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "emulate.h"

namespace fastvit {

struct EmuExec {
  int guard(const at::Tensor&) const { return 0; }  // CPU: no device to make current
  int num_sms() const { return 4; }                 // few splits: every split path runs at test sizes

  void check(const char* op, const char* arg, const at::Tensor& t, const at::Tensor&) const {
    TORCH_CHECK(t.device().is_cpu(), "fastvit ", op, " (emulated): ", arg, " must be a CPU tensor");
  }

  void fresh(at::Tensor& t) const { t.fill_(std::numeric_limits<float>::quiet_NaN()); }

  template <class K>
  void run(const K& k) const {
    emulate::run_grid(k);
  }
};

}  // namespace fastvit
