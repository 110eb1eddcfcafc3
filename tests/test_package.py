"""The package as installed: public names, kernels/ and csrc/ mapped into fastvit, the README quickstart."""

import importlib.resources
import pathlib
import re

import pytest

import fastvit
import fastvit.csrc
import fastvit.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_design_table_names_exist():
    for name in ("patch_embed", "soft_split", "attention", "performer_attention", "layer_norm", "layernorm_mlp"):
        assert callable(getattr(fastvit.ops, name))
        assert callable(getattr(fastvit.reference, name))
    for name in ("PatchEmbed", "SoftSplit", "Attention", "TokenPerformer", "LayerNormMLP", "Block"):
        assert isinstance(getattr(fastvit.nn, name), type)
    assert callable(fastvit.use_backend) and callable(fastvit.get_backend)


def test_distribution_is_fastvit_kernels_and_imports_as_fastvit():
    """pip's name is fastvit-kernels (timm ships an unrelated model family fastvit_*, Apple's FastViT)."""
    import importlib.metadata

    dist = importlib.metadata.distribution("fastvit-kernels")
    assert dist.version == fastvit.__version__
    assert "fastvit" in (dist.read_text("top_level.txt") or "fastvit").split()


def test_optimize_leaves_timms_apple_fastvit_alone():
    """fastvit.optimize matches module classes, never names: timm's fastvit_t8 (Apple's FastViT, a conv /
    attention hybrid unrelated to this package) comes out unchanged."""
    timm = pytest.importorskip("timm")
    import torch

    torch.manual_seed(0)
    model = timm.create_model("fastvit_t8", num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = fastvit.optimize(model)
    assert "nothing replaced" in str(report)
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_kernels_and_csrc_are_subpackages_of_fastvit():
    assert pathlib.Path(fastvit.kernels.__file__).parent.name == "kernels"
    csrc = importlib.resources.files("fastvit.csrc")
    assert csrc.is_dir() and (csrc / "__init__.py").is_file()
    from fastvit import _ext

    for name in _ext.SOURCES:
        assert (csrc / name).is_file(), name


def test_wheel_ships_the_cuda_sources(tmp_path):
    """A wheel carries csrc/ as fastvit/csrc (sources and headers) and kernels/ as fastvit/kernels."""
    import subprocess
    import sys
    import zipfile

    from fastvit import _ext

    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastvit_kernels-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    headers = {p.name for p in (ROOT / "csrc").glob("*.cuh")}
    for name in (*_ext.SOURCES, *headers, "mlp.py", "__init__.py"):
        assert f"fastvit/csrc/{name}" in names, name
    assert "fastvit/kernels/mlp.py" in names and "fastvit/_ext.py" in names


@pytest.mark.parametrize("section", ["Quickstart", "See inside a ViT", "Speed up an existing model", "An ordinary model: FX, export, ONNX, meta", "Models"])
def test_readme_examples_run(section):
    readme = (ROOT / "README.md").read_text()
    text = readme.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"README's {section} has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})


@pytest.mark.gpu
def test_every_op_runs_on_cuda_under_bf16_autocast():
    import torch

    from fastvit import ops

    dev = "cuda"
    x = torch.randn(2, 3, 32, 32, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        t = ops.patch_embed(x, torch.randn(64, 3, 8, 8, device=dev), None, 8)
        assert t.dtype == torch.bfloat16
        q = torch.randn(2, 4, 197, 64, device=dev)
        assert ops.attention(q, q, q).dtype == torch.bfloat16
        w = torch.randn(32, 64, device=dev)
        p = ops.performer_attention(t.float(), torch.randn(192, 64, device=dev), None, w, torch.randn(64, 64, device=dev), None)
        assert p.dtype == torch.bfloat16
        y = torch.randn(2, 16, 64, device=dev)
        assert ops.layer_norm(y).dtype == torch.bfloat16
        fc1, fc2 = torch.randn(256, 64, device=dev), torch.randn(64, 256, device=dev)
        assert ops.layernorm_mlp(y, None, None, fc1, None, fc2, None, residual=y).dtype == torch.float32


def test_torchscript_says_to_use_export_or_restore():
    """TorchScript is deprecated upstream and not supported: scripting a fastvit module, model, or a model
    after optimize raises one clear error; fastvit.restore(model) makes an optimized model scriptable again."""
    timm = pytest.importorskip("timm")
    import warnings

    import torch

    from fastvit import nn as fnn

    tiny = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    for module in (fnn.Block(dim=64, num_heads=4), fastvit.create_model("vit_tiny_patch16_224", **tiny)):
        with pytest.raises(RuntimeError, match="do not support TorchScript.*torch.export.export"):
            torch.jit.script(module)
    model = timm.create_model("vit_tiny_patch16_224", **tiny).eval()
    fastvit.optimize(model)
    with pytest.raises(RuntimeError, match="fastvit.restore"):
        torch.jit.script(model)
    fastvit.restore(model)
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script's own deprecation notice
        scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))


def test_readme_python_blocks_paste_into_a_python_prompt():
    """Fed line by line as the interactive prompt reads them (an indented block ends at a blank line), every
    README python block parses: no top-level statement right after an indented block."""
    import codeop

    readme = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S):
        buffer: list[str] = []
        for line in [*block.splitlines(), ""]:
            buffer.append(line)
            source = "\n".join(buffer)
            try:
                code = codeop.compile_command(source, "<stdin>", "single")
            except SyntaxError as e:
                raise AssertionError(f"pasting fails at {line!r}: {e}\n{source}") from None
            if code is not None or not source.strip():
                buffer = []
