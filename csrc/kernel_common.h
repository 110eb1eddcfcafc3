// Helpers shared by the block bodies of every CUDA family (attention_kernel.h, embed_kernel.h), which
// compile twice: with nvcc as __device__ code and with the host compiler for the CPU warp emulator
// (emulate.h). Element values travel as raw bits: uint16_t for float16 / bfloat16, float for float32.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define FV_FN __device__ __forceinline__
#else
#define FV_FN inline
#endif

namespace fastvit {

template <class T>
struct Elem;

template <>
struct Elem<__half> {
  using Bits = uint16_t;
  static FV_FN float to_float(uint16_t bits) {
    __half_raw r;
    r.x = bits;
    return __half2float(__half(r));
  }
  static FV_FN uint16_t from_float(float f) { return __half_raw(__float2half_rn(f)).x; }
};

template <>
struct Elem<__nv_bfloat16> {
  using Bits = uint16_t;
  static FV_FN float to_float(uint16_t bits) {
    __nv_bfloat16_raw r;
    r.x = bits;
    return __bfloat162float(__nv_bfloat16(r));
  }
  static FV_FN uint16_t from_float(float f) { return __nv_bfloat16_raw(__float2bfloat16_rn(f)).x; }
};

template <>
struct Elem<float> {
  using Bits = float;
  static FV_FN float to_float(float v) { return v; }
  static FV_FN float from_float(float f) { return f; }
};

// Element i of a T array as float / rounded to T.
template <class T>
FV_FN float load_f(const void* p, int64_t i) {
  return Elem<T>::to_float(static_cast<const typename Elem<T>::Bits*>(p)[i]);
}
template <class T>
FV_FN void store_f(void* p, int64_t i, float v) {
  static_cast<typename Elem<T>::Bits*>(p)[i] = Elem<T>::from_float(v);
}

template <class T>
FV_FN uint32_t pack2(float lo, float hi) {
  return uint32_t(Elem<T>::from_float(lo)) | (uint32_t(Elem<T>::from_float(hi)) << 16);
}

FV_FN void copy16(uint16_t* dst, const uint16_t* src) {
#if defined(__CUDACC__)
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
#else
  std::memcpy(dst, src, 16);
#endif
}

FV_FN void zero16(uint16_t* dst) {
#if defined(__CUDACC__)
  *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
#else
  std::memset(dst, 0, 16);
#endif
}

}  // namespace fastvit
