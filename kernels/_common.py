"""Small facts every Triton launcher needs: interpreter or GPU, and DESIGN.md's TF32 rule."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: fp32 operands use TF32 only where PyTorch allows it for matmuls."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def device_ok(t: torch.Tensor) -> str | None:
    """None when a Triton kernel can read ``t`` here (CUDA, or CPU under the interpreter), else why not."""
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return None
    return f"Triton kernels need CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}"


def dtype_ok(t: torch.Tensor) -> str | None:
    """None for the dtypes the Triton kernels take (fp16, bf16, fp32), else why not."""
    if t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return None
    return f"Triton kernels take float16, bfloat16 or float32, got {t.dtype}"


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, or the kernel itself under the interpreter.

    Inside a ``triton_op`` every launch goes through wrap_triton so torch.compile can trace it; under
    the interpreter ``triton.jit`` returns an interpreted function that older torch (2.11) refuses
    to wrap, and a direct call runs the same code.
    """
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)
