"""Small facts every Triton launcher needs: interpreter or GPU, and DESIGN.md's TF32 rule."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


AUTOTUNE_MODES = {"full": None, "quick": 2}  # mode -> most configs tried per autotuned kernel (None: all)


def autotune_mode() -> str:
    """``FASTVIT_AUTOTUNE``: ``"full"`` (default) tries every config of an autotuned kernel, ``"quick"`` at
    most the first two (the best guesses come first in every list); read when a kernel's autotuner is
    built, i.e. at its first launch. A short GPU session (``fastvit-gpu-check``) runs ``quick``."""
    mode = os.environ.get("FASTVIT_AUTOTUNE", "full").strip().lower() or "full"
    if mode not in AUTOTUNE_MODES:
        raise ValueError(f"FASTVIT_AUTOTUNE={mode!r}: expected one of {', '.join(AUTOTUNE_MODES)}")
    return mode


def autotune_configs(configs: list) -> list:
    """The autotuning candidates to try under ``FASTVIT_AUTOTUNE``: all of ``configs``, or the first two."""
    most = AUTOTUNE_MODES[autotune_mode()]
    return list(configs) if most is None else list(configs[:most])


def kernel_flags(kernel) -> list[str]:
    """The constexpr parameters of a Triton kernel that are flags, not tile sizes (``BLOCK_*``): each
    changes the compiled kernel, so each belongs in its autotuning key."""
    return [p.name for p in kernel.params if p.is_constexpr and not p.name.startswith("BLOCK_")]


def bucket(n: int) -> int:
    """An autotuning key for a size that follows the batch (rows, K = rows): the next power of two, so a
    new batch size (the last partial batch, evaluation) reuses the tuning of its power-of-two bucket."""
    return 1 << max(4, (max(int(n), 1) - 1).bit_length())


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
