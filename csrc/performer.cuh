// Performer family: the torch-free CUDA interface. The kernel objects (csrc/performer_kernel.h) carry raw
// pointers and element strides; bindings_performer.cpp fills them from tensors (performer_ops.h).
// launch(k, stream) runs one kernel object and returns cudaSuccess or the first CUDA error; it is
// instantiated for every kernel and dtype in csrc/performer.cu.
#pragma once

#include <cuda_runtime.h>

#include "performer_kernel.h"

namespace fastvit {
namespace performer {

template <class K>
cudaError_t launch(const K& k, cudaStream_t stream);

}  // namespace performer
}  // namespace fastvit
