// Performer family: defines fastvit::performer_attention_cuda_{fwd,infer,bwd} (the Triton ops' schemas)
// and registers them on the CUDA launchers of performer.cu; the tensor-side work is performer_ops.h's,
// shared with the CPU emulator.
#include <torch/library.h>

#include "cuda_exec.h"
#include "performer_ops.h"

TORCH_LIBRARY_FRAGMENT(fastvit, m) { fastvit::performer_ops::define_ops(m); }

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) { fastvit::performer_ops::register_impls<fastvit::CudaExec>(m); }
