"""The torch.library scheme every fused kernel follows: names, autograd wiring, call.

A public function ``fn`` served by backend ``b`` ("triton" or "cuda") is three ops:

- ``fastvit::<fn>_<b>_fwd(inputs) -> (outputs..., saved...)``: the forward that also returns what
  the backward needs (log-sum-exp, pre-activations, Performer sums). Autograd is registered on it.
- ``fastvit::<fn>_<b>_infer(inputs) -> outputs``: the same forward saving nothing, used when no
  input requires grad (``no_grad``, ``inference_mode``, frozen weights and data).
- ``fastvit::<fn>_<b>_bwd(...)``: the fused backward, called by the autograd formula of ``_fwd``.

The eager backend is plain PyTorch and needs no ops. Triton ops are defined with
``torch.library.triton_op(op_name(fn, "triton", "fwd"), ...)`` and ``wrap_triton``; CUDA ops are
registered from csrc/bindings.cpp under the same names, their fakes from Python. Then
``wire_autograd`` connects ``_fwd`` to ``_bwd`` and ``FusedOp`` picks ``_fwd`` or ``_infer``.
Kernel outputs are allocated with ``new_output``, which the tests make NaN-filled.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

NAMESPACE = "fastvit"
STAGES = ("fwd", "infer", "bwd")

_poison = os.environ.get("FASTVIT_POISON") == "1"


def poison_outputs(enabled: bool = True) -> None:
    """Make :func:`new_output` fill with NaN, so a kernel that misses an element fails the tests."""
    global _poison
    _poison = enabled


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate a kernel output: uninitialised, or NaN-filled while poisoning is on (tests)."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed from torch's generator for ``device`` (reproducible under torch.manual_seed): the
    Philox seed the fused dropouts of both backends take."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def op_name(fn: str, backend: str, stage: str | None = None) -> str:
    """Qualified op name: ``op_name("attention", "triton", "fwd") == "fastvit::attention_triton_fwd"``."""
    if not fn.isidentifier() or not backend.isidentifier():
        raise ValueError(f"fn and backend must be identifiers, got {fn!r}, {backend!r}")
    if stage is not None and stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES} or None, got {stage!r}")
    return f"{NAMESPACE}::{fn}_{backend}" + (f"_{stage}" if stage else "")


def get_op(fn: str, backend: str, stage: str | None = None) -> torch._ops.OpOverload:
    """The registered op (default overload) behind :func:`op_name`."""
    ns, name = op_name(fn, backend, stage).split("::")
    return getattr(getattr(torch.ops, ns), name).default


class SavedContext:
    """What a ``_bwd`` call gets: the ``_fwd`` op's inputs and all its outputs, and which inputs need grad."""

    def __init__(self, inputs: tuple, outputs: tuple, needs_input_grad: tuple[bool, ...]):
        self.inputs = inputs
        self.outputs = outputs
        self.needs_input_grad = needs_input_grad


def wire_autograd(
    fn: str,
    backend: str,
    num_outputs: int,
    backward: Callable[[SavedContext, tuple], Sequence[torch.Tensor | None]],
    save_outputs: bool = False,
) -> None:
    """Register autograd on ``fastvit::<fn>_<backend>_fwd``.

    The ``_fwd`` op's first ``num_outputs`` outputs are the public ones; the rest are saved for the
    backward. The public outputs are saved too only with ``save_outputs=True`` (attention needs O);
    otherwise ``saved.outputs`` holds None in their place, and callers may modify them in place. ``backward(saved, grads)`` gets the gradients of the public outputs (never None) and
    returns one gradient (or None) per ``_fwd`` input, normally by calling the ``_bwd`` op.
    Double backward is not supported and raises.
    """
    name = op_name(fn, backend, "fwd")

    def setup_context(ctx, inputs, output):
        outputs = output if isinstance(output, tuple) else (output,)
        if not save_outputs:
            outputs = (None,) * num_outputs + tuple(outputs[num_outputs:])
        tensor_pos = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in tensor_pos), *outputs)
        non_tensors = tuple(None if isinstance(a, torch.Tensor) else a for a in inputs)
        ctx.fastvit_layout = (non_tensors, tensor_pos, len(outputs))

    def _backward(ctx, *grads):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(f"{name}: double backward is not supported (backward ran with create_graph=True)")
        inputs, tensor_pos, n_out = ctx.fastvit_layout
        saved = ctx.saved_tensors
        inputs = list(inputs)
        for j, i in enumerate(tensor_pos):
            inputs[i] = saved[j]
        outputs = tuple(saved[len(tensor_pos) : len(tensor_pos) + n_out])
        grads = tuple(grads[:num_outputs])
        result = tuple(backward(SavedContext(tuple(inputs), outputs, tuple(ctx.needs_input_grad)), grads))
        if len(result) != len(inputs):
            raise RuntimeError(f"{name}: backward returned {len(result)} gradients for {len(inputs)} inputs")
        return result

    torch.library.register_autograd(name, _backward, setup_context=setup_context)


class FusedOp:
    """Calls ``_fwd`` when a gradient will be needed and ``_infer`` otherwise; returns the public outputs."""

    def __init__(self, fn: str, backend: str, num_outputs: int = 1):
        self.fn, self.backend, self.num_outputs = fn, backend, num_outputs

    def __call__(self, *args):
        needs_grad = torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in args
        )
        if needs_grad:
            out = get_op(self.fn, self.backend, "fwd")(*args)
            out = (out if isinstance(out, tuple) else (out,))[: self.num_outputs]
        else:
            out = get_op(self.fn, self.backend, "infer")(*args)
            out = out if isinstance(out, tuple) else (out,)
        return out[0] if self.num_outputs == 1 else tuple(out)
