"""MLP family: LayerNorm, and LayerNorm + Linear + GELU + Linear (+ residual) as one op."""

from __future__ import annotations

import torch

from fastvit import backend, reference
from fastvit._autocast import autocast_dtype, autocast_off, cast
from fastvit.kernels._common import device_ok, dtype_ok
from fastvit._fx import leaf
from fastvit.ops import _checks as check

backend.register("layer_norm", "eager", reference.layer_norm)
backend.register("layernorm_mlp", "eager", reference.layernorm_mlp)

# Triton backend (kernels/mlp.py, imported on first call so that `import fastvit` needs no triton).
_TRITON_MAX_C = 8192  # the LayerNorm kernels keep a row in registers


def _triton_reason(tensors: dict, C: int, widths: tuple[int, ...]) -> str | None:
    for name, t in tensors.items():
        if t is None:
            continue
        reason = device_ok(t) or dtype_ok(t)
        if reason is not None:
            return f"{name}: {reason}"
    if C > _TRITON_MAX_C:
        return f"the Triton LayerNorm takes at most {_TRITON_MAX_C} features, got C = {C}"
    if widths and min(widths) < 1:
        return f"the Triton MLP needs non-empty layers, got widths {widths}"
    return None


def _triton_layer_norm_why_not(x, weight, bias, eps):
    return _triton_reason({"x": x, "weight": weight, "bias": bias}, x.shape[-1], ())


def _triton_layer_norm(x, weight, bias, eps):
    from fastvit.kernels import mlp as kernels

    # The front leaves autocast on for LayerNorm: read its dtype here, outside the op body.
    return kernels.layer_norm(x, weight, bias, eps, autocast_dtype(x) or x.dtype)


def _triton_layernorm_mlp_why_not(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p,
                                  activation="gelu"):
    tensors = {
        "x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias,
        "fc2_weight": fc2_weight, "fc2_bias": fc2_bias, "residual": residual,
    }
    C, hidden, C_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    return _triton_reason(tensors, C, (C, hidden, C_out))


def _triton_layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p,
                          activation="gelu"):
    """Triton LayerNorm-MLP. Dropout is not fused: with dropout_p > 0 this calls the eager reference
    (same meaning, torch's RNG, reproducible under torch.manual_seed); dropout_p == 0 (eval, or no
    dropout) always runs the fused kernels."""
    if dropout_p > 0:
        return reference.layernorm_mlp(
            x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p, activation
        )
    from fastvit.kernels import mlp as kernels

    return kernels.layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual,
                                 activation)


backend.register("layer_norm", "triton", _triton_layer_norm, _triton_layer_norm_why_not)
backend.register("layernorm_mlp", "triton", _triton_layernorm_mlp, _triton_layernorm_mlp_why_not)

# CUDA backend (csrc/mlp.cu through fastvit/csrc/mlp.py, built and loaded on first use by fastvit._ext).
_CUDA_MAX = 2**31 - 1  # CUTLASS problem sizes are int32


def _cuda_layer_norm_why_not(x, weight, bias, eps):
    return check.cuda_reason({"x": x, "weight": weight, "bias": bias})


def _cuda_layer_norm(x, weight, bias, eps):
    if x.shape[-1] == 0:  # no features: nothing to compute, the eager backend's empty result
        return reference.layer_norm(x, weight, bias, eps)
    from fastvit.csrc import mlp as cuda

    return cuda.layer_norm(x, weight, bias, eps, autocast_dtype(x) or x.dtype)


def _cuda_layernorm_mlp_why_not(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p,
                                activation="gelu"):
    reason = check.cuda_reason({
        "x": x, "ln_weight": ln_weight, "ln_bias": ln_bias, "fc1_weight": fc1_weight, "fc1_bias": fc1_bias,
        "fc2_weight": fc2_weight, "fc2_bias": fc2_bias, "residual": residual,
    })
    if reason is not None:
        return reason
    return _cuda_gemm_reason(x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0], fc1_weight.dtype,
                             x.numel() // max(x.shape[-1], 1))


def _cuda_gemm_reason(C: int, hidden: int, C_out: int, dtype: torch.dtype, rows: int) -> str | None:
    """Why the CUDA MLP's tensor-core GEMMs (16-byte aligned rows, int32 sizes) cannot take these sizes."""
    align = 4 if dtype == torch.float32 else 8
    if min(C, hidden, C_out) < 1 or C % align or hidden % align or C_out % align:
        return (f"the CUDA MLP's GEMMs need C, hidden and C_out to be positive multiples of {align} for "
                f"{dtype}, got {C}, {hidden}, {C_out}")
    if rows > _CUDA_MAX:
        return f"the CUDA MLP takes fewer than 2^31 rows, got {rows}"
    return None


