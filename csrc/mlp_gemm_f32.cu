// The MLP GEMMs for f32 operands (see mlp_gemm.cuh); one dtype per translation unit.
#include "mlp_gemm.cuh"

template struct fastvit::mlp::detail::Gemm<fastvit::mlp::DType::f32>;
