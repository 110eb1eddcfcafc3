// Performer family: the CUDA instantiations of performer_kernel.h's kernels.
//
// Kernel configuration, one for every shape and dtype: the projections and the backward's GEMMs are the
// embed family's 64 x 64 x 32 mma.sync tile (fp32 on the CUDA cores); the feature kernels take 16-token
// tiles with the (m, E) matrices in shared memory (T2T-ViT's E = 64, m = 32: 26 KiB forward, 75 KiB for
// the q-side backward) and split each image's tokens over about two blocks per SM. How it was chosen:
// the T2T shapes' sizes and the shared-memory budget (m * E <= 4096), not tuned on a GPU yet.
#include "device_ctx.cuh"
#include "performer.cuh"

namespace fastvit {
namespace performer {

template <class K>
cudaError_t launch(const K& k, cudaStream_t stream) {
  return launch_kernel(k, stream);
}

#define FV_PERFORMER_KERNELS(T)                                  \
  template cudaError_t launch(const Linear<T, true>&, cudaStream_t);  \
  template cudaError_t launch(const Linear<T, false>&, cudaStream_t); \
  template cudaError_t launch(const RowGram<T>&, cudaStream_t);       \
  template cudaError_t launch(const RowSum<T>&, cudaStream_t);        \
  template cudaError_t launch(const KSide<T>&, cudaStream_t);         \
  template cudaError_t launch(const QSide<T>&, cudaStream_t);         \
  template cudaError_t launch(const QBwd<T>&, cudaStream_t);          \
  template cudaError_t launch(const KBwd<T>&, cudaStream_t);

FV_PERFORMER_KERNELS(float)
FV_PERFORMER_KERNELS(__half)
FV_PERFORMER_KERNELS(__nv_bfloat16)

}  // namespace performer
}  // namespace fastvit
