"""Compile the Triton kernels for sm_90 (H100) without a GPU, through Triton's whole pipeline (TTIR,
TTGIR, LLVM IR, PTX, ptxas): catches what the CPU interpreter accepts but the compiler does not
(non-constexpr globals, bad layouts, shared-memory overflows).

A test hands :func:`check` a driver script. The script runs in a fresh Python without TRITON_INTERPRET:
it calls :func:`patch_launchers`, imports a kernels module and calls its real launchers on CPU tensors
at real shapes; every launch they make is recorded instead of run (an autotuned kernel: its first
config, or every config with FASTVIT_COMPILE_CHECK=all). The script ends with :func:`compile_all`,
which compiles the distinct variants (kernel, signature, constexprs, 16-divisibility, warps, stages)
on all cores and prints one line per variant.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

OPT_IN = pytest.mark.skipif(
    torch.cuda.is_available() or not os.environ.get("FASTVIT_COMPILE_CHECK"),
    reason="opt-in on CPU machines (FASTVIT_COMPILE_CHECK=1, or =all for every autotune config): "
    "minutes of compiling",
)

SM90_MAX_SHARED = 232448  # bytes of shared memory one program may use on an H100 (227 KB)
H100_SMS = 132

_variants: dict[tuple, tuple] = {}  # key -> (kernel, signature, constexprs, attrs, options)


def record(fn, args, kwargs, num_warps: int = 4, num_stages: int = 3) -> None:
    """Specialise a launch's arguments as the JIT would (bools, and ints equal to 1, become constexprs;
    pointers and ints get 16-divisibility attributes) and record the variant to compile."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    names = [p.name for p in fn.params]
    bound = {**dict(zip(names, args)), **kwargs}
    sig, consts, attrs = {}, {}, {}
    for i, (name, p) in enumerate(zip(names, fn.params)):
        v = bound[name]
        if p.is_constexpr or isinstance(v, bool):
            kind, spec = "constexpr", None
        else:
            kind, spec = native_specialize_impl(BaseBackend, v, False, True, True)
        sig[name] = kind
        if kind == "constexpr":
            consts[(i,)] = v if spec is None else spec
        elif spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    key = (fn.fn.__name__, repr(sorted(consts.items())), repr(sig), repr(sorted(attrs.items())), num_warps, num_stages)
    _variants.setdefault(key, (fn, sig, consts, attrs, {"num_warps": num_warps, "num_stages": num_stages}))


class RecordInsteadOfLaunch:
    """Stands in for ``torch.library.wrap_triton(kernel)``: ``[grid](*args, **kwargs)`` records the launch."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        from triton.runtime.autotuner import Autotuner

        def launch(*args, num_warps=4, num_stages=3, **kwargs):
            if isinstance(self.kernel, Autotuner):
                every = os.environ.get("FASTVIT_COMPILE_CHECK") == "all"
                for cfg in self.kernel.configs if every else self.kernel.configs[:1]:
                    record(self.kernel.fn, args, {**kwargs, **cfg.kwargs}, cfg.num_warps, cfg.num_stages)
            else:
                record(self.kernel, args, kwargs, num_warps, num_stages)

        return launch


def patch_launchers() -> None:
    """Launches through ``kernels._common.wrap_triton`` are recorded; a launcher asking for the device's
    properties (SM count) gets an H100's."""
    torch.library.wrap_triton = RecordInsteadOfLaunch
    torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(multi_processor_count=H100_SMS)


def _compile(key) -> str:
    """Compile one recorded variant for sm_90 -> its log line: "ok ..." or "FAILED ...: why"."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts, attrs, options = _variants[key]
    names = [p.name for p in fn.params]
    flags = {names[i[0]]: v for i, v in consts.items() if names[i[0]].isupper() and v is not None}
    what = f"{fn.fn.__name__} {flags} warps {options['num_warps']} stages {options['num_stages']}"
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
        return f"FAILED {what}: {type(e).__name__}: {' | '.join(str(e).strip().splitlines())[-800:]}"
    if k.metadata.shared > SM90_MAX_SHARED:
        return f"FAILED {what}: shared memory {k.metadata.shared} > {SM90_MAX_SHARED}"
    return f"ok {what} smem {k.metadata.shared}"


def compile_all() -> None:
    """Compile every recorded variant (one process per core), print a line each, then
    ``compiled N failed F``; exit 1 if any failed."""
    import multiprocessing

    lines = []
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        for line in pool.imap(_compile, list(_variants)):
            print(line, flush=True)
            lines.append(line)
    failed = sum(line.startswith("FAILED") for line in lines)
    print("compiled", len(lines) - failed, "failed", failed, flush=True)
    sys.exit(1 if failed else 0)


def check(driver: str, timeout: float = 3000) -> str:
    """Run ``driver`` (a script as above) without the interpreter; fail with the failing variants' lines."""
    import subprocess
    import textwrap

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = os.path.dirname(os.path.abspath(__file__))  # the driver imports this module
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    code = f"from sm90 import patch_launchers, compile_all\npatch_launchers()\n{textwrap.dedent(driver)}\ncompile_all()\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    assert proc.returncode == 0, "\n".join(failures) or f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    print(proc.stdout.splitlines()[-1])  # compiled N failed 0 (pytest -s or -rP shows it)
    return proc.stdout
