"""The harness every benchmark shares: cases and variants, CUDA-event timing, the GPU's measured peaks,
the environment a result was measured on, and the metrics of one timed variant.

A :class:`Case` is one computation at one shape, dtype and mode (``fwd``, ``fwd+bwd``; ``inference``,
``train`` for models), with the variants that compute it (fastvit on each backend available here, and
the baselines). ``bench_<family>.py`` and ``bench_models.py`` yield cases; ``runner.py`` and
``test_bench.py`` time them; the record of a variant carries its median and p20/p80 milliseconds,
TFLOP/s and GB/s, the percentage of the GPU's measured peak and of the roofline floor, and its ratio
to each baseline.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parent
NOMINAL_H100_SXM = {"bf16_dense_tflops": 989.0, "hbm_tbps": 3.35}
FAMILIES = ("mlp", "attention", "embed", "performer")

Step = Callable[[], object]


@dataclass(frozen=True)
class Variant:
    """One way of computing a case: ``make(inputs)`` returns the step to time.

    ``backends`` is fastvit's backend selection while the variant is built and timed (None: leave
    it as it is, e.g. ``"auto"`` for ``torch.compile`` and ``fastvit.optimize``).
    """

    make: Callable[[Any], Step]
    baseline: bool = False
    backends: Mapping[str, str] | None = None


@dataclass(frozen=True)
class Case:
    """One computation at one shape, dtype and mode, and the variants that compute it.

    ``inputs()`` allocates what all variants share (on the GPU; called once per case). ``flops`` and
    ``bytes`` are per step: the useful math and the least HBM traffic a fused implementation needs
    (the roofline floor is ``max(flops / peak, bytes / bandwidth)``); ``items`` is the images per
    step (models: img/s); ``memory`` asks for peak memory per variant.
    """

    family: str
    name: str
    shape: dict[str, Any]
    dtype: str
    mode: str
    inputs: Callable[[], Any]
    variants: dict[str, Variant]
    flops: float = 0.0
    bytes: float = 0.0
    items: int = 0
    memory: bool = False
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """A stable, filename-safe id: ``mlp-layernorm_mlp-ViT-B-16-bf16-fwd``."""
        return slug(f"{self.family} {self.name} {self.dtype} {self.mode}")


def slug(text: str) -> str:
    """A filename-safe form of ``text``: runs of other characters than letters, digits and ``_.+`` become ``-``."""
    return re.sub(r"[^A-Za-z0-9_.+]+", "-", text).strip("-")


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------


def fused_backends(fn: str) -> list[str]:
    """The fused backends ("cuda", "triton") that implement public function ``fn`` and can run here.

    Read from fastvit's registry at call time, so a backend registered later (e.g. the CUDA
    extension's kernels) is picked up without changes here.
    """
    from fastvit import backend

    return [b for b in backend.implementations(fn) if b != "eager" and backend.availability(b) is None]


def backend_specs(families: Iterable[str] = FAMILIES) -> dict[str, dict[str, str]]:
    """One selection per fused backend available here: every family on that backend where it has a
    kernel, the others on triton. ``{"triton": {...all triton}, "cuda": {"mlp": "cuda", ...: "triton"}}``."""
    from fastvit import backend

    families = tuple(families)
    served = {f: {b for fn in backend.FAMILIES[f] for b in fused_backends(fn)} for f in families}
    specs = {}
    for b in ("triton", "cuda"):
        if any(b in served[f] for f in families):
            specs[b] = {f: b if b in served[f] else "triton" for f in families}
    return specs


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


def cuda_time(step: Step, rep_ms: float = 100.0, min_reps: int = 10, max_reps: int = 1000,
              warmup: int = 3) -> dict[str, float]:
    """Median, p20 and p80 milliseconds of ``step()`` on the GPU: one CUDA-event pair per call,
    synchronised, the L2 cache flushed between calls (as ``triton.testing.do_bench``), after
    ``warmup`` untimed calls (where ``torch.compile`` compiles and Triton autotunes). The number of
    calls is ``rep_ms`` over a first estimate, clamped to [min_reps, max_reps]."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        step()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    n = int(min(max_reps, max(min_reps, rep_ms / estimate)))
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        flush.zero_()
        s.record()
        step()
        e.record()
    torch.cuda.synchronize()
    times = torch.tensor([s.elapsed_time(e) for s, e in events], dtype=torch.float64)
    med, p20, p80 = torch.quantile(times, torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": n}


def peak_memory(step: Step) -> dict[str, float]:
    """GiB allocated at the peak of one ``step()`` (``peak_mem_gib``) and above what was allocated
    before it (``step_mem_gib``: activations and workspace, without parameters and inputs)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_mem_gib": peak / 2**30, "step_mem_gib": (peak - before) / 2**30}


def _matmul_ms(n: int) -> float:
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    return cuda_time(lambda: torch.matmul(a, b, out=c), rep_ms=300)["median_ms"]


def _copy_ms(nbytes: int) -> float:
    x = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    return cuda_time(lambda: y.copy_(x), rep_ms=300)["median_ms"]


def measure_peaks() -> dict[str, float | str]:
    """The GPU's measured peaks, taken once per run: a bf16 8192^3 matmul (TFLOP/s) and a 1 GiB
    device-to-device copy (GB/s, read + write). The H100 SXM's nominal figures are kept beside them."""
    n, nbytes = 8192, 2**30
    out = {
        "matmul": f"bf16 {n}x{n}x{n}",
        "matmul_tflops": 2 * n**3 / (_matmul_ms(n) * 1e-3) / 1e12,
        "copy_gbps": 2 * nbytes / (_copy_ms(nbytes) * 1e-3) / 1e9,
        "nominal_h100_sxm_bf16_tflops": NOMINAL_H100_SXM["bf16_dense_tflops"],
        "nominal_h100_sxm_hbm_tbps": NOMINAL_H100_SXM["hbm_tbps"],
    }
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# One variant -> one record
# ------------------------------------------------------------------------------------------------


def selected(backends: Mapping[str, str] | None):
    """``fastvit.use_backend(backends)`` as a context manager, or nothing when None."""
    if backends is None:
        return contextlib.nullcontext()
    import fastvit

    return fastvit.use_backend(dict(backends))


def case_fields(case: Case) -> dict[str, Any]:
    """The fields every record of ``case`` shares."""
    return {"family": case.family, "case": case.name, "shape": case.shape, "dtype": case.dtype, "mode": case.mode,
            "flops": case.flops, "bytes": case.bytes, **case.notes}


def metrics(case: Case, timing: dict[str, float], peaks: Mapping[str, Any]) -> dict[str, float]:
    """Throughput of one timed variant: TFLOP/s and GB/s, % of the measured matmul peak (MFU for
    models) and of the nominal 989 TFLOP/s, % of the roofline floor (measured peaks), img/s."""
    sec = timing["median_ms"] * 1e-3
    out: dict[str, float] = {}
    if case.flops:
        out["tflops"] = case.flops / sec / 1e12
        out["pct_peak"] = 100 * out["tflops"] / peaks["matmul_tflops"]
        out["pct_nominal_989"] = 100 * out["tflops"] / peaks["nominal_h100_sxm_bf16_tflops"]
    if case.bytes:
        out["gbps"] = case.bytes / sec / 1e9
    if case.flops or case.bytes:
        floor = max(case.flops / (peaks["matmul_tflops"] * 1e12), case.bytes / (peaks["copy_gbps"] * 1e9))
        out["floor_ms"] = floor * 1e3
        out["pct_roofline"] = 100 * floor / sec
    if case.items:
        out["img_per_s"] = case.items / sec
    return out


def run_variant(case: Case, name: str, inputs: Any, peaks: Mapping[str, Any], rep_ms: float = 100.0) -> dict:
    """Build and time one variant of ``case``; a record with its timing and metrics, or its error
    (a backend that cannot serve the shape, out of memory, a compile failure) — never an exception."""
    v = case.variants[name]
    rec = {**case_fields(case), "variant": name, "baseline": v.baseline,
           "backends": dict(v.backends) if v.backends else None}
    try:
        with selected(v.backends):
            step = v.make(inputs)
            t = cuda_time(step, rep_ms=rep_ms)
            if case.memory:
                rec.update(peak_memory(step))
        rec.update(t)
        rec.update(metrics(case, t, peaks))
    except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
        rec["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}"
    finally:
        step = None
        torch.cuda.empty_cache()
    return rec


def add_ratios(records: list[dict]) -> None:
    """Give each record of one case its ratio to each baseline (``x_vs``: baseline -> baseline ms /
    this ms, > 1 is faster) and to the fastest baseline (``x_best_baseline``)."""
    base = {r["variant"]: r["median_ms"] for r in records if r["baseline"] and "median_ms" in r}
    for r in records:
        if "median_ms" not in r:
            continue
        r["x_vs"] = {b: ms / r["median_ms"] for b, ms in base.items() if b != r["variant"]}
        if base:
            best = min(base, key=base.get)
            r["best_baseline"] = best
            r["x_best_baseline"] = base[best] / r["median_ms"]


# ------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=ROOT.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, Any]:
    """What a result was measured on: GPU, driver, torch/triton/CUDA/timm versions, git commit, date."""
    import platform

    env: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "driver": None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": None,
        "timm": None,
        "python": platform.python_version(),
        # FASTVIT_COMMIT (fastvit-gpu-check --commit) names it where the tree is a copy without git history
        "commit": os.environ.get("FASTVIT_COMMIT") or _git("rev-parse", "--short", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    for mod in ("triton", "timm"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if env["gpu"]:
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            env["driver"] = "unknown"
        env["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
    return env


def gpu_slug(env: Mapping[str, Any]) -> str:
    """Results folder name of a GPU: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return slug(env.get("gpu") or "cpu").lower()


def default_out() -> pathlib.Path:
    """``benchmarks/results`` of the checkout this package lives in, else ``./benchmark-results``."""
    if (ROOT.parent / "pyproject.toml").is_file():
        return ROOT / "results"
    return pathlib.Path.cwd() / "benchmark-results"


def markdown_table(rows: list[dict], columns: list[str], headers: list[str] | None = None) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant digits, or whole
    numbers with thousands separators from 1,000 up)."""

    def fmt(v) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e3 else f"{v:,.0f}"  # 2,560 img/s, not 2.56e+03
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers or columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def make_step(forward: Callable[[], torch.Tensor], backward: bool, wrt: Iterable[torch.Tensor] = (),
              grad: torch.Tensor | None = None, autocast: bool = False) -> Step:
    """The step to time: ``forward()`` under ``no_grad`` (inference: no activations saved), or
    ``forward()`` then ``torch.autograd.grad`` of ``wrt`` with output gradient ``grad`` (cast to the output's dtype;
    no ``.grad`` accumulation). ``autocast``: the forward runs under ``torch.autocast("cuda", bfloat16)``."""
    wrt = [t for t in wrt if t.requires_grad]

    def ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    if not backward:
        def step():
            with torch.no_grad(), ctx():
                return forward()
    else:
        def step():
            with ctx():
                y = forward()
            g = grad if grad is None or grad.dtype == y.dtype else grad.to(y.dtype)
            return torch.autograd.grad(y, wrt, g)
    return step
