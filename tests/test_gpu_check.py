"""fastvit-gpu-check without a GPU: the --plan run end to end, time boxes, results that survive a kill,
quick autotuning, the compile-ahead hitting the JIT's cache, and the prebuilt CUDA-extension bundle."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.parity import GPU_SHAPES, parity_checks
from numerics import run_without_interpreter

ROOT = pathlib.Path(__file__).resolve().parents[1]
REQUIRE_BUILD = os.environ.get("FASTVIT_REQUIRE_CUDA_BUILD") == "1"


@pytest.fixture(scope="module")
def plan_run(tmp_path_factory):
    """``python -m benchmarks.gpu_check --plan --out <tmp>`` in a fresh interpreter."""
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--plan", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    (folder,) = out.glob("*/*")
    return proc, folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="the plan run is the CPU check; a GPU runs the tiers")
def test_plan_checks_every_step_of_both_tiers(plan_run):
    proc, folder = plan_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert folder.parent.name == "plan-cpu" and folder.name.startswith(time.strftime("%Y-%m-%d"))
    assert sorted(p.name for p in folder.iterdir()) == ["log.txt", "results.jsonl", "summary.md"]
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "environment" and records[0]["autotune"] == "quick"
    for key in ("gpu", "driver", "torch", "triton", "cuda", "timm", "commit", "date"):
        assert key in records[0]
    steps = {r["step"]: r for r in records if r["kind"] == "step"}
    assert list(steps) == [s.name for s in gpu_check.STEPS]  # every step of both tiers, in order
    expected_skip = {"cuda-extension"} if not REQUIRE_BUILD else set()
    for name, rec in steps.items():
        assert rec["status"] == "ok" or (name in expected_skip and rec["status"] == "skipped"), rec
    assert steps["compile-ahead"]["variants"] > 100  # the recorded launch list is not empty
    assert steps["pytest-gpu"]["collected"] > 50
    assert steps["parity"]["checks"] == len(parity_checks(GPU_SHAPES)) and not steps["parity"]["failed"]
    parity = [r for r in records if r["kind"] == "parity"]
    assert {r["family"] for r in parity} == {"mlp", "attention", "embed", "performer"}
    assert all(r["passed"] and r["dtype"] == "fp16" and r["max_err"] <= r["tol"] for r in parity)
    for step in ("ops", "models", "compile-models", "t2t", "compile-ops"):
        assert steps[step]["cases"] > 0 and steps[step]["variants"] >= steps[step]["cases"]
    plans = {r["case"]: r["variants"] for r in records if r["kind"] == "bench-plan" and r["step"] == "models"}
    assert all(not any("compile" in v for v in vs) for vs in plans.values())  # tier 1 compiles nothing
    assert all(v.startswith(("timm", "fastvit")) for vs in plans.values() for v in vs)
    if REQUIRE_BUILD:
        assert steps["cuda-extension"]["loaded"] and steps["cuda-extension"]["built"]
    md = (folder / "summary.md").read_text()
    assert "## Steps" in md and "## Parity" in md and "FASTVIT_AUTOTUNE=quick" in md
    log = (folder / "log.txt").read_text()
    assert all(f"step {s.name}:" in log for s in gpu_check.STEPS) and "recorded" in log  # compile-ahead's output too


def test_a_step_past_its_time_box_is_recorded_and_the_run_goes_on(tmp_path):
    ctx = gpu_check.Run(tmp_path / "run", budget_s=60, tier=1, plan=False)

    def slow(c):
        c.emit({"kind": "note", "before": "the box"})
        while True:
            time.sleep(0.01)

    def broken(c):
        raise RuntimeError("boom")

    steps = [gpu_check.Step("slow", (1,), 0.3, slow, slow, "sleeps"),
             gpu_check.Step("broken", (1,), 5, broken, broken, "raises"),
             gpu_check.Step("fine", (1,), 5, lambda c: {"value": 1}, lambda c: {}, "returns")]
    start = time.monotonic()
    got = [gpu_check.run_step(ctx, s)["status"] for s in steps]
    assert got == ["timeout", "failed", "ok"] and time.monotonic() - start < 5
    records = gpu_check.load_records(ctx.results)
    assert [r.get("before") for r in records if r["kind"] == "note"] == ["the box"]  # what was done before the box stays
    assert [r["status"] for r in records if r["kind"] == "step"] == got
    assert "RuntimeError: boom" in [r for r in records if r["step"] == "broken"][0]["error"]
    md = ctx.summary.read_text()
    assert "| 1 | slow | timeout |" in md and "| 1 | fine | ok |" in md


def test_results_written_before_a_kill_survive_it(tmp_path):
    code = f"""
