"""timm's own model tests (tests/test_models.py of the installed timm's sdist) pass on its small ViTs
after ``fastvit.optimize(backend="triton")``: every test that passes on plain timm passes optimized,
except timm's TorchScript tests, which fail with fastvit's one clear error (TorchScript is not supported).

The sdist is fetched once with pip (``pip download --no-binary``) into ~/.cache/fastvit. The two runs
(plain, optimized) take about two minutes on two cores; tests/timm_conftest.py (copied as their conftest) does the work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

HERE = Path(__file__).parent
# timm's tiny test ViTs (class token / register tokens, avg and map pooling, layer scale, RMSNorm,
# dynamic image size), the ViT-Ti people use, and a distilled DeiT
MODELS = ("test_vit", "test_vit2", "test_vit3", "test_vit4", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224")
CACHE = Path(os.environ.get("FASTVIT_CACHE", Path.home() / ".cache" / "fastvit"))


def timm_test_models() -> Path:
    """tests/test_models.py of the installed timm version, from its sdist (downloaded once)."""
    version = timm.__version__
    target = CACHE / f"timm-{version}-tests" / "test_models.py"
    if target.exists():
        return target
    download = CACHE / f"timm-{version}-sdist"
    download.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(download)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    archives = sorted(download.glob(f"timm-{version}.tar.gz"))
    assert archives, f"could not download timm {version}'s sdist ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}"
    with tarfile.open(archives[0]) as tar:
        member = tar.extractfile(f"timm-{version}/tests/test_models.py")
        assert member is not None, f"timm {version}'s sdist has no tests/test_models.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(member.read())
    return target


def run_timm_tests(workdir: Path, optimize: bool) -> dict:
    shutil.copy(timm_test_models(), workdir / "test_models.py")
    shutil.copy(HERE / "timm_conftest.py", workdir / "conftest.py")
    (workdir / "pytest.ini").write_text(
        "[pytest]\naddopts = -p no:cacheprovider\nfilterwarnings =\n    ignore::pytest.PytestUnknownMarkWarning\n"
    )
    outcomes = workdir / "outcomes.json"
    env = {**os.environ, "FASTVIT_TIMM_MODELS": ",".join(MODELS), "FASTVIT_TIMM_OUTCOMES": str(outcomes),
           "FASTVIT_TIMM_OPTIMIZE": "1" if optimize else "0"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", str(workdir)], cwd=workdir,
                          env=env, capture_output=True, text=True, timeout=600)
    assert outcomes.exists(), f"timm's tests did not run:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(outcomes.read_text())


@pytest.mark.slow
def test_timm_model_tests_pass_after_optimize(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "optimized").mkdir()
    plain = run_timm_tests(tmp_path / "plain", optimize=False)["outcomes"]
    result = run_timm_tests(tmp_path / "optimized", optimize=True)
    optimized = result["outcomes"]
    assert all(result["replaced"].get(m, 0) > 0 for m in MODELS), result["replaced"]  # optimize swapped in each
    assert set(plain) == set(optimized)
    assert len(plain) >= 6 * len(MODELS), sorted(plain)
    for model in MODELS:
        assert any(f"-{model}]" in k and v["outcome"] == "passed" for k, v in optimized.items()), model
    regressions, scripted = [], []
    for test, before in sorted(plain.items()):
        after = optimized[test]
        if "torchscript" in test:
            scripted.append(test)
            if after["outcome"] != "passed":
                assert "torch.export" in after["message"] and "fastvit.restore" in after["message"], after["message"]
            continue
        if before["outcome"] == "passed" and after["outcome"] != "passed":
            regressions.append(f"{test}: {after['message'][-1500:]}")
    assert scripted, "timm's TorchScript tests ran (and were expected to fail with fastvit's error)"
    assert not regressions, "\n\n".join(regressions)
