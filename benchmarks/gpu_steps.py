"""The steps of ``fastvit-gpu-check`` (``gpu_check.py`` runs them, time-boxed): each ``step_*`` runs on the
GPU and each ``plan_*`` checks the same plumbing on a CPU; both take the run (``gpu_check.Run``) and
return a dict for the step's closing record, emitting their findings as they go."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from benchmarks.common import FAMILIES, ROOT, environment
from benchmarks.parity import GPU_SHAPES, PARITY_BATCH, PLAN_SHAPES, parity_checks

if TYPE_CHECKING:
    from benchmarks.gpu_check import Run

MODEL_BATCH = 256
T2T_BATCH = 64
PERFORMER_BENCH_BATCH = 128  # bench_performer's batch
# every batch the run launches Triton kernels at: the compile-ahead records each (grids and splits depend on it)
COMPILE_BATCHES = (PARITY_BATCH, MODEL_BATCH, T2T_BATCH, PERFORMER_BENCH_BATCH)
BENCH_REP_MS = 40.0  # timed milliseconds per variant (median of at least 10 calls)
PREBUILT = ROOT.parent / ".gpu"  # --prepare's default bundle folder (ignored by git; carried to the GPU machine)


# ------------------------------------------------------------------------------------------------
# Environment and the prebuilt CUDA extension
# ------------------------------------------------------------------------------------------------


def use_prebuilt(bundle: pathlib.Path | None) -> dict:
    """Point fastvit's extension loader at a bundle made by ``--prepare`` (before anything loads it):
    ``TORCH_EXTENSIONS_DIR`` at its build, ``TORCH_CUDA_ARCH_LIST`` at its arches, and, when no CUTLASS is
    installed, ``CUTLASS_PATH`` at its unpacked headers (they are part of the build's hash, and let
    the machine build if the prebuilt library does not load). Returns what it set."""
    if bundle is None or not (bundle / "manifest.json").is_file():
        return {"prebuilt": None}
    manifest = json.loads((bundle / "manifest.json").read_text())
    os.environ["TORCH_EXTENSIONS_DIR"] = str((bundle / "torch_extensions").resolve())
    os.environ["TORCH_CUDA_ARCH_LIST"] = manifest["archs"]
    from fastvit import _ext

    try:
        _ext.cutlass_include()
    except _ext.ExtensionError:
        dest = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / "fastvit-cutlass"
        if not (dest / "include" / "cutlass" / "cutlass.h").exists():
            with tarfile.open(bundle / "cutlass-include.tar.gz") as tar:
                tar.extractall(dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        os.environ["CUTLASS_PATH"] = str(dest)
    return {"prebuilt": str(bundle), "manifest": manifest}


def prepare(bundle: pathlib.Path) -> int:
    """``--prepare``: build the CUDA extension for ``TORCH_CUDA_ARCH_LIST`` (default sm_90a) with this
    torch and toolkit (use the GPU machine's: torch 2.11 + CUDA 13.0) where fastvit always builds it
    (``$TORCH_EXTENSIONS_DIR``; an existing build is reused), copy the library alone into
    ``bundle/torch_extensions/<name>/``, pack the CUTLASS headers beside it, write ``manifest.json``."""
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    import torch

    from fastvit import _ext

    start = time.perf_counter()
    try:
        built = _ext.build()
        _ext.load()
    except _ext.ExtensionError as e:
        print(f"fastvit-gpu-check --prepare: {e}", file=sys.stderr)
        return 1
    if (bundle / "torch_extensions").exists():
        shutil.rmtree(bundle / "torch_extensions")
    lib = bundle.resolve() / "torch_extensions" / built.parent.name / built.name
    lib.parent.mkdir(parents=True)
    shutil.copy2(built, lib)  # the library alone: objects and ninja files are not needed to load it
    include = _ext.cutlass_include()
    with tarfile.open(bundle / "cutlass-include.tar.gz", "w:gz") as tar:
        tar.add(include, arcname="include")
    version = re.findall(r"#define CUTLASS_(MAJOR|MINOR|PATCH) (\d+)", (include / "cutlass" / "version.h").read_text())
    manifest = {"library": str(lib.relative_to(bundle.resolve())), "archs": ";".join(_ext.arch_list()),
                "torch": torch.__version__, "cuda": torch.version.cuda, "nvcc": _ext.cuda_home()[1],
                "cutlass": ".".join(v for _, v in version), "commit": environment()["commit"],
                "built": datetime.datetime.now().isoformat(timespec="seconds")}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 2**20
    print(f"fastvit-gpu-check --prepare: {lib.name} for {manifest['archs']} (torch {manifest['torch']}, nvcc "
          f"{manifest['nvcc']}, CUTLASS {manifest['cutlass']}) in {bundle}: {size:.1f} MiB, "
          f"{time.perf_counter() - start:.0f} s")
    return 0


def ext_state() -> dict:
    from fastvit import _ext

    try:
        name, directory = _ext.build_dir()
        return {"expected": str(directory / f"{name}.so"), "built": _ext.is_built()}
    except _ext.ExtensionError as e:
        return {"expected": None, "built": False, "why": str(e)}


def step_environment(ctx: Run) -> dict:
    import torch

    from benchmarks.common import measure_peaks

    ctx.env = {**environment(), "autotune": os.environ.get("FASTVIT_AUTOTUNE", "full"),
               "sms": torch.cuda.get_device_properties(0).multi_processor_count,
               "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}
    ctx.emit({"kind": "environment", **ctx.env})
    ctx.say(f"{ctx.env['gpu']} (driver {ctx.env['driver']}, {ctx.env['sms']} SMs), torch {ctx.env['torch']}, CUDA "
            f"{ctx.env['cuda']}, triton {ctx.env['triton']}, timm {ctx.env['timm']}, commit {ctx.env['commit']}")
    ctx.peaks = measure_peaks()
    ctx.emit({"kind": "peaks", **ctx.peaks})
    ctx.say(f"measured peaks: {ctx.peaks['matmul_tflops']:.0f} TFLOP/s bf16 matmul, {ctx.peaks['copy_gbps']:.0f} GB/s copy")
    return {"gpu": ctx.env["gpu"]}


def plan_environment(ctx: Run) -> dict:
    ctx.env = {**environment(), "autotune": os.environ.get("FASTVIT_AUTOTUNE", "full")}
    ctx.emit({"kind": "environment", **ctx.env})
    ctx.peaks = {"matmul": "bf16 8192x8192x8192 (plan: not measured)", "matmul_tflops": 1.0, "copy_gbps": 1.0,
                 "nominal_h100_sxm_bf16_tflops": 989.0, "nominal_h100_sxm_hbm_tbps": 3.35}
    ctx.emit({"kind": "peaks", "plan": True, **ctx.peaks})
    return {"gpu": ctx.env["gpu"]}


# ------------------------------------------------------------------------------------------------
# Background work started first: the compile-ahead and, where the prebuilt extension does not load,
# its build. Both are CPU work that overlaps the GPU's measuring.
# ------------------------------------------------------------------------------------------------


class Background:
    """A subprocess started now and joined by a later step; its output goes to a file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: pathlib.Path):
        self.name, self.cmd, self.log = name, cmd, log
        self.started = time.monotonic()
        self._out = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=ROOT.parent)

    def join(self, timeout: float) -> tuple[int | None, str, float]:
        """(return code or None when killed at ``timeout``, its output, seconds since it started)."""
        try:
            rc = self.proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            rc = None
        self._out.close()
        return rc, self.log.read_text(), time.monotonic() - self.started


