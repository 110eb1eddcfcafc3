"""``fastvit-gpu-check`` / ``python -m benchmarks.gpu_check``: one prepared command that turns a short GPU
window into evidence.

``--tier 1`` (at most 4 minutes on an H200) and ``--tier 2`` (a second call, at most 9) run time-boxed
steps; each appends what it found the moment it has it to ``results.jsonl`` in the run folder
``<out>/<gpu>/<date>-<commit>/`` (``out`` defaults to ``benchmarks/results``), beside ``summary.md``
(rewritten after every step: the environment on top, the steps, the benchmark targets met / not met,
the parity and timing tables) and ``log.txt`` (everything printed, the compile log and pytest's output
included), so a run killed at its limit still leaves all it did.

Tier 1: the environment (GPU, driver, versions, commit, measured bf16 matmul peak and copy bandwidth);
Triton kernels compiled ahead on every core for the shapes the run launches (``compile_ahead.py``)
while the GPU measures; the CUDA extension loaded (prebuilt, see ``--prepare``; built there only if
the prebuilt one does not load); bf16 and fp16 parity of every op on every backend at ViT-B/16 and
T2T-ViT-14 shapes by the numerics rule; per-family forward and forward + backward timings against
eager and the SDPA backends; the ViT-B/16 training step and inference img/s at batch 256 (bf16
autocast) for timm eager, timm + ``optimize`` and fastvit's model.
Tier 2: ``torch.compile`` baselines and fastvit under compile, ``pytest -m 'gpu or edge'``, compute-sanitizer
memcheck and racecheck of the CUDA ops (recorded as refused where the machine refuses it), and the
T2T-ViT-14 training step against the official formulation.

Autotuning is limited to two configs per kernel (``FASTVIT_AUTOTUNE=quick``, recorded with the
environment) unless ``--autotune full``. ``--plan`` runs on a CPU and checks every step's plumbing;
``--prepare`` builds the CUDA extension bundle to carry to the GPU machine; ``--summarize`` re-renders
a summary from one or more ``results.jsonl``.

This file holds the run (folder, records, time boxes), the step list and the summary; the steps
themselves are in ``gpu_steps.py``, the parity checks in ``parity.py``, the compile-ahead in
``compile_ahead.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import benchmarks  # sets TRITON_INTERPRET without a GPU, before triton is imported
from benchmarks.common import default_out, environment, markdown_table
from benchmarks.gpu_steps import (
    COMPILE_BATCHES, MODEL_BATCH, PREBUILT, T2T_BATCH, Background, child_env, ext_state, family_cases, model_cases,
    plan_cases, plan_compile_ahead, plan_cuda_extension, plan_environment, plan_parity, plan_pytest_gpu, plan_sanitizer,
    prepare, sanitizer_workload, scratch, start_compile_ahead, step_compile_ahead, step_cuda_extension, step_environment,
    step_parity, step_pytest_gpu, step_sanitizer, t2t_cases, time_cases, triton_cache_entries, use_prebuilt,
)

TIER_BUDGET_S = {1: 230.0, 2: 420.0}  # whole-run budgets: tier 1 <= 4 min; tier 2 leaves room in a 15-minute lease


class StepTimeout(BaseException):
    """A step ran past its time box. A BaseException, so the ``except Exception`` that records a failing
    benchmark variant or parity check and goes on does not swallow it."""


# ------------------------------------------------------------------------------------------------
# The run: its folder, results.jsonl, log, summary, time boxes
# ------------------------------------------------------------------------------------------------


class Run:
    """One invocation: appends records to ``results.jsonl`` (flushed and synced at once), tees what it
    prints into ``log.txt``, rewrites ``summary.md`` after every step, and keeps the global deadline."""

    def __init__(self, folder: pathlib.Path, budget_s: float, tier: int | str, plan: bool):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.results = folder / "results.jsonl"
        self.log_path = folder / "log.txt"
        self.summary = folder / "summary.md"
        self._log = self.log_path.open("a")
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.tier, self.plan = tier, plan
        self.records: list[dict] = load_records(self.results) if self.results.exists() else []
        self.step = "-"
        self.env: dict[str, Any] = {}
        self.peaks: dict[str, Any] = {}
        self.compile_job = None  # gpu_steps.Background: the compile-ahead, started before the first step
        self.ext_build = None  # gpu_steps.Background: the CUDA extension's build, when the prebuilt one does not match

    def say(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.start:6.1f}s] {msg}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def log_text(self, text: str) -> None:
        """Raw text (a subprocess's output) into the log only."""
        self._log.write(text if text.endswith("\n") else text + "\n")
        self._log.flush()

    def emit(self, rec: dict) -> dict:
        rec = {"step": self.step, "tier": self.tier, **rec}
        with self.results.open("a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(rec)
        return rec

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write_summary(self) -> None:
        self.summary.write_text(summary_markdown(self.records))


def load_records(*paths: pathlib.Path) -> list[dict]:
    """The records of one or more results.jsonl (a torn last line, from a kill, is skipped)."""
    out = []
    for path in paths:
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


@contextlib.contextmanager
def time_box(seconds: float) -> Iterator[None]:
    """Raise StepTimeout in the main thread after ``seconds`` (SIGALRM: Python code is interrupted at
    the next bytecode; a GPU call in flight finishes first)."""
    if seconds <= 0:
        raise StepTimeout("no time left")
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def fire(*_):
        raise StepTimeout(f"time box of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass(frozen=True)
class Step:
    """A time-boxed step: ``run(ctx)`` on a GPU, ``plan(ctx)`` on a CPU with ``--plan``; each returns a
    dict merged into the step's closing record (``status`` ok / failed / timeout / skipped)."""

    name: str
    tiers: tuple[int, ...]
    budget_s: float
    run: Callable[[Run], dict]
    plan: Callable[[Run], dict]
    what: str


def run_step(ctx: Run, step: Step, reserve_s: float = 0.0) -> dict:
    """Run one step inside min(its budget, what is left of the run's); always emit its closing record."""
    ctx.step = step.name
    box = min(step.budget_s, ctx.remaining() - reserve_s)
    ctx.say(f"step {step.name}: {step.what} (time box {max(box, 0):.0f} s)")
    start = time.monotonic()
    cached = triton_cache_entries()
    result: dict[str, Any] = {}
    try:
        with time_box(box):
            result = (step.plan if ctx.plan else step.run)(ctx) or {}
        status = result.pop("status", "ok")
    except StepTimeout as e:
        status, result = "timeout", {"error": str(e)}
    except Exception as e:  # noqa: BLE001 -- recorded, the run goes on
        status, result = "failed", {"error": f"{type(e).__name__}: {str(e).strip()[:600]}"}
        ctx.log_text(traceback.format_exc())
    job = ctx.compile_job
    compiling = step.name == "compile-ahead" or (job is not None and job.proc.poll() is None)
    jit = {} if ctx.plan or compiling else {"jit_compiles": triton_cache_entries() - cached}
    rec = ctx.emit({"kind": "step", "status": status, "seconds": round(time.monotonic() - start, 2),
                    "budget_s": round(box, 1), **jit, **result})
    ctx.say(f"step {step.name}: {status} in {rec['seconds']:.1f} s"
            + (f" ({rec['error']})" if rec.get("error") else ""))
    ctx.write_summary()
    return rec


# ------------------------------------------------------------------------------------------------
# The steps of each tier
# ------------------------------------------------------------------------------------------------


STEPS = [
    Step("environment", (1, 2), 40, step_environment, plan_environment,
         "GPU, driver, versions, commit; measured bf16 matmul peak and copy bandwidth"),
    Step("cuda-extension", (1, 2), 150, step_cuda_extension, plan_cuda_extension,
         "load the prebuilt CUDA extension (or wait for its build here)"),
    Step("compile-ahead", (1, 2), 120, step_compile_ahead, plan_compile_ahead,
         "wait for the Triton kernels compiled ahead on every core"),
    Step("parity", (1,), 75, step_parity, plan_parity,
         "bf16 and fp16 parity of every op on every backend at ViT-B/16 and T2T-ViT-14 shapes (numerics rule)"),
    Step("ops", (1,), 70, lambda c: time_cases(c, family_cases(False), "bench"),
         lambda c: plan_cases(c, family_cases(False), "bench"),
         "per-family forward and forward+backward timings against eager and the SDPA backends"),
    Step("models", (1,), 70, lambda c: time_cases(c, model_cases(1), "bench"),
         lambda c: plan_cases(c, model_cases(1), "bench"),
         f"ViT-B/16 training step and inference at batch {MODEL_BATCH}, bf16 autocast: timm, timm + optimize, fastvit"),
    Step("compile-models", (2,), 200, lambda c: time_cases(c, model_cases(2), "bench"),
         lambda c: plan_cases(c, model_cases(2), "bench"),
         "torch.compile(timm) and torch.compile(fastvit): ViT-B/16 training and inference"),
    Step("t2t", (2,), 60, lambda c: time_cases(c, t2t_cases(), "bench"), lambda c: plan_cases(c, t2t_cases(), "bench"),
         f"T2T-ViT-14 training step at batch {T2T_BATCH} against the official formulation (bf16 autocast)"),
    Step("sanitizer", (2,), 150, step_sanitizer, plan_sanitizer,
         "compute-sanitizer memcheck and racecheck of the CUDA extension's ops"),
    Step("pytest-gpu", (2,), 240, step_pytest_gpu, plan_pytest_gpu, "pytest -m 'gpu or edge'"),
    Step("compile-ops", (2,), 120, lambda c: time_cases(c, family_cases(True), "bench"),
         lambda c: plan_cases(c, family_cases(True), "bench"), "torch.compile baselines of the op families"),
]


def steps_for(tier: int | None, names: list[str] | None) -> list[Step]:
    """The steps of ``tier`` (None: of every tier, as ``--plan`` checks them), or the ``names`` given."""
    chosen = [s for s in STEPS if tier is None or tier in s.tiers]
    if names:
        unknown = set(names) - {s.name for s in STEPS}
        if unknown:
            raise SystemExit(f"--steps: unknown step(s) {sorted(unknown)}; known: {[s.name for s in STEPS]}")
        chosen = [s for s in STEPS if s.name in names]
    return chosen


# ------------------------------------------------------------------------------------------------
# summary.md
# ------------------------------------------------------------------------------------------------


def summary_markdown(records: list[dict]) -> str:
    """The run as markdown: environment, steps, targets, parity, timings, sanitizer."""
    from benchmarks import report

    env = next((r for r in reversed(records) if r.get("kind") == "environment"), {})
    peaks = next((r for r in reversed(records) if r.get("kind") == "peaks"), {})
    tiers = sorted({str(r.get("tier")) for r in records if r.get("kind") == "step"})
    lines = [f"# fastvit-gpu-check: {env.get('gpu') or 'no GPU (plan)'} — tier {', '.join(tiers) or '?'}", ""]
    lines += [f"{env.get('date', '?')} {env.get('time', '')[11:]}, commit `{env.get('commit', '?')}`"
              + (" (uncommitted changes)" if env.get("dirty") else "")
              + f"; driver {env.get('driver')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
              f"{env.get('triton')}, timm {env.get('timm')}, Python {env.get('python')}; "
              f"FASTVIT_AUTOTUNE={env.get('autotune', 'full')}"]
    if peaks:
        lines += ["", f"Measured peaks: {peaks.get('matmul_tflops', 0):.0f} TFLOP/s ({peaks.get('matmul')}), "
                      f"{peaks.get('copy_gbps', 0):.0f} GB/s device-to-device copy (read + write)"
                  + (" — not measured (plan)" if peaks.get("plan") else "")]
    steps = [r for r in records if r.get("kind") == "step"]
    lines += ["", "## Steps", "", markdown_table(
        [dict(r, note=_step_note(r)) for r in steps], ["tier", "step", "status", "seconds", "budget_s", "note"],
        ["tier", "step", "status", "s", "box s", "note"])]
    bench = [r for r in records if r.get("kind") == "bench"]
    if any(r.get("family") == "models" for r in bench):
        lines += ["", "## Targets (H100-class, bf16)", "", markdown_table(
            report.targets(bench), ["target", "dtype", "batch", "variant", "x", "required", "status"])]
    parity = [r for r in records if r.get("kind") == "parity"]
    if parity:
        rows = [dict(r, result="PASS" if r["passed"] else f"FAIL {r.get('error', '')}",
                     shape=" ".join(f"{k}{v}" for k, v in r["shape"].items())) for r in parity]
        lines += ["", f"## Parity ({sum(r['passed'] for r in parity)} of {len(parity)} pass the numerics rule)", "",
                  markdown_table(rows, ["case", "shape", "dtype", "variant", "max_err", "tol", "result"],
                                 ["op", "shape", "dtype", "backend", "max err", "tolerance", "result"])]
    models = [r for r in bench if r.get("family") == "models"]
    if models:
        lines += ["", "## Models", "", markdown_table(
            report._rows(models),
            ["case", "dtype", "mode", "batch", "variant", "img_per_s", "median_ms", "p20_p80", "pct_peak", "peak_mem_gib",
             "best", "error"],
            ["model", "dtype", "mode", "batch", "variant", "img/s", "ms", "p20-p80", "MFU %", "peak GiB", "x best baseline",
             "error"])]
    ops = [r for r in bench if r.get("family") != "models"]
    if ops:
        lines += ["", "## Op families", "", markdown_table(
            report._rows(ops),
            ["family", "case", "dtype", "mode", "variant", "median_ms", "p20_p80", "tflops", "gbps", "pct_roofline", "best",
             "error"],
            ["family", "case", "dtype", "mode", "variant", "ms", "p20-p80", "TFLOP/s", "GB/s", "% roofline",
             "x best baseline", "error"])]
    san = [r for r in records if r.get("kind") == "sanitizer"]
    if san:
        lines += ["", "## compute-sanitizer", "", markdown_table(
            san, ["tool", "returncode", "errors", "hazards", "refused", "workload_done"])]
    return "\n".join(lines) + "\n"


def _step_note(r: dict) -> str:
    if r.get("error"):
        return str(r["error"])[:160]
    keys = ("variants", "compiled", "checks", "failed", "cases", "of", "variant_errors", "collected", "passed",
            "skipped", "library", "load_s", "gpu", "jit_compiles")
    return ", ".join(f"{k} {r[k]}" for k in keys if r.get(k) is not None)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def gpu_folder(env: dict) -> str:
    """``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``; ``plan-cpu`` without a GPU."""
    words = [w for w in (env.get("gpu") or "").split() if w.upper() != "NVIDIA"]
    return re.sub(r"[^a-z0-9_.-]+", "-", words[0].lower()) if words else "plan-cpu"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastvit-gpu-check", description=__doc__.splitlines()[0])
    p.add_argument("--tier", type=int, choices=(1, 2), default=1, help="1: the first call (<= 4 min); 2: the second")
    p.add_argument("--plan", action="store_true", help="on a CPU: check the plumbing of every step of both tiers")
    p.add_argument("--steps", nargs="+", metavar="STEP", help="run only these steps (see --list)")
    p.add_argument("--list", action="store_true", help="print the steps of each tier and exit")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results root (default benchmarks/results)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: tier 1 230, tier 2 420)")
    p.add_argument("--autotune", choices=("quick", "full"), default=None,
                   help="FASTVIT_AUTOTUNE for this run (default quick: at most two configs per kernel)")
    p.add_argument("--commit", default=None,
                   help="the commit the tree is at, where it is a copy without git history (the device machine's)")
    p.add_argument("--prebuilt", type=pathlib.Path, default=PREBUILT,
                   help=f"the CUDA extension bundle made by --prepare (default {PREBUILT.name}/ in the checkout)")
    p.add_argument("--no-ext-build", action="store_true", help="do not build the CUDA extension when the prebuilt one does not load")
    p.add_argument("--prepare", type=pathlib.Path, nargs="?", const=PREBUILT, default=None, metavar="DIR",
                   help="build the CUDA extension bundle to carry to the GPU machine (default .gpu/) and exit")
    p.add_argument("--summarize", type=pathlib.Path, nargs="+", metavar="PATH",
                   help="re-render summary.md of a run folder from its results.jsonl (and further .jsonl files to merge)")
    p.add_argument("--sanitizer-workload", metavar="DTYPES", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def summarize(paths: list[pathlib.Path]) -> int:
    folder = paths[0] if paths[0].is_dir() else paths[0].parent
    files = [(p / "results.jsonl" if p.is_dir() else p) for p in paths]
    records = load_records(*files)
    if len(files) > 1:  # merged into the first folder's results.jsonl
        (folder / "results.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    (folder / "summary.md").write_text(summary_markdown(records))
    print(f"wrote {folder / 'summary.md'} from {len(records)} records")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for tier in (1, 2):
            print(f"tier {tier} (budget {TIER_BUDGET_S[tier]:.0f} s):")
            for s in steps_for(tier, None):
                print(f"  {s.name:<15} {s.budget_s:>4.0f} s  {s.what}")
        return 0
    if args.prepare is not None:
        return prepare(args.prepare)
    if args.summarize:
        return summarize(args.summarize)
    if args.sanitizer_workload:
        sanitizer_workload(tuple(args.sanitizer_workload.split(",")))
        return 0
    os.environ["FASTVIT_AUTOTUNE"] = args.autotune or os.environ.get("FASTVIT_AUTOTUNE") or "quick"
    if args.commit:
        os.environ["FASTVIT_COMMIT"] = args.commit
    if not benchmarks.HAS_GPU and not args.plan:
        print("fastvit-gpu-check: no CUDA GPU here; --plan checks the steps' plumbing on a CPU", file=sys.stderr)
        return 2
    prebuilt = use_prebuilt(args.prebuilt) if benchmarks.HAS_GPU else {"prebuilt": None}
    env = environment()
    folder = (args.out or default_out()) / gpu_folder(env) / f"{env['date']}-{env['commit']}"
    ctx = Run(folder, args.budget or (600.0 if args.plan else TIER_BUDGET_S[args.tier]),
              "plan" if args.plan else args.tier, args.plan)
    steps = steps_for(None if args.plan else args.tier, args.steps)
    ctx.say(f"fastvit-gpu-check {'--plan (the steps of both tiers)' if args.plan else f'tier {args.tier}'}: {len(steps)} steps, budget "
            f"{ctx.remaining():.0f} s, results in {folder}")
    if prebuilt.get("prebuilt"):
        ctx.say(f"prebuilt CUDA extension bundle {prebuilt['prebuilt']}: {prebuilt['manifest']}")
    if benchmarks.HAS_GPU and not args.plan:
        if any(s.name == "compile-ahead" for s in steps):
            ctx.compile_job = start_compile_ahead(ctx, COMPILE_BATCHES)
        if any(s.name == "cuda-extension" for s in steps) and not ext_state()["built"] and not args.no_ext_build:
            ctx.say("the prebuilt CUDA extension does not match this machine: building it in the background")
            ctx.ext_build = Background("cuda-extension build", [sys.executable, "-m", "fastvit.build"],
                                       child_env(MAX_JOBS=str(os.cpu_count() or 4)),
                                       scratch("ext-build.log"))
    failed = 0
    for i, step in enumerate(steps):
        rec = run_step(ctx, step, reserve_s=2.0)
        failed += rec["status"] in ("failed", "timeout")
        if ctx.remaining() < 3 and i + 1 < len(steps):
            for rest in steps[i + 1:]:
                ctx.step = rest.name
                ctx.emit({"kind": "step", "status": "skipped", "seconds": 0, "budget_s": 0, "error": "run budget spent"})
            ctx.write_summary()
            break
    ctx.say(f"done in {time.monotonic() - ctx.start:.0f} s: {failed} step(s) failed or timed out; see {ctx.summary}")
    for job in (ctx.compile_job, ctx.ext_build):
        if job is not None and job.proc.poll() is None:
            job.proc.kill()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
