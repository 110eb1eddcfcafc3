"""The benchmark suite without a GPU: the smoke mode end to end, and the report rendered from a synthetic result."""

import json
import subprocess
import sys

import pytest

from benchmarks import report


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """``python -m benchmarks --smoke --out <tmp>`` in a fresh interpreter (no GPU: the Triton interpreter)."""
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=300)
    return proc, out


def test_smoke_mode_runs_and_writes_results(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    first = proc.stdout.splitlines()[0]
    if "no CUDA GPU" in first:
        assert "smoke mode" in first
    (path,) = out.glob("smoke-*/*.json")
    data = json.loads(path.read_text())
    env = data["environment"]
    for key in ("gpu", "driver", "torch", "triton", "cuda", "commit", "date"):
        assert key in env
    recs = data["records"]
    assert {r["family"] for r in recs} == {"mlp", "attention", "embed", "performer", "models"}
    assert all(r["passed"] for r in recs)
    assert all(r["max_err"] <= r["tol"] for r in recs if "max_err" in r)
    md = path.with_suffix(".md").read_text()
    assert "| family | check |" in md and "PASS" in md and "FAIL" not in md
    assert "median" not in md and "img/s" not in md  # correctness only: no timings


def _record(family, case, variant, baseline, ms, **extra):
    return {"family": family, "case": case, "shape": {"N": 197}, "dtype": "bf16", "mode": "fwd", "variant": variant,
            "baseline": baseline, "median_ms": ms, "p20_ms": 0.9 * ms, "p80_ms": 1.1 * ms, "tflops": 100 / ms, **extra}


def test_report_renders_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    recs = [_record("attention", "attention ViT-B/16", "fastvit[triton]", False, 1.0),
            _record("attention", "attention ViT-B/16", "sdpa flash", True, 1.5),
            {"family": "attention", "case": "attention ViT-B/16", "shape": {"N": 197}, "dtype": "bf16", "mode": "fwd",
             "variant": "eager", "baseline": True, "error": "OutOfMemoryError: x"}]
    model = dict(model="vit_base_patch16_224", batch=256, img_per_s=1000.0)
    recs += [dict(_record("models", "ViT-B/16", "timm eager", True, 200.0, **model), mode="train"),
             dict(_record("models", "ViT-B/16", "fastvit[triton]", False, 150.0, **model), mode="train")]
    from benchmarks.common import add_ratios

    add_ratios(recs[:3])
    add_ratios(recs[3:])
    data = {"kind": "gpu", "records": recs,
            "environment": {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580", "torch": "2.11", "cuda": "13.0",
                            "triton": "3.6", "commit": "abc1234", "date": "2026-01-01"},
            "peaks": {"matmul": "bf16 8192x8192x8192", "matmul_tflops": 750.0, "copy_gbps": 3000.0,
                      "nominal_h100_sxm_bf16_tflops": 989.0, "nominal_h100_sxm_hbm_tbps": 3.35}}
    path = tmp_path / "2026-01-01-abc1234.json"
    path.write_text(json.dumps(data))
    assert report.main([str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    assert "# fastvit benchmarks: NVIDIA H100 80GB HBM3" in md and "750 TFLOP/s" in md
    assert "| ViT-B/16 training >= 1.3x timm eager | bf16 | 256 | fastvit[triton] | 1.33 | 1.3 | met |" in md
    assert "OutOfMemoryError" in md and "sdpa flash 1.50" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == [f"2026-01-01-abc1234-{f}-{k}.png" for f in ("attention", "models") for k in ("speedup", "tflops")]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
