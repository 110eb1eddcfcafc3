// Embed family: defines fastvit::patch_embed_cuda_*, soft_split_cuda_* and soft_split_layer_norm_cuda_*
// (the Triton ops' schemas) and registers them on the CUDA launchers of embed.cu and embed_split.cu; the
// tensor-side work is embed_ops.h's, shared with the CPU emulator.
#include <torch/library.h>

#include "cuda_exec.h"
#include "embed_ops.h"

TORCH_LIBRARY_FRAGMENT(fastvit, m) { fastvit::embed_ops::define_ops(m); }

TORCH_LIBRARY_IMPL(fastvit, CUDA, m) { fastvit::embed_ops::register_impls<fastvit::CudaExec>(m); }