def scratch(name: str) -> pathlib.Path:
    """A file outside the run folder (only results.jsonl, summary.md and log.txt come back from a GPU run)."""
    import tempfile

    return pathlib.Path(tempfile.mkdtemp(prefix="fastvit-gpu-check-")) / name


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def start_compile_ahead(ctx: Run, batches: tuple[int, ...], list_only: bool = False) -> Background:
    """``python -m benchmarks.compile_ahead`` for this run's shapes, on every core, CUDA hidden from it
    (its pool forks; compiling needs no GPU)."""
    import torch

    arch = "%d%d" % torch.cuda.get_device_capability() if torch.cuda.is_available() else "90"
    sms = str(torch.cuda.get_device_properties(0).multi_processor_count) if torch.cuda.is_available() else "132"
    cmd = [sys.executable, "-m", "benchmarks.compile_ahead", "--arch", arch, "--sms", sms,
           "--batch", *map(str, batches), *(["--list"] if list_only else [])]
    return Background("compile-ahead", cmd, child_env(CUDA_VISIBLE_DEVICES=""), scratch("compile-ahead.log"))


def triton_cache_entries() -> int:
    """Kernels in Triton's cache: their growth during a step counts the JIT's compiles the compile-ahead
    did not cover."""
    try:
        from triton import knobs

        root = pathlib.Path(knobs.cache.dir)
        return sum(1 for _ in root.iterdir()) if root.is_dir() else 0
    except Exception:  # noqa: BLE001 -- an older triton: no count
        return 0


