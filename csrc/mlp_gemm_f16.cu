// The MLP GEMMs for f16 operands (see mlp_gemm.cuh); one dtype per translation unit.
#include "mlp_gemm.cuh"

template struct fastvit::mlp::detail::Gemm<fastvit::mlp::DType::f16>;