def _cuda_layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p,
                        activation="gelu"):
    """CUDA LayerNorm-MLP; like the Triton backend, dropout_p > 0 runs the eager reference (dropout is not fused)."""
    if dropout_p > 0:
        return reference.layernorm_mlp(
            x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p, activation
        )
    from fastvit.csrc import mlp as cuda

    return cuda.layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual,
                              activation)


backend.register("layer_norm", "cuda", _cuda_layer_norm, _cuda_layer_norm_why_not)
backend.register("layernorm_mlp", "cuda", _cuda_layernorm_mlp, _cuda_layernorm_mlp_why_not)


def _check_norm_params(x: torch.Tensor, weight, bias, eps, wname: str, bname: str) -> float:
    C = x.shape[-1]
    check.tensor(wname, weight, 1, f"a 1-D tensor ({C},)", optional=True)
    check.tensor(bname, bias, 1, f"a 1-D tensor ({C},)", optional=True)
    check.shape(wname, weight, (C,), "(x's last dim)")
    check.shape(bname, bias, (C,), "(x's last dim)")
    return check.positive_float("eps", eps)


@leaf
def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dim. x: (..., C), weight, bias: (C,) or None -> x's shape.

    Means ``F.layer_norm(x, (C,), weight, bias, eps)`` with fp32 statistics; the output is in x's
    dtype, or the autocast dtype under autocast.
    """
    check.tensor("x", x, None, "a tensor (..., C) with at least one dim")
    eps = _check_norm_params(x, weight, bias, eps, "weight", "bias")
    check.same_device("x", x, weight=weight, bias=bias)
    # No GEMM operand to cast: autocast stays on and each backend writes the autocast dtype.
    return backend.dispatch("layer_norm", x, weight, bias, eps)


@leaf
def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    activation: str = "gelu",
) -> torch.Tensor:
    """``fc2(drop(act(fc1(layer_norm(x)))))``, then ``drop``, plus ``residual``. x: (..., C) -> (..., C_out).

    fc1_weight: (hidden, C), fc2_weight: (C_out, hidden), LayerNorm with fp32 statistics; ``act`` is
    ``activation``: "gelu" (exact erf, the default), "gelu_tanh" (tanh approximation, SigLIP) or
    "quick_gelu" (``x * sigmoid(1.702 x)``, CLIP). The result is in the GEMM dtype (the autocast dtype, else x's), or in residual's
    dtype when ``residual`` (shape (..., C_out)) is given. ``dropout_p`` applies whenever > 0 (dropout is
    not fused: there the Triton backend runs the eager reference, with torch's RNG).
    """
    check.tensor("x", x, None, "a tensor (..., C) with at least one dim")
    eps = _check_norm_params(x, ln_weight, ln_bias, eps, "ln_weight", "ln_bias")
    check.tensor("fc1_weight", fc1_weight, 2, "a 2-D weight (hidden, C)")
    check.tensor("fc1_bias", fc1_bias, 1, "a 1-D bias (hidden,)", optional=True)
    check.tensor("fc2_weight", fc2_weight, 2, "a 2-D weight (C_out, hidden)")
    check.tensor("fc2_bias", fc2_bias, 1, "a 1-D bias (C_out,)", optional=True)
    C, hidden, C_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    check.shape("fc1_weight", fc1_weight, (hidden, C), "(hidden, x's last dim)")
    check.shape("fc1_bias", fc1_bias, (hidden,))
    check.shape("fc2_weight", fc2_weight, (C_out, hidden), "(C_out, fc1_weight's rows)")
    check.shape("fc2_bias", fc2_bias, (C_out,))
    if residual is not None:
        check.tensor("residual", residual, x.dim(), f"a tensor of the output's shape {(*x.shape[:-1], C_out)}")
        check.shape("residual", residual, (*x.shape[:-1], C_out), "(the output's shape)")
    dropout_p = check.probability("dropout_p", dropout_p)
    if activation not in reference.ACTIVATIONS:
        raise ValueError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")
    check.same_device(
        "x", x, ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight, fc1_bias=fc1_bias,
        fc2_weight=fc2_weight, fc2_bias=fc2_bias, residual=residual,
    )
    dt = autocast_dtype(x)
    if dt is not None:
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = cast(dt, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        check.same_dtype("fc1_weight", fc1_weight, fc2_weight=fc2_weight)
    else:
        check.same_dtype("x", x, fc1_weight=fc1_weight, fc2_weight=fc2_weight)
    with autocast_off(x):
        return backend.dispatch(
            "layernorm_mlp", x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual, dropout_p,
            activation,
        )