def join_compile_ahead(ctx: Run, job: Background | None, box: float) -> dict:
    if job is None:
        return {"status": "skipped", "error": "not started"}
    rc, out, seconds = job.join(box)
    ctx.log_text(f"--- compile-ahead ({' '.join(job.cmd[1:])})\n{out}")
    lines = out.splitlines()
    failed = [ln for ln in lines if ln.startswith("FAILED")]
    m = re.search(r"recorded (\d+) variants", out)
    done = re.search(r"compiled (\d+) failed (\d+)", out)
    rec = {"variants": int(m.group(1)) if m else 0, "compiled": int(done.group(1)) if done else None,
           "failed": len(failed), "wall_s": round(seconds, 1), "failures": [f[:300] for f in failed[:5]]}
    rec["triton_cache_entries"] = triton_cache_entries()
    if rc is None:
        return {**rec, "status": "timeout", "error": f"killed after {seconds:.0f} s"}
    if rc != 0 or not rec["variants"]:
        return {**rec, "status": "failed", "error": (failed[0] if failed else (lines[-1] if lines else f"exit {rc}"))[:300]}
    return rec


def step_cuda_extension(ctx: Run) -> dict:
    """Load the prebuilt extension; if it does not load, the build started in the background (on all
    cores) is waited for, then loaded."""
    from fastvit import _ext

    state = ext_state()
    start = time.perf_counter()
    build = ctx.ext_build
    if not state["built"] and build is not None:
        rc, out, seconds = build.join(ctx.remaining() - 5)
        ctx.log_text(f"--- CUDA extension build\n{out}")
        state["built_here_s"] = round(seconds, 1)
        if rc != 0:
            return {**state, "status": "failed", "error": f"build {'timed out' if rc is None else 'failed'}: "
                    + (out.strip().splitlines() or ['?'])[-1][:300]}
    try:
        lib = _ext.load(build_if_missing=False)
    except _ext.ExtensionError as e:
        return {**state, "status": "failed", "error": str(e)[:500]}
    return {**state, "library": str(lib), "load_s": round(time.perf_counter() - start, 3)}


def plan_cuda_extension(ctx: Run) -> dict:
    """Without a GPU: the library this configuration would load, and whether it is on disk."""
    state = ext_state()
    if state["expected"] is None:
        return {**state, "status": "skipped", "error": state.get("why", "")[:300]}
    if not state["built"]:
        return {**state, "status": "skipped", "error": "not built here (python -m fastvit.build)"}
    from fastvit import _ext

    _ext.load(build_if_missing=False)  # loads without a GPU: CI checks that it links
    return {**state, "loaded": True}


def _parity(ctx: Run, shapes: dict, dtypes, device: str) -> dict:
    from benchmarks import smoke

    checks = parity_checks(shapes)
    records: list[dict] = []
    for dtype in dtypes:
        records += smoke.run_checks(checks, device, dtype=dtype,
                                    emit=lambda r: ctx.emit({"kind": "parity", **r}))
    failed = [f"{r['case']} {r['dtype']} {r['variant']}: {r.get('error', '')}"[:200] for r in records if not r["passed"]]
    ctx.say(f"parity: {len(records) - len(failed)} passed, {len(failed)} failed" + "".join(f"\n  {f}" for f in failed))
    return {"checks": len(records), "failed": len(failed), **({"status": "failed", "error": failed[0]} if failed else {})}


