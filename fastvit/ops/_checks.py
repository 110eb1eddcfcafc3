"""Argument checks shared by the op fronts: each error names the argument and what was expected."""

from __future__ import annotations

import numbers

import torch

from fastvit._fx import leaf

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, t, ndim: int | tuple[int, ...] | None, what: str, *, optional: bool = False) -> None:
    """``t`` is a floating tensor of rank ``ndim`` (None: any rank >= 1); ``what`` describes the shape."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if (t.dim() == 0) if ndims is None else (t.dim() not in ndims):
        raise ValueError(f"{name} must be {what}, got shape {tuple(t.shape)}")


def shape(name: str, t: torch.Tensor | None, expected: tuple, what: str = "") -> None:
    """``t.shape == expected`` (None entries match anything)."""
    if t is None:
        return
    if len(t.shape) != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        exp = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {exp}{' ' + what if what else ''}, got {tuple(t.shape)}")


def same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}: all inputs must be on one device")


def same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """GEMM operands share a dtype outside autocast (as F.linear requires)."""
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: outside autocast the GEMM "
                f"operands must share a dtype (cast them, or run under torch.autocast)"
            )


def probability(name: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"{name} must be a float in [0, 1], got {p!r}")
    return float(p)


def positive_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not float(v) > 0.0:
        raise ValueError(f"{name} must be a positive float, got {v!r}")
    return float(v)


def pair(name: str, v, *, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    vals = (v, v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, (tuple, list))
        or len(vals) != 2
        or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) and a >= minimum for a in vals)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


def no_grad_required(name: str, t: torch.Tensor | None, why: str) -> None:
    if t is not None and t.requires_grad:
        raise ValueError(f"{name} must not require grad: {why}")


@leaf
def last_dim(x, size: int, owner: str):
    """``x`` itself, after checking it is a tensor whose last dim is ``size``: a module's input check,
    ``owner`` naming the parameter that sets the width (``"norm1.weight"``). An FX leaf, so a traced
    module keeps it."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != size:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor (..., {size}) to match {owner} ({size} features), got {shape}")
    return x


CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_reason(tensors: dict) -> str | None:
    """Why the CUDA extension's float32 / float16 / bfloat16 kernels cannot take these named tensors
    (None entries skipped), or None when they can."""
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            return f"{name}: the CUDA backend needs CUDA tensors, got one on {t.device}"
        if t.dtype not in CUDA_DTYPES:
            return f"{name}: the CUDA backend takes float32, float16 or bfloat16, got {t.dtype}"
    return None
