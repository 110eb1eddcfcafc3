"""DESIGN.md's numerics rule and the inputs it is judged on.

For every output and gradient: ``max|fused - ref64| <= 2 * max|eager - ref64| + 2 * eps(dtype) * max|ref64|``,
where ref64 is fastvit.reference in float64 and eager the same reference in the test dtype. NaN never
passes (kernel outputs are NaN-poisoned by conftest, so an unwritten element fails too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch


def _max_abs(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def assert_numerics(name: str, fused: torch.Tensor, ref64: torch.Tensor, eager: torch.Tensor, dtype: torch.dtype) -> None:
    """Judge ``fused`` by the rule; on failure say how many elements are off, where, and by how much."""
    eager_err = _max_abs(eager.detach().double() - ref64.detach())
    _judge(name, fused, ref64, 2 * eager_err + 2 * torch.finfo(dtype).eps * _max_abs(ref64), eager_err, dtype)


def assert_model_grads(name: str, fused: Mapping[str, torch.Tensor], ref64: Mapping[str, torch.Tensor],
                       eager: Mapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    """The rule for a whole model's parameter gradients, keyed by name.

    One parameter's gradient carries the rounding of the whole backward above it, which the eager model
    samples once per tensor: a 16-element bias can draw an eager error well below what its model's rounding
    does elsewhere. So each tensor's eager error term is at least the eager model's worst relative error
    (over the gradients whose float64 value stands above their float32 error) times the tensor's own scale.
    A gradient that is 0 by a symmetry of the model (a bias on every key, which softmax ignores) is rounding
    noise in float64 and float32 alike; it must stay below that relative error of the model's largest
    gradient. A wrong wiring (a swapped, skipped or doubled op) is off by far more than either.
    """
    assert set(fused) == set(ref64) == set(eager), f"{name}: the three runs have different parameters"
    err = {n: _max_abs(eager[n].detach().double() - ref64[n].detach()) for n in ref64}
    scale = {n: _max_abs(ref64[n]) for n in ref64}
    rel = max((err[n] / scale[n] for n in ref64 if scale[n] > err[n]), default=0.0)
    largest = max(scale.values(), default=0.0)
    eps = torch.finfo(dtype).eps
    for n in ref64:
        if scale[n] > err[n]:
            budget = 2 * max(err[n], rel * scale[n]) + 2 * eps * scale[n]
        else:
            budget = 2 * rel * largest
        _judge(f"{name} grad {n}", fused[n], ref64[n], budget, err[n], dtype)


def _judge(name: str, fused: torch.Tensor, ref64: torch.Tensor, budget: float, eager_err: float,
           dtype: torch.dtype) -> None:
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)}, expected {tuple(ref64.shape)}"
    assert torch.isfinite(ref64).all(), f"{name}: the float64 reference is not finite (broken test input)"
    nan = torch.isnan(fused)
    assert not nan.any(), f"{name}: {int(nan.sum())} of {fused.numel()} elements are NaN (first at {tuple(nan.nonzero()[0].tolist())})"
    fused, ref64 = fused.detach(), ref64.detach()
    err = (fused.double() - ref64).abs()
    if _max_abs(err) > budget:
        bad = err > budget
        worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())} of {err.numel()} elements exceed the budget {budget:.3e}; "
            f"worst at {worst}: got {float(fused[worst]):.6e}, float64 reference {float(ref64[worst]):.6e} "
            f"(error {_max_abs(err):.3e}; same-dtype eager error {eager_err:.3e})"
        )


def randn(*shape, dtype=torch.float32, offset: float = 0.0, scale: float = 1.0, outliers: int = 0) -> torch.Tensor:
    """Normal data in ``dtype``, shifted by ``offset``, with ``outliers`` entries set to +-20 * scale."""
    t = torch.randn(*shape, dtype=torch.float64) * scale + offset
    if outliers:
        idx = torch.randint(0, t.numel(), (outliers,))
        t.view(-1)[idx] = offset + 20 * scale * torch.sign(torch.randn(outliers, dtype=torch.float64))
    return t.to(dtype)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def expanded_grad(shape, dtype, device="cpu") -> torch.Tensor:
    """A stride-0 upstream gradient, as ``out.sum().backward()`` delivers it."""
    return torch.randn((), dtype=dtype, device=device).expand(shape)


def check_against_reference(
    fused_fn: Callable,
    ref_fn: Callable,
    inputs: Mapping[str, object],
    dtype: torch.dtype,
    grad_out: torch.Tensor | None = None,
    name: str = "",
) -> None:
    """Run ``fused_fn(**inputs)``, ``ref_fn`` on float64 copies and ``ref_fn`` on the inputs, forward and
    backward, and judge the output and the gradient of every input that requires grad.

    ``inputs`` are drawn in the test dtype; tensors that require grad are differentiated. The same
    upstream gradient (random in the output dtype unless given) is used for all three runs.
    """

    def prepare(to64: bool):
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                t = v.detach().double() if to64 and v.is_floating_point() else v.detach()
                out[k] = t.requires_grad_(v.requires_grad)
            else:
                out[k] = v
        return out

    runs = {}
    for label, fn, to64 in (("fused", fused_fn, False), ("ref64", ref_fn, True), ("eager", ref_fn, False)):
        args = prepare(to64)
        y = fn(**args)
        if grad_out is None:
            grad_out = torch.randn(y.shape, dtype=y.dtype, device=y.device)
        g = grad_out.double() if to64 else grad_out.to(y.dtype)
        wrt = [k for k, v in args.items() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = torch.autograd.grad(y, [args[k] for k in wrt], g, allow_unused=True) if wrt else ()
        runs[label] = (y, dict(zip(wrt, grads)))

    prefix = f"{name}: " if name else ""
    y, grads = runs["fused"]
    assert_numerics(prefix + "output", y, runs["ref64"][0], runs["eager"][0], dtype)
    for k, g in grads.items():
        g64, ge = runs["ref64"][1][k], runs["eager"][1][k]
        if g64 is None:
            assert g is None or not g.any(), f"{prefix}grad of {k} should be zero"
            continue
        assert g is not None, f"{prefix}no gradient reached {k}"
        assert_numerics(f"{prefix}grad {k}", g, g64, ge, dtype)


def run_without_interpreter(code: str, timeout: float = 300) -> str:
    """Run ``code`` in a fresh Python without TRITON_INTERPRET and return its stdout.

    FakeTensorMode / make_fx of a ``triton_op`` only trace when kernels are not interpreted, so the
    fake implementations and autograd wiring are checked on CPU in a subprocess.
    """
    import os
    import subprocess
    import sys
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextlib.contextmanager
def overridden(mapping: dict, **values):
    """Temporarily update a kernel module's config dict (e.g. interpreter tile sizes); restore it after."""
    before = dict(mapping)
    mapping.update(values)
    try:
        yield
    finally:
        mapping.clear()
        mapping.update(before)