import os, signal, pathlib
from benchmarks import gpu_check
from benchmarks.parity import GPU_SHAPES, parity_checks
ctx = gpu_check.Run(pathlib.Path({str(tmp_path)!r}), budget_s=60, tier=1, plan=False)
gpu_check.run_step(ctx, gpu_check.Step("first", (1,), 5, lambda c: {{"value": 1}}, None, "one"))
ctx.step = "second"
ctx.emit({{"kind": "note", "value": 2}})
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9
    records = gpu_check.load_records(tmp_path / "results.jsonl")
    assert [(r["step"], r["kind"]) for r in records] == [("first", "step"), ("second", "note")]
    assert "| 1 | first | ok |" in (tmp_path / "summary.md").read_text()


def test_summarize_merges_a_second_tier(tmp_path):
    env = {"kind": "environment", "gpu": "NVIDIA H200", "commit": "abc1234", "date": "2026-12-01", "autotune": "quick"}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    (one / "results.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {**env, "step": "environment", "tier": 1},
        {"kind": "step", "step": "parity", "tier": 1, "status": "ok", "seconds": 3.0, "budget_s": 75}]) + "\n")
    (two / "results.jsonl").write_text(json.dumps(
        {"kind": "step", "step": "pytest-gpu", "tier": 2, "status": "failed", "seconds": 9.0, "budget_s": 240,
         "error": "2 failed"}) + "\n{torn line")
    assert gpu_check.main(["--summarize", str(one), str(two / "results.jsonl")]) == 0
    md = (one / "summary.md").read_text()
    assert md.startswith("# fastvit-gpu-check: NVIDIA H200 — tier 1, 2")
    assert "| 1 | parity | ok |" in md and "| 2 | pytest-gpu | failed |" in md and "2 failed" in md
    assert len((one / "results.jsonl").read_text().splitlines()) == 3


def test_summary_marks_targets_and_tables_from_gpu_records():
    from benchmarks.common import add_ratios

    model = {"kind": "bench", "step": "models", "tier": 1, "family": "models", "case": "ViT-B/16", "dtype": "bf16 autocast",
             "mode": "train", "model": "vit_base_patch16_224", "batch": 256, "shape": {"batch": 256, "img": 224}}
    recs = [dict(model, variant="timm eager", baseline=True, median_ms=130.0, p20_ms=129.0, p80_ms=131.0, img_per_s=1969.0),
            dict(model, variant="fastvit[triton]", baseline=False, median_ms=100.0, p20_ms=99.0, p80_ms=101.0,
                 img_per_s=2560.0, pct_peak=40.0, peak_mem_gib=30.0)]
    add_ratios(recs)
    op = {"kind": "bench", "step": "ops", "tier": 1, "family": "attention", "case": "attention ViT-B/16", "dtype": "bf16",
          "mode": "fwd", "shape": {"B": 256}}
    ops = [dict(op, variant="sdpa flash", baseline=True, median_ms=1.2, p20_ms=1.1, p80_ms=1.3),
           dict(op, variant="fastvit[triton]", baseline=False, error="RuntimeError: out of resources")]
    parity = {"kind": "parity", "step": "parity", "tier": 1, "family": "mlp", "case": "layernorm_mlp ViT-B/16",
              "shape": {"B": 32}, "dtype": "bf16", "variant": "fastvit[cuda]", "passed": False, "max_err": 1.0, "tol": 0.1,
              "error": "grad 3 exceeds the tolerance"}
    steps = [{"kind": "step", "step": "models", "tier": 1, "status": "ok", "seconds": 40.0, "budget_s": 70, "cases": 2,
              "of": 2, "jit_compiles": 0}]
    md = gpu_check.summary_markdown([{"kind": "environment", "gpu": "NVIDIA H200", "autotune": "quick"}, *recs, *ops,
                                     parity, *steps])
    assert "| ViT-B/16 training >= 1.3x timm eager | bf16 autocast | 256 | fastvit[triton] | 1.3 | 1.3 | met |" in md
    assert "| ViT-B/16 training >= 1.1x torch.compile(timm) | bf16 autocast |  |  |  | 1.1 | no data |" in md
    assert "FAIL grad 3 exceeds the tolerance" in md and "## Parity (0 of 1 pass" in md
    assert "RuntimeError: out of resources" in md and "| 2.56e+03 |" not in md and "2,560" in md
    assert "jit_compiles 0" in md


