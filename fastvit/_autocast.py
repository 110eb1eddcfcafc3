"""DESIGN.md's autocast rule, shared by fastvit.reference and the op fronts.

Custom ops are not autocast by PyTorch. Under autocast, GEMM operands take the autocast dtype,
LayerNorm takes its input as given (fp32 statistics), the output is in the autocast dtype (or the
residual's), and the computation itself runs with autocast off so that nothing is cast twice.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype for ``x``'s device type, or None when autocast is off there."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast(dtype: torch.dtype | None, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor in ``dtype`` (None entries and a None dtype pass through)."""
    if dtype is None:
        return tensors
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def autocast_off(x: torch.Tensor):
    """A context that disables autocast for ``x``'s device type (a no-op where it was off)."""
    if autocast_dtype(x) is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)
