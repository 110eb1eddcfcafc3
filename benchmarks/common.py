"""Shared benchmark plumbing: the GPU check, CUDA-event timing, environment records, result files.

Every record carries the GPU, driver, torch/triton/CUDA versions and git commit; results go to
``benchmarks/results/<gpu>/<date>-<commit>-<name>.{json,md}`` so that each claim traces to a run.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import re
import subprocess

import torch

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def gpu_available(name: str) -> bool:
    """True on a CUDA machine; otherwise print one line saying the benchmark needs a GPU."""
    if torch.cuda.is_available():
        return True
    print(f"{name}: no CUDA GPU here; GPU timings need one (nothing measured)")
    return False


def time_ms(fn, warmup: int = 25, rep: int = 100) -> dict[str, float]:
    """Median, p20 and p80 milliseconds of ``fn()`` on the GPU (CUDA events, synchronised)."""
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                              cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, str]:
    """What a result was measured on."""
    env = {
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))),
        "date": datetime.date.today().isoformat(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = "none"
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            env["driver"] = "unknown"
    return env


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` restricted to ``columns`` (floats to 3 significant digits)."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, rows: list[dict], columns: list[str]) -> pathlib.Path:
    """Write the rows as JSON and a markdown table under results/<gpu>/; return the JSON path."""
    env = environment()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", env.get("gpu", "cpu")).strip("-").lower()
    out = RESULTS / gpu
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date']}-{env['commit']}-{name}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    header = f"# {name}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    (out / f"{stem}.md").write_text(header + markdown_table(rows, columns) + "\n")
    return path
