// Embed family, patch_embed: the CUDA instantiations of embed_kernel.h's patch kernels.
//
// Kernel configuration: one for every shape and dtype. GEMM tiles of 64 tokens x 64 outputs x 32
// features, 4 warps of 32 x 32 (2 x 4 mma.sync.m16n8k16 per 16-feature step), the next slice read into
// registers during the MMAs; 10 KiB of shared memory (fp16 / bf16), 18 KiB (fp32). How it was chosen:
// ViT's D (192 to 1280) and K (C p^2 = 588 to 768) are multiples of 64 and 32, the accumulators fit in
// 32 registers per thread, and small tiles keep ViT-B/16's 256 x 196 tokens x 768 outputs at 9408
// blocks; not tuned on a GPU yet (none was at hand), see the README. Row kernels: a warp per token.
#include "device_ctx.cuh"
#include "embed.cuh"

namespace fastvit {
namespace embed {

template <class K>
cudaError_t launch(const K& k, cudaStream_t stream) {
  return launch_kernel(k, stream);
}

#define FV_PATCH_KERNELS(T)                                                    \
  template cudaError_t launch(const PatchStats<T>&, cudaStream_t);             \
  template cudaError_t launch(const PatchFwd<T>&, cudaStream_t);               \
  template cudaError_t launch(const PatchCls<T>&, cudaStream_t);               \
  template cudaError_t launch(const PatchPostNorm<T>&, cudaStream_t);          \
  template cudaError_t launch(const PatchColSum<T>&, cudaStream_t);            \
  template cudaError_t launch(const PatchPostNormBwd<T>&, cudaStream_t);       \
  template cudaError_t launch(const PatchPostNormCols<T>&, cudaStream_t);      \
  template cudaError_t launch(const PatchDw<T>&, cudaStream_t);                \
  template cudaError_t launch(const PatchDwFinish<T>&, cudaStream_t);          \
  template cudaError_t launch(const PatchDx<T>&, cudaStream_t);                \
  template cudaError_t launch(const PatchPreNormDx<T>&, cudaStream_t);

FV_PATCH_KERNELS(float)
FV_PATCH_KERNELS(__half)
FV_PATCH_KERNELS(__nv_bfloat16)

}  // namespace embed
}  // namespace fastvit
