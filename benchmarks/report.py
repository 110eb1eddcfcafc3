"""Render a result JSON as markdown and PNG plots: ``python -m benchmarks.report RESULT.json [--no-plots]``.

The markdown (``RESULT.md``) opens with the GPU, its measured peaks and the software it ran, then the
issue's targets (met or not, from the model records), the models table and one table per op family.
Plots (``RESULT-<family>-speedup.png``, ``RESULT-<family>-tflops.png``): each fastvit variant's speedup
over the fastest baseline per case, and every variant's TFLOP/s against the GPU's measured bf16 matmul
peak (and the nominal 989). A smoke run renders its correctness table only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
from collections.abc import Iterable
from typing import Any

from benchmarks.common import markdown_table

# (what, model, mode, dtypes, baseline variant, required ratio): the targets (H100, bf16)
TARGETS = [
    ("ViT-B/16 training >= 1.3x timm eager", "vit_base_patch16_224", "train", ("bf16 autocast", "bf16"),
     "timm eager", 1.3),
    ("ViT-B/16 training >= 1.1x torch.compile(timm)", "vit_base_patch16_224", "train", ("bf16 autocast", "bf16"),
     "torch.compile(timm)", 1.1),
    ("ViT-B/16 inference >= 1.2x timm eager", "vit_base_patch16_224", "inference", ("bf16 autocast", "bf16"), "timm eager", 1.2),
    ("T2T-ViT-14 training >= 2x official (autocast)", "t2t_vit_14", "train", ("bf16 autocast",), "official eager", 2.0),
]
FAMILY_ORDER = ("models", "mlp", "attention", "embed", "performer")


def _shape(shape: dict) -> str:
    return " ".join(f"{k}{v}" for k, v in shape.items())


def _ratios(r: dict) -> str:
    return ", ".join(f"{b} {x:.2f}" for b, x in r.get("x_vs", {}).items())


def _rows(records: Iterable[dict]) -> list[dict]:
    """Records flattened for the tables: shape as text, p20-p80, the ratios, errors."""
    out = []
    for r in records:
        row = dict(r, shape=_shape(r.get("shape", {})), x_vs=_ratios(r), error=r.get("error", ""))
        if "p20_ms" in r:
            row["p20_p80"] = f"{r['p20_ms']:.3g}-{r['p80_ms']:.3g}"
        if "x_best_baseline" in r:
            row["best"] = f"{r['x_best_baseline']:.2f} ({r['best_baseline']})"
        out.append(row)
    return out


def targets(records: list[dict]) -> list[dict]:
    """Each target per dtype at the largest batch where its baseline ran: the best fastvit variant's
    ratio to the baseline, and whether it meets the target."""
    rows = []
    for what, model, mode, dtypes, base, need in TARGETS:
        for dtype in dtypes:
            recs = [r for r in records if r.get("model") == model and r["mode"] == mode and r["dtype"] == dtype
                    and not r["baseline"] and base in r.get("x_vs", {})]
            row = {"target": what, "dtype": dtype, "required": need}
            if not recs:
                rows.append({**row, "status": "no data"})
                continue
            batch = max(r["batch"] for r in recs)
            best = max((r for r in recs if r["batch"] == batch), key=lambda r: r["x_vs"][base])
            x = best["x_vs"][base]
            rows.append({**row, "batch": batch, "variant": best["variant"], "x": x,
                         "status": "met" if x >= need else "not met"})
    return rows


def markdown(data: dict) -> str:
    """The whole result as markdown."""
    env = data["environment"]
    if data["kind"] == "smoke":
        return (f"# fastvit smoke run on {data['device']} (correctness only, no timings)\n\n{_env_line(env)}\n\n"
                f"{smoke_table(data['records'])}\n")
    peaks = data["peaks"]
    parts = [
        f"# fastvit benchmarks: {env['gpu']}\n",
        _env_line(env) + "\n",
        f"Measured peaks: {peaks['matmul_tflops']:.0f} TFLOP/s ({peaks['matmul']} matmul; nominal H100 SXM "
        f"{peaks['nominal_h100_sxm_bf16_tflops']:.0f}), {peaks['copy_gbps']:.0f} GB/s (1 GiB copy; nominal "
        f"{peaks['nominal_h100_sxm_hbm_tbps'] * 1000:.0f}). `% peak` / MFU are against the measured matmul peak, "
        "`% roofline` is max(flops / peak, bytes / copy bandwidth) over the time; `x vs` is a baseline's time "
        "over this one (> 1: faster).\n",
    ]
    records = data["records"]
    if any(r["family"] == "models" for r in records):
        parts.append("## Targets\n\n" + markdown_table(
            targets(records), ["target", "dtype", "batch", "variant", "x", "required", "status"],
            ["target", "dtype", "batch", "best fastvit variant", "x", "required", "status"]) + "\n")
    for fam in FAMILY_ORDER:
        recs = _rows(r for r in records if r["family"] == fam)
        if not recs:
            continue
        if fam == "models":
            cols = ["case", "dtype", "mode", "batch", "variant", "img_per_s", "median_ms", "p20_p80", "pct_peak",
                    "pct_nominal_989", "peak_mem_gib", "best", "x_vs", "error"]
            heads = ["model", "dtype", "mode", "batch", "variant", "img/s", "median ms", "p20-p80 ms", "MFU %",
                     "% of 989", "peak GiB", "x best baseline", "x vs", "error"]
        else:
            cols = ["case", "shape", "dtype", "mode", "variant", "median_ms", "p20_p80", "tflops", "pct_peak", "gbps",
                    "pct_roofline", "step_mem_gib", "best", "x_vs", "error"]
            heads = ["case", "shape", "dtype", "mode", "variant", "median ms", "p20-p80 ms", "TFLOP/s", "% peak",
                     "GB/s", "% roofline", "step GiB", "x best baseline", "x vs", "error"]
            if not any("step_mem_gib" in r for r in recs):
                i = cols.index("step_mem_gib")
                del cols[i], heads[i]
        parts.append(f"## {fam}\n\n" + markdown_table(recs, cols, heads) + "\n")
    return "\n".join(parts)


def _env_line(env: dict) -> str:
    keys = ["date", "commit", "gpu", "driver", "torch", "cuda", "triton", "timm", "python"]
    line = ", ".join(f"{k} {env.get(k)}" for k in keys if env.get(k))
    return line + (" (uncommitted changes)" if env.get("dirty") else "")


def smoke_table(records: list[dict]) -> str:
    """The smoke run's correctness table."""
    rows = [dict(r, shape=_shape(r["shape"]), result="PASS" if r["passed"] else "FAIL",
                 note=r.get("error") or r.get("note", "")) for r in records]
    return markdown_table(rows, ["family", "case", "shape", "variant", "max_err", "tol", "result", "note"],
                          ["family", "check", "shape", "variant", "max err", "tolerance", "result", "note"])


