// Embed family: the torch-free CUDA interface. The kernel objects (csrc/embed_kernel.h) carry raw
// pointers and element strides, so NCHW, channels_last and any other view of the image is read in place;
// bindings_embed.cpp fills them from tensors (embed_ops.h). launch(k, stream) runs one kernel object and
// returns cudaSuccess or the first CUDA error; it is instantiated for every kernel and dtype in
// csrc/embed.cu (patch_embed) and csrc/embed_split.cu (soft split).
#pragma once

#include <cuda_runtime.h>

#include "embed_kernel.h"

namespace fastvit {
namespace embed {

template <class K>
cudaError_t launch(const K& k, cudaStream_t stream);

}  // namespace embed
}  // namespace fastvit
