"""The suite's cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only [--bench-full]``.

One test per (case, variant), the ``--quick`` selection unless ``--bench-full``. pytest-benchmark
times the step in pedantic mode, synchronised (``torch.cuda.synchronize()`` after each call, so wall
time covers the GPU work); the CUDA-event median, p20/p80, TFLOP/s, % of the measured peak and the
environment go to ``extra_info``. Without a GPU every test is skipped with the reason.
"""

from __future__ import annotations

import functools

import pytest
import torch

import benchmarks
from benchmarks.common import case_fields, cuda_time, environment, measure_peaks, metrics, selected
from benchmarks.runner import selected_cases


def pytest_generate_tests(metafunc):
    if {"case", "variant"} <= set(metafunc.fixturenames):
        full = metafunc.config.getoption("--bench-full")
        from benchmarks.bench_models import MODELS
        from benchmarks.common import FAMILIES

        cases = selected_cases(FAMILIES, list(MODELS), quick=not full)
        params = [(c, v) for c in cases for v in c.variants]
        metafunc.parametrize("case,variant", params, ids=[f"{c.id}[{v}]" for c, v in params])


@functools.cache
def _peaks() -> dict:
    return measure_peaks()


@functools.cache
def _environment() -> dict:
    return environment()


def test_bench(benchmark, case, variant):
    if not benchmarks.HAS_GPU:
        pytest.skip("needs a CUDA GPU: GPU timings only (python -m benchmarks runs the CPU smoke mode)")
    v = case.variants[variant]
    inputs = case.inputs()
    with selected(v.backends):
        step = v.make(inputs)
        t = cuda_time(step)

        def synced():
            step()
            torch.cuda.synchronize()

        benchmark.extra_info.update(case_fields(case), variant=variant, baseline=v.baseline, **t,
                                    **metrics(case, t, _peaks()), environment=_environment(), peaks=_peaks())
        benchmark.pedantic(synced, rounds=max(5, min(t["reps"], 50)), warmup_rounds=1, iterations=1)