def step_parity(ctx: Run) -> dict:
    import torch

    return _parity(ctx, GPU_SHAPES, (torch.bfloat16, torch.float16), "cuda")


def plan_parity(ctx: Run) -> dict:
    """The same checks at tiny shapes through the Triton interpreter, in fp16 (the interpreter's tl.dot
    is wrong in bf16: DESIGN.md)."""
    import torch

    torch.set_num_threads(1)
    return _parity(ctx, PLAN_SHAPES, (torch.float16,), "cpu")


# ------------------------------------------------------------------------------------------------
# Timings: op families and models
# ------------------------------------------------------------------------------------------------


def is_compiled(variant: str) -> bool:
    return "compile" in variant


def family_cases(compiled: bool) -> list:
    """The families' ``--quick`` cases (ViT-B/16 and T2T-ViT-14 shapes) with, in tier 1, every variant but
    the torch.compile ones; in tier 2 the torch.compile ones, eager and fastvit's (for the ratios)."""
    from benchmarks.runner import selected_cases

    return [_only(c, lambda v: is_compiled(v) == compiled or (compiled and (v == "eager" or v.startswith("fastvit"))))
            for c in selected_cases(FAMILIES, [], quick=True)]


def model_cases(tier: int) -> list:
    """Tier 1: ViT-B/16 at batch 256, bf16 autocast, inference and training: timm eager, timm + optimize,
    fastvit's model on each backend. Tier 2: the torch.compile variants of the same (with timm eager),
    and T2T-ViT-14's training step at batch 64 against the official formulation."""
    from benchmarks import bench_models

    vit = [c for c in bench_models.cases(models=["vit_base_patch16_224"], batches=[MODEL_BATCH])
           if c.dtype == "bf16 autocast"]
    if tier == 1:
        return [_only(c, lambda v: not is_compiled(v)) for c in vit]
    return [_only(c, lambda v: is_compiled(v) or v == "timm eager") for c in vit]


def t2t_cases() -> list:
    """T2T-ViT-14's training step at batch 64, bf16 autocast: the official formulation, it after
    ``optimize``, fastvit's T2T-ViT on each backend (no compiled variants: each compiles for a minute)."""
    from benchmarks import bench_models

    return [_only(c, lambda v: not is_compiled(v)) for c in bench_models.cases(models=["t2t_vit_14"], batches=[T2T_BATCH])
            if c.dtype == "bf16 autocast" and c.mode == "train"]


def _only(case, keep: Callable[[str], bool]):
    from dataclasses import replace

    return replace(case, variants={k: v for k, v in case.variants.items() if keep(k)})


def time_cases(ctx: Run, cases: list, kind: str) -> dict:
    """Time each case's variants (CUDA events) and emit its records, with their ratios to the baselines,
    once the case is done. When the step's time box cuts a case, what it measured is emitted and the
    cases after it are recorded as not run."""
    import torch

    from benchmarks.common import add_ratios, case_fields, run_variant

    def emit(recs):
        add_ratios(recs)
        for r in recs:
            ctx.emit({"kind": kind, **r})

    done = errors = 0
    for i, case in enumerate(cases):
        recs: list[dict] = []
        inputs = None
        try:
            try:
                inputs = case.inputs()
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: recorded, the run goes on
                ctx.emit({"kind": kind, **case_fields(case), "variant": "-", "baseline": False,
                          "error": f"inputs: {type(e).__name__}: {str(e).strip()[:160]}"})
                errors += 1
                continue
            for name in case.variants:
                recs.append(run_variant(case, name, inputs, ctx.peaks, rep_ms=BENCH_REP_MS))
                errors += "error" in recs[-1]
        except BaseException:  # the step's time box (StepTimeout) or an interrupt: keep what was measured
            emit(recs)
            for rest in cases[i + 1:]:
                ctx.emit({"kind": kind, **case_fields(rest), "variant": "-", "baseline": False,
                          "error": "not run: the step's time box ran out"})
            raise
        finally:
            del inputs
            torch.cuda.empty_cache()
        emit(recs)
        done += 1
        fastest = min((r for r in recs if "median_ms" in r), key=lambda r: r["median_ms"], default=None)
        ctx.say(f"  {case.id}: " + ", ".join(f"{r['variant']} {r['median_ms']:.3g} ms" if "median_ms" in r
                                             else f"{r['variant']} ERROR" for r in recs)
                + (f" (fastest: {fastest['variant']})" if fastest else ""))
    return {"cases": done, "of": len(cases), "variant_errors": errors}


