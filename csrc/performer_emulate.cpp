// The CPU warp emulator (emulate.h) for the performer kernels' block bodies (performer_kernel.h), built by
// the tests into the emulator library: it registers the CUDA performer ops' CPU kernels, so that
// fastvit.csrc.performer (fakes, autograd, fronts) runs the kernels' code on CPU tensors.
#include <torch/library.h>

#include "emulate_exec.h"
#include "performer_ops.h"

TORCH_LIBRARY_IMPL(fastvit, CPU, m) { fastvit::performer_ops::register_impls<fastvit::EmuExec>(m); }
