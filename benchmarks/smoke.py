"""The smoke mode: every family and a tiny model at tiny shapes, eager against fastvit's fused backends
(on a machine without a GPU: the Triton interpreter on CPU), float32, correctness only — no timings.

A check runs its forward and the backward to every input and parameter three times: the eager
reference in float64 (``ref64``), the eager reference in the test dtype, and each fused backend in the
test dtype (float32 here; ``fastvit-gpu-check``'s parity step runs the same machinery in bf16 and
fp16 at real shapes), from the same draws, rounded to the test dtype. Each output and gradient must
satisfy the project's numerics rule (DESIGN.md, tests/numerics.py):
``max|fused - ref64| <= 2 max|eager - ref64| + 2 eps(dtype) max|ref64|``, NaN never passing; kernel
outputs are NaN-poisoned before they are written, so a missed element fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

Build = Callable[[torch.dtype, str], tuple[Callable[[], torch.Tensor], Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class SmokeCheck:
    """``build(dtype, device)`` returns ``(forward, leaves)``: the computation and the tensors to
    differentiate; it draws its data with :func:`draw` (or seeds modules from the global RNG), so the
    three runs see the same values. ``families``: whose backend selection the fused runs switch
    (default: ``family``)."""

    family: str
    name: str
    shape: dict
    build: Build
    families: tuple[str, ...] = field(default=())


_DRAW_DTYPE = torch.float32  # the test dtype of the checks running now: every draw is rounded to it


def draw(*shape: int, dtype: torch.dtype, device: str, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
    """A leaf drawn in float32 from the global RNG, rounded to the test dtype, then cast to ``dtype``
    (the float64 reference sees exactly the values the test-dtype runs see)."""
    t = (torch.randn(*shape) * scale).to(_DRAW_DTYPE).to(device=device, dtype=dtype)
    return t.requires_grad_(grad)


def _run(check: SmokeCheck, dtype: torch.dtype, device: str, backends: dict[str, str]) -> list[torch.Tensor | None]:
    """[output, grad of each leaf] of one run, seeded so every run draws the same data."""
    import fastvit

    torch.manual_seed(0)
    forward, leaves = check.build(dtype, device)
    with fastvit.use_backend(backends):
        y = forward()
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(_DRAW_DTYPE).to(device=device, dtype=y.dtype)
        grads = torch.autograd.grad(y, list(leaves), g, allow_unused=True)
    return [y.detach(), *grads]


def _compare(fused, eager, ref, dtype: torch.dtype = torch.float32) -> tuple[float, float, str | None]:
    """The max error and tolerance of the output or gradient nearest to failing (largest error over
    tolerance), and its name when it fails (NaN fails)."""
    eps = torch.finfo(dtype).eps
    rows = []
    for i, (f, e, r) in enumerate(zip(fused, eager, ref)):
        if r is None:
            continue
        what = "output" if i == 0 else f"grad {i - 1}"
        if f is None:
            rows.append((math.inf, math.nan, 0.0, f"{what} (missing)"))
            continue
        err = (f.double() - r).abs().max().item() if r.numel() else 0.0
        tol = 2 * (e.double() - r).abs().max().item() + 2 * eps * r.abs().max().item() if r.numel() else 0.0
        ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
        rows.append((math.inf if math.isnan(ratio) else ratio, err, tol, what))
    ratio, err, tol, what = max(rows)
    return err, tol, (what if ratio > 1 else None)


def run_checks(checks: Iterable[SmokeCheck], device: str, progress: Callable = iter,
               dtype: torch.dtype = torch.float32, emit: Callable[[dict], None] | None = None) -> list[dict]:
    """One record per (check, fused backend): max error, tolerance, passed; in ``dtype`` (float32, or
    bf16 / fp16 on a GPU). ``emit`` gets each record the moment it is made."""
    global _DRAW_DTYPE
    from fastvit import _library

    from benchmarks.common import backend_specs

    records: list[dict] = []

    def add(rec: dict) -> None:
        records.append(rec)
        if emit is not None:
            emit(rec)

    name = {torch.float32: "float32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    _library.poison_outputs(True)
    _DRAW_DTYPE = dtype
    try:
        for check in progress(list(checks)):
            fams = check.families or (check.family,)
            eager = dict.fromkeys(fams, "eager")
            base = {"family": check.family, "case": check.name, "shape": check.shape, "dtype": name,
                    "mode": "fwd+bwd", "device": device}
            try:
                ref = _run(check, torch.float64, device, eager)
                ref_e = _run(check, dtype, device, eager)
            except Exception as e:  # noqa: BLE001 -- recorded as a failure, the run goes on
                add({**base, "variant": "eager", "passed": False, "error": f"{type(e).__name__}: {e}"})
                continue
            specs = backend_specs(fams)
            if not specs:
                add({**base, "variant": "-", "passed": True, "note": "no fused backend can run here"})
            for b, spec in specs.items():
                rec = {**base, "variant": f"fastvit[{b}]", "backends": spec}
                try:
                    err, tol, failed = _compare(_run(check, dtype, device, spec), ref_e, ref, dtype)
                    rec.update(max_err=err, tol=tol, passed=failed is None)
                    if failed:
                        rec["error"] = f"{failed} exceeds the tolerance"
                except Exception as e:  # noqa: BLE001
                    rec.update(passed=False, error=f"{type(e).__name__}: {str(e).strip()[:200]}")
                add(rec)
    finally:
        _library.poison_outputs(False)
        _DRAW_DTYPE = torch.float32
    return records