def plan_cases(ctx: Run, cases: list, kind: str) -> dict:
    """Without a GPU: every case builds and names its variants (nothing is allocated or timed)."""
    if not cases or not all(c.variants for c in cases):
        return {"status": "failed", "error": f"{sum(not c.variants for c in cases)} cases without variants"}
    for c in cases:
        ctx.emit({"kind": f"{kind}-plan", "case": c.id, "variants": list(c.variants)})
    return {"cases": len(cases), "variants": sum(len(c.variants) for c in cases)}


# ------------------------------------------------------------------------------------------------
# Tier 2: pytest -m gpu, compute-sanitizer
# ------------------------------------------------------------------------------------------------


GPU_SELECTION = "gpu or edge"  # the gpu tests, and the edge-input test (which covers the cuda backend on a GPU)


def _pytest_counts(text: str) -> dict:
    out = {}
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|error|errors|xfailed|xpassed|deselected)", text):
        out[what.rstrip("s") if what == "errors" else what] = int(n)
    return out


def step_pytest_gpu(ctx: Run) -> dict:
    box = ctx.remaining() - 10
    cmd = [sys.executable, "-m", "pytest", "-m", GPU_SELECTION, "-q", "-p", "no:cacheprovider", "-rfE", "--durations=15"]
    if importlib_available("pytest_timeout"):
        cmd.append("--timeout=120")  # one hung test does not eat the step
    try:
        proc = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, timeout=box, env=child_env())
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        ctx.log_text(f"--- pytest -m gpu (killed after {box:.0f} s)\n{text}")
        return {"status": "timeout", "error": f"killed after {box:.0f} s", **_pytest_counts(text)}
    ctx.log_text(f"--- {' '.join(cmd[1:])}\n{proc.stdout}\n{proc.stderr}")
    counts = _pytest_counts(proc.stdout.splitlines()[-1] if proc.stdout.strip() else "")
    failures = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return {**counts, "failures": failures[:40], "returncode": proc.returncode,
            **({"status": "failed", "error": f"{len(failures)} failed: {', '.join(failures[:3])}"} if proc.returncode else {})}


