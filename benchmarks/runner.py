"""``python -m benchmarks`` / ``fastvit-bench``: run the op families and models, write the results.

On a GPU: measure the GPU's peaks (bf16 8192^3 matmul, 1 GiB copy), time every selected case and
variant (progress bar), and write ``<out>/<gpu>/<date>-<commit>.json`` with the markdown table and PNG
plots beside it (``report.py``). Without a GPU (or with ``--smoke``): say so in one line and run the
smoke mode (``smoke.py``: tiny shapes, eager against the Triton interpreter, correctness only), writing
``<out>/smoke-<device>/<date>-<commit>.{json,md}``; the exit status is 1 only if a check fails.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import sys
from collections.abc import Callable, Iterable
from typing import Any

import benchmarks
from benchmarks.common import FAMILIES, Case, add_ratios, default_out, environment, gpu_slug, run_variant

MODULES = {"mlp": "benchmarks.bench_mlp", "attention": "benchmarks.bench_attention",
           "embed": "benchmarks.bench_embed", "performer": "benchmarks.bench_performer"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks.bench_models import MODELS

    p = argparse.ArgumentParser(
        prog="fastvit-bench",
        description="fastvit's benchmarks: op families and end-to-end models against eager PyTorch, torch.compile, "
                    "SDPA and timm. Without --families/--models everything runs; naming one runs only what it names.")
    p.add_argument("--families", nargs="*", choices=FAMILIES, metavar="FAMILY",
                   help=f"op families to run ({', '.join(FAMILIES)}); the flag alone: all")
    p.add_argument("--models", nargs="*", choices=list(MODELS), metavar="MODEL",
                   help=f"models to run ({', '.join(MODELS)}); the flag alone: all")
    p.add_argument("--batch", nargs="+", type=int, metavar="N", help="models: this batch sweep instead of each model's")
    p.add_argument("--quick", action="store_true", help="ViT-B shapes only, one batch, ViT-B/16 and T2T-ViT-14")
    p.add_argument("--smoke", action="store_true", help="the CPU smoke mode (correctness only), even on a GPU")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results folder (default: benchmarks/results)")
    p.add_argument("--no-plots", action="store_true", help="write JSON and markdown only")
    p.add_argument("--list", action="store_true", help="print the selected cases and variants, run nothing")
    args = p.parse_args(argv)
    if args.families is None and args.models is None:
        args.families, args.models = list(FAMILIES), list(MODELS)
    else:
        args.families = (args.families or list(FAMILIES)) if args.families is not None else []
        args.models = (args.models or list(MODELS)) if args.models is not None else []
    return args


def selected_cases(families: Iterable[str], models: list[str], quick: bool = False,
                   batches: list[int] | None = None) -> list[Case]:
    """The cases of the named families, then of the named models."""
    from benchmarks import bench_models

    out: list[Case] = []
    for fam in families:
        out += importlib.import_module(MODULES[fam]).cases(quick)
    if models:
        out += bench_models.cases(quick, models if set(models) != set(bench_models.MODELS) else None, batches)
    return out


def _progress(total: int, desc: str) -> Callable[[Iterable], Iterable]:
    """tqdm over an iterable when tqdm is installed, else the iterable itself."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iter

    return lambda it: tqdm(it, total=total, desc=desc, unit="case", dynamic_ncols=True)


def _result_path(out: pathlib.Path, folder: str, env: dict[str, Any]) -> pathlib.Path:
    """``out/folder/<date>-<commit>.json``, with ``-2``, ``-3``... when that run already exists."""
    d = out / folder
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{env['date']}-{env['commit']}"
    path, n = d / f"{stem}.json", 2
    while path.exists():
        path, n = d / f"{stem}-{n}.json", n + 1
    return path


def _write(data: dict, path: pathlib.Path, plots: bool) -> list[pathlib.Path]:
    from benchmarks import report

    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return [path, *report.render(data, path, plots=plots)]


def run_gpu(args: argparse.Namespace) -> int:
    """Time every selected case on the GPU and write the results; 0 unless interrupted."""
    from benchmarks.common import measure_peaks

    cases = selected_cases(args.families, args.models, args.quick, args.batch)
    env = environment()
    print(f"fastvit-bench: {env['gpu']} (driver {env['driver']}), torch {env['torch']}, CUDA {env['cuda']}, "
          f"triton {env['triton']}, commit {env['commit']}; {len(cases)} cases", flush=True)
    peaks = measure_peaks()
    print(f"measured peaks: {peaks['matmul_tflops']:.0f} TFLOP/s ({peaks['matmul']}), {peaks['copy_gbps']:.0f} GB/s copy",
          flush=True)
    records: list[dict] = []
    interrupted = False
    try:
        for case in _progress(len(cases), "fastvit-bench")(cases):
            records += run_case(case, peaks)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: writing the cases measured so far", flush=True)
    data = {"kind": "gpu", "environment": env, "peaks": peaks, "args": _args(args), "records": records}
    written = _write(data, _result_path(args.out or default_out(), gpu_slug(env), env), not args.no_plots)
    for p in written:
        print(f"wrote {p}")
    return 130 if interrupted else 0


def run_case(case: Case, peaks: dict) -> list[dict]:
    """Every variant of one case, with their ratios to the baselines."""
    import torch

    from benchmarks.common import case_fields

    try:
        inputs = case.inputs()
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: recorded, the run goes on
        torch.cuda.empty_cache()
        err = f"inputs: {type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
        return [{**case_fields(case), "variant": v, "baseline": case.variants[v].baseline, "error": err}
                for v in case.variants]
    records = [run_variant(case, name, inputs, peaks) for name in case.variants]
    del inputs
    torch.cuda.empty_cache()
    add_ratios(records)
    return records


def run_smoke(args: argparse.Namespace, device: str) -> int:
    """The smoke checks of the selected families and models; 1 if any fails, else 0."""
    import torch

    from benchmarks import bench_models, report, smoke

    if device == "cpu":
        torch.set_num_threads(1)
    checks = [c for fam in args.families for c in importlib.import_module(MODULES[fam]).smoke_checks()]
    if args.models:
        checks += bench_models.smoke_checks(args.models)
    records = smoke.run_checks(checks, device, _progress(len(checks), "smoke"))
    env = environment()
    data = {"kind": "smoke", "device": device, "environment": env, "args": _args(args), "records": records}
    print(report.smoke_table(records))
    written = _write(data, _result_path(args.out or default_out(), f"smoke-{device}", env), plots=False)
    print(f"wrote {', '.join(str(p) for p in written)}")
    failed = [r for r in records if not r["passed"]]
    print(f"smoke: {len(records) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _args(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()}


def main(argv: list[str] | None = None) -> int:
    """The command line (see ``--help``); returns the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        for case in selected_cases(args.families, args.models, args.quick, args.batch):
            print(f"{case.id}: {', '.join(case.variants)}")
        return 0
    if not benchmarks.HAS_GPU:
        print("fastvit-bench: no CUDA GPU here, so no timings: running the CPU smoke mode (tiny shapes, eager vs the "
              "Triton interpreter, float32, correctness only)", flush=True)
        return run_smoke(args, "cpu")
    if args.smoke:
        print("fastvit-bench: smoke mode on the GPU (tiny shapes, eager vs fastvit's kernels, correctness only)", flush=True)
        return run_smoke(args, "cuda")
    return run_gpu(args)
