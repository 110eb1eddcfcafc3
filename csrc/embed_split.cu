// Embed family, soft split: the CUDA instantiations of embed_kernel.h's unfold / fold kernels, for x's
// dtype T and the LayerNorm's output dtype OT (OT = T, or float16 / bfloat16 from float32 under autocast).
//
// Kernel configuration: memory-bound gathers and scatters, one for every shape. Unfold and fold: a
// thread per element (fold: per pixel, in dx's memory order), grid-stride over at most 8 blocks per SM
// x 132; the LayerNorm rows: a warp per token. Chosen for coalescing along the innermost dim, not tuned
// on a GPU yet (none was at hand).
#include "device_ctx.cuh"
#include "embed.cuh"

namespace fastvit {
namespace embed {

template <class K>
cudaError_t launch(const K& k, cudaStream_t stream) {
  return launch_kernel(k, stream);
}

#define FV_SPLIT_KERNELS(T, OT)                                              \
  template cudaError_t launch(const UnfoldNorm<T, OT>&, cudaStream_t);       \
  template cudaError_t launch(const UnfoldNormRows<T, OT>&, cudaStream_t);   \
  template cudaError_t launch(const UnfoldNormCols<T, OT>&, cudaStream_t);   \
  template cudaError_t launch(const Fold<T, OT>&, cudaStream_t);

template cudaError_t launch(const Unfold<float>&, cudaStream_t);
template cudaError_t launch(const Unfold<__half>&, cudaStream_t);
template cudaError_t launch(const Unfold<__nv_bfloat16>&, cudaStream_t);
FV_SPLIT_KERNELS(float, float)
FV_SPLIT_KERNELS(__half, __half)
FV_SPLIT_KERNELS(__nv_bfloat16, __nv_bfloat16)
FV_SPLIT_KERNELS(float, __half)
FV_SPLIT_KERNELS(float, __nv_bfloat16)

}  // namespace embed
}  // namespace fastvit