def write_plots(data: dict, stem: pathlib.Path) -> list[pathlib.Path]:
    """Per family: fastvit's speedup over the fastest baseline per case, and TFLOP/s against the peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = data["peaks"]["matmul_tflops"]
    nominal = data["peaks"]["nominal_h100_sxm_bf16_tflops"]
    written = []
    for fam in FAMILY_ORDER:
        recs = [r for r in data["records"] if r["family"] == fam and "median_ms" in r]
        labels = list(dict.fromkeys(_label(r) for r in recs))
        if not labels:
            continue
        fused = {r["variant"]: None for r in recs if not r["baseline"] and "x_best_baseline" in r}
        for kind, series, ylabel, lines in (
            ("speedup", {v: {_label(r): r["x_best_baseline"] for r in recs if r["variant"] == v and "x_best_baseline" in r}
                         for v in fused}, "x over the fastest baseline", [(1.0, "baseline")]),
            ("tflops", {v: {_label(r): r["tflops"] for r in recs if r["variant"] == v and "tflops" in r}
                        for v in dict.fromkeys(r["variant"] for r in recs)},
             "TFLOP/s", [(peak, f"measured peak {peak:.0f}"), (nominal, f"nominal {nominal:.0f}")]),
        ):
            series = {v: s for v, s in series.items() if s}
            groups = [g for g in labels if any(g in s for s in series.values())]
            if not groups:
                continue
            fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(1, len(series)) ** 0.5 + 2), 5))
            width = 0.8 / len(series)
            for k, (v, s) in enumerate(series.items()):
                xs = [i + (k - (len(series) - 1) / 2) * width for i, g in enumerate(groups) if g in s]
                ax.bar(xs, [s[g] for g in groups if g in s], width, label=v)
            for y, text in lines:
                ax.axhline(y, color="k", ls="--", lw=0.8)
                ax.annotate(text, (len(groups) - 0.5, y), ha="right", va="bottom", fontsize=7)
            ax.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=7)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{fam}: {'speedup per shape' if kind == 'speedup' else 'TFLOP/s against the peak'}"
                         f" ({data['environment']['gpu']})", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = stem.with_name(f"{stem.name}-{fam}-{kind}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _label(r: dict) -> str:
    extra = f" b{r['batch']}" if "batch" in r else ""
    return f"{r['case']} {r['dtype']} {r['mode']}{extra}"


def render(data: dict, json_path: pathlib.Path, plots: bool = True) -> list[pathlib.Path]:
    """Write ``<json stem>.md`` and, for GPU runs with matplotlib installed, the plots; the paths written."""
    stem = json_path.with_suffix("")
    md = json_path.with_suffix(".md")
    md.write_text(markdown(data))
    written = [md]
    if plots and data["kind"] == "gpu":
        if importlib.util.find_spec("matplotlib") is None:
            print("report: matplotlib is not installed, so no plots (pip install matplotlib, or fastvit[bench])")
            return written
        written += write_plots(data, stem)
    return written


def load(path: str | pathlib.Path) -> dict[str, Any]:
    """A result JSON as written by the runner."""
    return json.loads(pathlib.Path(path).read_text())


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULT.json [--no-plots]``: re-render a result's markdown and plots."""
    p = argparse.ArgumentParser(description="Re-render a fastvit benchmark result (markdown and plots) from its JSON.")
    p.add_argument("result", type=pathlib.Path)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    for path in render(load(args.result), args.result, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