def test_commit_can_be_named_where_the_tree_has_no_git_history(monkeypatch):
    from benchmarks.common import environment

    monkeypatch.setenv("FASTVIT_COMMIT", "abc1234")
    assert environment()["commit"] == "abc1234"
    monkeypatch.delenv("FASTVIT_COMMIT")
    assert gpu_check.parse_args(["--tier", "2", "--commit", "def5678"]).commit == "def5678"


def test_results_folder_names_the_gpu_briefly():
    assert gpu_check.gpu_folder({"gpu": "NVIDIA H200"}) == "h200"
    assert gpu_check.gpu_folder({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100"
    assert gpu_check.gpu_folder({"gpu": None}) == "plan-cpu"


def test_without_a_gpu_the_tiers_refuse_and_point_at_plan(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert gpu_check.main(["--tier", "1"]) == 2
    assert "--plan" in capsys.readouterr().err


def test_list_names_every_step(capsys):
    assert gpu_check.main(["--list"]) == 0
    out = capsys.readouterr().out
    assert all(s.name in out for s in gpu_check.STEPS) and "tier 1" in out and "tier 2" in out


def test_quick_autotune_tries_two_configs_per_kernel(monkeypatch):
    from fastvit.kernels import _common

    monkeypatch.setenv("FASTVIT_AUTOTUNE", "quick")
    assert _common.autotune_configs(list(range(6))) == [0, 1]
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "full")
    assert _common.autotune_configs(list(range(6))) == list(range(6))
    monkeypatch.setenv("FASTVIT_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="FASTVIT_AUTOTUNE='fast'"):
        _common.autotune_configs([1])
    # the real autotuners, built as on a GPU (no interpreter)
    out = run_without_interpreter("""
        import os
        os.environ["FASTVIT_AUTOTUNE"] = "quick"
        import torch
        from fastvit.kernels import attention, embed, mlp, performer
        counts = {
            "mlp": len(mlp._mm_autotuned(None, False).configs),
            "mlp_psum": len(mlp._mm_autotuned(mlp._PSUM_BLOCK_M, False).configs),
            "attention": len(attention._launch("fwd", 197, 197, torch.bfloat16)[0].configs),
            "embed": len(embed._tuned("dw").configs),
            "performer": len(performer._tuned("kside_fwd").configs),
        }
        print(counts)
    """)
    counts = eval(out.strip().splitlines()[-1])
    assert counts == dict.fromkeys(counts, 2), counts


def test_compile_ahead_fills_the_cache_the_jit_reads():
    """The launches recorded on CPU tensors, compiled ahead, are exactly what the JIT looks up: its own
    compile of the same launches (through a stand-in CUDA driver, without launching) adds nothing to
    Triton's cache. Plain and autotuned kernels (both quick configs)."""
    out = run_without_interpreter("""
        import os, pathlib, tempfile
        cache = tempfile.mkdtemp()
        os.environ["TRITON_CACHE_DIR"], os.environ["FASTVIT_AUTOTUNE"] = cache, "quick"
        import torch
        from benchmarks import compile_ahead as CA
        os.environ.pop("TRITON_INTERPRET", None)
        CA.EVERY_CONFIG = True
        CA.patch_launchers()
        from fastvit.kernels import mlp as K

        def launches():
            x = torch.empty(32, 197, 256, dtype=torch.bfloat16)
            w = torch.empty(256, dtype=torch.bfloat16)
            y, mean, rstd = K._layer_norm_fwd(x, w, w, 1e-6, torch.bfloat16)
            K._layer_norm_bwd(torch.empty_like(x), x, w, None, mean, rstd)
            ps = [w, w, torch.empty(512, 256, dtype=torch.bfloat16), torch.empty(512, dtype=torch.bfloat16),
                  torch.empty(256, 512, dtype=torch.bfloat16), w]
            K._layernorm_mlp_infer(x, *ps, 1e-6, x)

        launches()
        compiled, failed = CA.compile_all(90, 2, out=open(os.devnull, "w"))
        ahead = len(os.listdir(cache))

        import triton
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.autotuner import Autotuner

        class StandInDriver:
            def get_current_device(self): return 0
            def get_current_stream(self, device=None): return 0
            def get_current_target(self): return GPUTarget("cuda", 90, 32)

        driver.set_active(StandInDriver())

        class JitWarmup:  # what JITFunction.run compiles, without launching
            def __init__(self, kernel): self.kernel = kernel
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    if isinstance(self.kernel, Autotuner):
                        for cfg in self.kernel.configs:
                            self.kernel.fn.warmup(*args, grid=(1,), **{**kwargs, **cfg.all_kwargs()})
                    else:
                        self.kernel.warmup(*args, grid=(1,), **kwargs)
                return launch

        torch.library.wrap_triton = JitWarmup
        launches()
        print(compiled, failed, ahead, len(os.listdir(cache)))
    """, timeout=600)
    compiled, failed, ahead, after = map(int, out.strip().splitlines()[-1].split())
    assert failed == 0 and compiled >= 6 and ahead == compiled
    assert after == ahead, f"the JIT compiled {after - ahead} variants the compile-ahead did not"


def _built_extension():
    from fastvit import _ext

    try:
        _ext.cuda_home()
        _ext.cutlass_include()
    except _ext.ExtensionError as e:
        if REQUIRE_BUILD:
            raise
        pytest.skip(f"no CUDA toolchain to build the extension with: {e}")
    if not _ext.is_built() and not REQUIRE_BUILD:
        pytest.skip("the CUDA extension is not built here (python -m fastvit.build)")


def test_prebuilt_bundle_is_what_the_gpu_machine_loads(tmp_path):
    """``--prepare`` copies the built library and packs CUTLASS; a machine without the build (another
    TORCH_EXTENSIONS_DIR) and without CUTLASS finds it through ``use_prebuilt`` and loads it."""
    _built_extension()
    bundle = tmp_path / "bundle"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--prepare", str(bundle)], cwd=ROOT,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["torch"] == torch.__version__ and manifest["archs"] and manifest["cutlass"].count(".") == 2
    files = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert files == sorted(["manifest.json", "cutlass-include.tar.gz", manifest["library"]])
    code = f"""
        import os, pathlib, sys
        import fastvit._ext as ext
        real = ext.cutlass_include
        def no_cutlass():  # the GPU machine has no nvidia-cutlass
            if "CUTLASS_PATH" in os.environ:
                return real()
            raise ext.ExtensionError("no CUTLASS")
        ext.cutlass_include = no_cutlass
        from benchmarks import gpu_steps
        got = gpu_steps.use_prebuilt(pathlib.Path({str(bundle)!r}))
        assert os.environ["CUTLASS_PATH"].endswith("fastvit-cutlass"), os.environ["CUTLASS_PATH"]
        assert ext.is_built(), gpu_steps.ext_state()
        lib = ext.load(build_if_missing=False)
        print(lib)
    """
    env_dir = tmp_path / "elsewhere"
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env={**{k: v for k, v in os.environ.items() if k not in ("CUTLASS_PATH", "TORCH_CUDA_ARCH_LIST")},
                              "TORCH_EXTENSIONS_DIR": str(env_dir), "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == str(bundle.resolve() / manifest["library"])


def test_autotune_keys_bucket_the_batch_and_hold_every_flag():
    """A new batch size (the last partial batch, evaluation) reuses its power-of-two bucket's tuning, and
    launches that compile to different kernels (a mask, a stored pre-activation) never share one; the
    configs that spilled at sm_90 are gone (dGELU GEMM, timm-form patch embedding)."""
    from fastvit.kernels._common import bucket

    assert bucket(256 * 197) == bucket(255 * 197) == 65536 and bucket(1) == 16 and bucket(16) == 16 and bucket(17) == 32
    out = run_without_interpreter("""
        import json
        import torch
        from fastvit.kernels import attention, embed, mlp, performer
        print(json.dumps({
            "mm": mlp._mm_autotuned(None, False).keys,
            "mm_psum": [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) for c in mlp._mm_autotuned(mlp._PSUM_BLOCK_M, False).configs],
            "embed_fwd": embed._tuned("fwd").keys,
            "embed_fwd_tiles": [(c.kwargs["BM"], c.kwargs["BN"], c.kwargs["BK"]) for c in embed._tuned("fwd").configs],
            "embed_dx": embed._tuned("dx").keys,
            "attention": attention._launch("dq", 197, 197, torch.bfloat16)[0].keys,
            "wgrad": performer._tuned("wgrad").keys,
            "qside_bwd": performer._tuned("qside_bwd").keys,
        }))
    """)
    got = json.loads(out.strip().splitlines()[-1])
    for name, rows in (("mm", {"M", "K"}), ("embed_fwd", {"M"}), ("embed_dx", {"M"}), ("wgrad", {"N"})):
        assert not rows & set(got[name]), (name, got[name])  # the sizes that follow the batch are bucketed
    assert {"M_BUCKET", "K_BUCKET", "STORE_AUX", "HAS_BIAS", "EPILOGUE"} <= set(got["mm"]) and "M" not in got["mm"]
    assert {"M_BUCKET", "HWC", "SAVE", "POST_NORM"} <= set(got["embed_fwd"]) and "M_BUCKET" in got["embed_dx"]
    assert {"HAS_MASK", "MASK_BOOL", "MASK_KEYS_ONLY"} <= set(got["attention"]) and "N_BUCKET" in got["wgrad"]
    assert {"NEED_DQ", "DROPOUT", "FROM_KQV"} <= set(got["qside_bwd"])
    assert got["mm_psum"] == [[128, 64, 8], [64, 64, 4]]
    assert [128, 256, 64] not in got["embed_fwd_tiles"] and [128, 128, 32] not in got["embed_fwd_tiles"]


def test_a_timed_step_cut_by_its_box_keeps_what_it_measured(tmp_path):
    """The second case's first variant runs past the box: the first case's records (here errors: no CUDA
    events on a CPU) and the cut case's finished variants are in results.jsonl, the third case is marked
    not run, and the step is a timeout."""
    from benchmarks import gpu_steps
    from benchmarks.common import Case, Variant

    def slow(_):
        time.sleep(30)

    def case(name, variants):
        return Case("mlp", name, {"rows": 1}, "bf16", "fwd", lambda: None, variants)

    quick = Variant(lambda _: (lambda: None), baseline=True)
    cases = [case("one", {"eager": quick}), case("two", {"eager": quick, "slow": Variant(slow)}),
             case("three", {"eager": quick})]
    ctx = gpu_check.Run(tmp_path, budget_s=60, tier=1, plan=False)
    ctx.peaks = {"matmul_tflops": 1.0, "copy_gbps": 1.0, "nominal_h100_sxm_bf16_tflops": 989.0}
    step = gpu_check.Step("ops", (1,), 1.0, lambda c: gpu_steps.time_cases(c, cases, "bench"), None, "times")
    assert gpu_check.run_step(ctx, step)["status"] == "timeout"
    bench = [r for r in gpu_check.load_records(ctx.results) if r["kind"] == "bench"]
    assert [(r["case"], r["variant"]) for r in bench] == [("one", "eager"), ("two", "eager"), ("three", "-")]
    assert "time box" in bench[-1]["error"]
