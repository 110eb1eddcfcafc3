"""Compile the Triton kernels for sm_90 (H100) without a GPU, through Triton's whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, ptxas): catches what the CPU interpreter accepts but the compiler does not
(non-constexpr globals, bad layouts, shared-memory overflows).

A test hands :func:`check` a driver script. The script runs in a fresh Python without TRITON_INTERPRET:
it calls :func:`patch_launchers`, imports a kernels module and calls its real launchers on CPU tensors
at real shapes; every launch they make is recorded instead of run (an autotuned kernel: its first
config, or every config with FASTVIT_COMPILE_CHECK=all). The script ends with :func:`compile_all`,
which compiles the distinct variants (kernel, signature, constexprs, 16-divisibility, options) on all
cores and prints one line per variant. The recorder is ``benchmarks/compile_ahead.py``, which
``fastvit-gpu-check`` also uses to fill Triton's cache before a GPU run's first launches.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

OPT_IN = pytest.mark.skipif(
    torch.cuda.is_available() or not os.environ.get("FASTVIT_COMPILE_CHECK"),
    reason="opt-in on CPU machines (FASTVIT_COMPILE_CHECK=1, or =all for every autotune config): "
    "minutes of compiling",
)

from benchmarks.compile_ahead import patch_launchers  # noqa: E402,F401  (the drivers import it from here)
from benchmarks.compile_ahead import compile_all as _compile_all  # noqa: E402


def compile_all() -> None:
    """Compile every recorded variant for sm_90 (one process per core), print a line each, then
    ``compiled N failed F``; exit 1 if any failed."""
    if os.environ.get("FASTVIT_COMPILE_CHECK") == "all":
        import benchmarks.compile_ahead as ca

        ca.EVERY_CONFIG = True
    _, failed = _compile_all(90)
    sys.exit(1 if failed else 0)


def check(driver: str, timeout: float = 3000) -> str:
    """Run ``driver`` (a script as above) without the interpreter; fail with the failing variants' lines."""
    import subprocess
    import textwrap

    env = {**os.environ, "TRITON_INTERPRET": "0"}  # explicit: importing benchmarks would turn it on
    here = os.path.dirname(os.path.abspath(__file__))  # the driver imports this module
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    code = f"from sm90 import patch_launchers, compile_all\npatch_launchers()\n{textwrap.dedent(driver)}\ncompile_all()\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 0, "\n".join(failures) or f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(proc.stdout.splitlines()[-1])  # compiled N failed 0 (pytest -s or -rP shows it)
    print(spill_report(proc.stdout))
    return proc.stdout


def spill_report(log: str) -> str:
    """The variants of a compile log whose stack frame is not empty (at 255 registers: spills), one a line,
    after a count: ``3 of 39 variants spill``."""
    import re

    lines = [ln for ln in log.splitlines() if ln.startswith("ok ")]
    spilling = [ln for ln in lines if (m := re.search(r" regs (\d+) stack (\d+)", ln)) and int(m.group(2)) > 0]
    return "\n".join([f"{len(spilling)} of {len(lines)} variants spill (stack frame > 0)", *spilling])
