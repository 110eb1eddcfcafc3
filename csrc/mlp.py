"""CUDA backend of the MLP family: the Python side of the ops csrc/bindings.cpp registers.

``fastvit::layer_norm_cuda_{fwd,infer,bwd}`` and ``fastvit::layernorm_mlp_cuda_{fwd,infer,bwd}`` have the
schemas of their Triton twins (kernels/mlp.py); this module gives them fake implementations (so
``torch.compile`` and FakeTensorMode see shapes without running kernels) and autograd, and is
imported by ``fastvit._ext.load()`` right after the library is loaded.
"""

from __future__ import annotations

import torch

from fastvit import _ext
from fastvit.reference import ACTIVATIONS
from fastvit._library import FusedOp, get_op, op_name, wire_autograd

_ext.load()  # the ops must exist before their fakes and autograd are registered


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _grad_like(p: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return p.new_empty(p.shape) if p is not None else x.new_empty((0,))


# ---------------------------------------------------------------------------------------------
# layer_norm
# ---------------------------------------------------------------------------------------------


@torch.library.register_fake(op_name("layer_norm", "cuda", "fwd"))
def _layer_norm_fwd_fake(x, weight, bias, eps, out_dtype):
    M = _rows(x)
    stats = x.new_empty((M,), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.register_fake(op_name("layer_norm", "cuda", "infer"))
def _layer_norm_infer_fake(x, weight, bias, eps, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


@torch.library.register_fake(op_name("layer_norm", "cuda", "bwd"))
def _layer_norm_bwd_fake(dy, x, weight, bias, mean, rstd):
    return x.new_empty(x.shape), _grad_like(weight, x), _grad_like(bias, x)


def _layer_norm_backward(saved, grads):
    x, weight, bias, eps, out_dtype = saved.inputs
    _, mean, rstd = saved.outputs
    dx, dw, db = get_op("layer_norm", "cuda", "bwd")(grads[0], x, weight, bias, mean, rstd)
    return dx, dw if weight is not None else None, db if bias is not None else None, None, None


wire_autograd("layer_norm", "cuda", num_outputs=1, backward=_layer_norm_backward)
_layer_norm = FusedOp("layer_norm", "cuda", num_outputs=1)


def layer_norm(x, weight, bias, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm over the last dim in CUDA. x: (..., C), weight/bias (C,) or None -> x's shape in out_dtype."""
    return _layer_norm(x, weight, bias, float(eps), out_dtype)


# ---------------------------------------------------------------------------------------------
# layernorm_mlp
# ---------------------------------------------------------------------------------------------


def _mlp_outputs(x, fc1_weight, fc2_weight, residual):
    C, H, C_out = x.shape[-1], fc1_weight.shape[0], fc2_weight.shape[0]
    gd = fc1_weight.dtype
    out = x.new_empty((*x.shape[:-1], C_out), dtype=residual.dtype if residual is not None else gd)
    return out, _rows(x), C, H, gd


@torch.library.register_fake(op_name("layernorm_mlp", "cuda", "fwd"))
def _layernorm_mlp_fwd_fake(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual,
                            activation=0):
    out, M, C, H, gd = _mlp_outputs(x, fc1_weight, fc2_weight, residual)
    stats = x.new_empty((M,), dtype=torch.float32)
    return (out, x.new_empty((M, C), dtype=gd), x.new_empty((M, H), dtype=gd), x.new_empty((M, H), dtype=gd),
            stats, torch.empty_like(stats))


@torch.library.register_fake(op_name("layernorm_mlp", "cuda", "infer"))
def _layernorm_mlp_infer_fake(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, residual,
                              activation=0):
    return _mlp_outputs(x, fc1_weight, fc2_weight, residual)[0]


@torch.library.register_fake(op_name("layernorm_mlp", "cuda", "bwd"))
def _layernorm_mlp_bwd_fake(dy, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, h, pre, act, mean,
                            rstd, activation=0):
    return (x.new_empty(x.shape), _grad_like(ln_weight, x), _grad_like(ln_bias, x), fc1_weight.new_empty(fc1_weight.shape),
            _grad_like(fc1_bias, x), fc2_weight.new_empty(fc2_weight.shape), _grad_like(fc2_bias, x))


def _layernorm_mlp_backward(saved, grads):
    x, ln_w, ln_b, w1, b1, w2, b2, eps, residual, activation = saved.inputs
    _, h, pre, act, mean, rstd = saved.outputs
    dy = grads[0]
    dx, dlnw, dlnb, dw1, db1, dw2, db2 = get_op("layernorm_mlp", "cuda", "bwd")(
        dy, x, ln_w, ln_b, w1, b1, w2, b2, h, pre, act, mean, rstd, activation
    )

    def opt(g, p):
        return g if p is not None else None

    # d(residual) = d(out): autograd takes the incoming gradient as it is (stride 0 included).
    return (dx, opt(dlnw, ln_w), opt(dlnb, ln_b), dw1, opt(db1, b1), dw2, opt(db2, b2), None,
            dy if residual is not None else None, None)


wire_autograd("layernorm_mlp", "cuda", num_outputs=1, backward=_layernorm_mlp_backward)
_layernorm_mlp = FusedOp("layernorm_mlp", "cuda", num_outputs=1)


def layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps: float, residual=None,
                  activation: str = "gelu"):
    """fc2(act(fc1(LN(x)))) (+ residual) in CUDA, no dropout; ``activation`` one of reference.ACTIVATIONS
    (its index is the ops' code, csrc's mlp::Act). x: (..., C) -> (..., C_out)."""
    return _layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, float(eps), residual,
                          ACTIVATIONS.index(activation))