def plan_pytest_gpu(ctx: Run) -> dict:
    """The ``gpu`` selection collects (its count is what the GPU run should see)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", GPU_SELECTION, "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT.parent, capture_output=True, text=True, timeout=300)
    m = re.search(r"(\d+)/(\d+) tests? collected", proc.stdout) or re.search(r"(\d+) tests? collected", proc.stdout)
    if proc.returncode != 0 or not m or int(m.group(1)) == 0:
        return {"status": "failed", "error": (proc.stdout.strip().splitlines() or [proc.stderr])[-1][:300]}
    return {"collected": int(m.group(1))}


def importlib_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


SANITIZER_TOOLS = {"memcheck": "bf16,fp16,fp32", "racecheck": "bf16"}  # tool -> dtypes (racecheck is slow)


def sanitizer_workload(dtypes: tuple[str, ...] = ("bf16", "fp16", "fp32")) -> None:
    """What compute-sanitizer watches: every CUDA-extension op (LayerNorm and LayerNorm-MLP, forward,
    inference and backward) in ``dtypes``, at 32 x 197 rows (the dW GEMMs' serial split-K, CUTLASS's
    semaphore: the repo's only cross-block ordering) and at a ragged 7-row shape, and a misaligned
    LayerNorm view; the attention ops (fp16 and bf16 only), forward, inference and backward, in the three
    backward plans: N = 197 with a key-padding mask on 8 x 12 heads (2 splits of 2 key blocks: the fp32
    dQ accumulated, then reduced), N = 577 packed at D = 80 with two heads (10 splits), and N = 7 at
    D = 40 (dQ written directly) with a fully masked row and a strided view; the embed ops in ``dtypes``:
    ViT-B/16's patch embedding at batch 4 (dW split over tokens), vit-pytorch's form with both LayerNorms
    on an odd channels_last view (35 x 56, patch 7, C = 4), T2T's first soft split + LayerNorm on a
    37 x 53 image and a soft split of a folded-back 28 x 28 map; the Performer in ``dtypes`` at T2T-ViT-14's
    second layer with dropout and at a ragged 37-token shape, forward, inference and backward."""
    import torch

    import fastvit
    from fastvit import _ext, ops

    _ext.load(build_if_missing=False)
    torch.manual_seed(0)
    with fastvit.use_backend({"mlp": "cuda"}):
        for dtype in (getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[d]) for d in dtypes):
            for rows, C, H in ((32 * 197, 384, 1536), (7, 64, 256)):
                x = torch.randn(rows, C, device="cuda", dtype=dtype, requires_grad=True)
                ps = [torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)
                      for s in ((C,), (C,), (H, C), (H,), (C, H), (C,))]
                ops.layernorm_mlp(x, *ps, eps=1e-6, residual=x).float().sum().backward()
                with torch.no_grad():
                    ops.layernorm_mlp(x, *ps, eps=1e-6)
                ops.layer_norm(x, ps[0], ps[1], 1e-5).float().sum().backward()
            wide = torch.randn(65, 129, device="cuda", dtype=dtype)
            ops.layer_norm(wide[1:, 1:], None, None, 1e-5)  # rows not 16-byte aligned
    with fastvit.use_backend({"attention": "cuda"}):
        for dtype in (getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[d]) for d in dtypes if d != "fp32"):
            q, k, v = (torch.randn(8, 12, 197, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
            keep = torch.rand(8, 1, 1, 197, device="cuda") > 0.3
            ops.attention(q, k, v, mask=keep).float().sum().backward()
            qkv = torch.randn(1, 577, 3 * 2 * 80, device="cuda", dtype=dtype, requires_grad=True)
            ops.attention_qkvpacked(qkv, 2).float().sum().backward()
            with torch.no_grad():
                ops.attention_qkvpacked(qkv, 2)
            dead = torch.ones(2, 3, 7, 7, dtype=torch.bool, device="cuda")
            dead[1, 2, 3] = False
            wide = torch.randn(2, 3, 7, 2 * 40, device="cuda", dtype=dtype)[..., ::2].requires_grad_()
            ops.attention(wide, wide, wide, mask=dead).float().sum().backward()
    with fastvit.use_backend({"embed": "cuda"}):
        for dtype in (getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[d]) for d in dtypes):
            x = torch.randn(4, 3, 224, 224, device="cuda", dtype=dtype, requires_grad=True)
            w = torch.randn(768, 3, 16, 16, device="cuda", dtype=dtype, requires_grad=True)
            b, cls = (torch.randn(768, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
            pos = torch.randn(1, 197, 768, device="cuda", dtype=dtype, requires_grad=True)
            ops.patch_embed(x, w, b, 16, pos, cls).float().sum().backward()
            odd = torch.randn(2, 35, 56, 4, device="cuda", dtype=dtype).permute(0, 3, 1, 2).requires_grad_()
            lin = torch.randn(40, 7 * 7 * 4, device="cuda", dtype=dtype, requires_grad=True)
            pre, post = torch.ones(196, device="cuda", requires_grad=True), torch.ones(40, device="cuda", requires_grad=True)
            ops.patch_embed(odd, lin, None, 7, None, None, patch_order="hwc", pre_norm=True, pre_norm_weight=pre,
                            post_norm=True, post_norm_bias=post).float().sum().backward()
            with torch.no_grad():
                ops.patch_embed(odd, lin, None, 7, None, None, patch_order="hwc", post_norm=True)
            img = torch.randn(2, 3, 37, 53, device="cuda", dtype=dtype, requires_grad=True)
            lw = torch.ones(147, device="cuda", dtype=dtype, requires_grad=True)
            ops.embed.soft_split_layer_norm(img, 7, 4, 2, lw, None).float().sum().backward()
            fmap = torch.randn(2, 784, 64, device="cuda", dtype=dtype).transpose(1, 2).reshape(2, 64, 28, 28)
            ops.soft_split(fmap.requires_grad_(), 3, 2, 1).float().sum().backward()
    with fastvit.use_backend({"performer": "cuda"}):
        for dtype in (getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[d]) for d in dtypes):
            def r(*s, scale=1.0, dt=dtype):
                return (torch.randn(*s, device="cuda") * scale).to(dt).requires_grad_()

            for T, dim, p in ((784, 576, 0.1), (37, 147, 0.0)):  # T2T-ViT-14's second layer; a ragged one
                x = r(4, T, dim)
                args = (r(192, dim, scale=0.5 * dim**-0.5), r(192, scale=0.1), r(32, 64, scale=1.0, dt=torch.float32),
                        r(64, 64, scale=0.125), r(64, scale=0.1))
                ops.performer_attention(x, *args, dropout_p=p).float().sum().backward()
                with torch.no_grad():
                    ops.performer_attention(x, *args)
    torch.cuda.synchronize()
    print("sanitizer workload done")


def step_sanitizer(ctx: Run) -> dict:
    exe = shutil.which("compute-sanitizer") or next(
        (str(p) for p in pathlib.Path("/usr/local/cuda/bin").glob("compute-sanitizer") if p.exists()), None)
    if exe is None:
        return {"status": "skipped", "error": "compute-sanitizer is not installed on this machine"}
    from fastvit import _ext

    if not _ext.is_loaded():
        return {"status": "skipped", "error": "the CUDA extension is not loaded: nothing to check"}
    results = {}
    for tool, dtypes in SANITIZER_TOOLS.items():
        box = min(ctx.remaining() - 5, 150)
        cmd = [exe, "--tool", tool, "--error-exitcode", "86",
               sys.executable, "-m", "benchmarks.gpu_check", "--sanitizer-workload", dtypes]
        try:
            proc = subprocess.run(cmd, cwd=ROOT.parent, capture_output=True, text=True, timeout=box, env=child_env())
        except subprocess.TimeoutExpired:
            results[tool] = {"status": "timeout", "seconds": round(box)}
            continue
        text = proc.stdout + proc.stderr
        ctx.log_text(f"--- compute-sanitizer --tool {tool}\n{text[-20000:]}")
        summary = re.findall(r"ERROR SUMMARY: (\d+) error", text)
        hazards = re.findall(r"RACECHECK SUMMARY: (\d+) hazard", text)
        refused = re.search(r"Device not supported|Unable to|error 999|is not supported", text)
        results[tool] = {"returncode": proc.returncode, "errors": int(summary[-1]) if summary else None,
                         **({"hazards": int(hazards[-1])} if hazards else {}),
                         **({"refused": refused.group(0)} if refused and proc.returncode else {}),
                         "workload_done": "sanitizer workload done" in text}
        ctx.emit({"kind": "sanitizer", "tool": tool, **results[tool]})
    bad = [t for t, r in results.items() if r.get("errors") or r.get("hazards") or r.get("status") == "timeout"
           or (r.get("returncode") and not r.get("refused"))]
    refused = [t for t, r in results.items() if r.get("refused")]
    if bad:
        return {"tools": results, "status": "failed", "error": f"{', '.join(bad)} reported errors"}
    if refused and len(refused) == len(results):
        return {"tools": results, "status": "skipped", "error": f"refused by this machine: {results[refused[0]]['refused']}"}
    return {"tools": results}


def plan_sanitizer(ctx: Run) -> dict:
    exe = shutil.which("compute-sanitizer")
    return {"tools": list(SANITIZER_TOOLS), "compute_sanitizer": exe,
            "command": f"compute-sanitizer --tool TOOL {sys.executable} -m benchmarks.gpu_check --sanitizer-workload DTYPES"}


def step_compile_ahead(ctx: Run) -> dict:
    return join_compile_ahead(ctx, ctx.compile_job, ctx.remaining() - 5)


def plan_compile_ahead(ctx: Run) -> dict:
    rec = join_compile_ahead(ctx, start_compile_ahead(ctx, COMPILE_BATCHES, list_only=True), 120)
    if rec.get("status") is None and rec["variants"] == 0:
        return {**rec, "status": "failed", "error": "the compile-ahead list is empty"}
    return rec
