// The CPU warp emulator (emulate.h) for the embed kernels' block bodies (embed_kernel.h), built by the
// tests into the same library as attention_emulate.cpp: it registers the CUDA embed ops' CPU kernels, so
// that fastvit.csrc.embed (fakes, autograd, fronts) runs the kernels' code on CPU tensors.
#include <torch/library.h>

#include "embed_ops.h"
#include "emulate_exec.h"

TORCH_LIBRARY_IMPL(fastvit, CPU, m) { fastvit::embed_ops::register_impls<fastvit::EmuExec>(m); }
