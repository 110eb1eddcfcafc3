"""Backend selection: use_backend / get_backend, FASTVIT_BACKEND, auto's choice, clear errors."""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

import fastvit
from fastvit import backend, ops
from fastvit.backend import BackendUnavailableError


@pytest.fixture
def registry():
    """Snapshot the kernel registry and availability checks; restore them after the test."""
    impls = {fn: dict(v) for fn, v in backend._impls.items()}
    avail, auto_avail = dict(backend._availability), dict(backend._auto_availability)
    yield backend
    for fn in impls:
        backend._impls[fn] = impls[fn]
    backend._availability.update(avail)
    backend._auto_availability.update(auto_avail)
    backend._availability_cache.clear()


def test_default_and_eager_serves_every_function():
    assert fastvit.get_backend() == dict.fromkeys(backend.FAMILIES, "auto")
    for fn in ("patch_embed", "soft_split", "attention", "performer_attention", "layer_norm", "layernorm_mlp"):
        assert hasattr(ops, fn) and "eager" in backend.implementations(fn)


def test_use_backend_function_and_context_manager():
    fastvit.use_backend("eager")
    assert fastvit.get_backend("mlp") == "eager"
    with fastvit.use_backend({"attention": "auto"}):
        assert fastvit.get_backend() == {"embed": "eager", "attention": "auto", "performer": "eager", "mlp": "eager"}
        with fastvit.use_backend("AUTO"):
            assert set(fastvit.get_backend().values()) == {"auto"}
        assert fastvit.get_backend("attention") == "auto" and fastvit.get_backend("mlp") == "eager"
    assert fastvit.get_backend() == dict.fromkeys(backend.FAMILIES, "eager")


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("fast", ValueError, "backend must be one of"),
        ({"mlpp": "eager"}, ValueError, "unknown op family 'mlpp'"),
        ({"mlp": "tpu"}, ValueError, "backend for family 'mlp' must be one of"),
        (3, TypeError, "backend must be a str or a dict"),
        ("mlp=eager,attention", ValueError, "expected 'name' or 'family=name"),
    ],
)
def test_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        fastvit.use_backend(spec)
    assert set(fastvit.get_backend().values()) == {"auto"}  # a rejected spec changes nothing


def test_backend_without_kernel_is_not_available(registry):
    for fn in backend.FUNCTIONS:
        registry._impls[fn].pop("triton", None)
    registry.register_availability("triton", lambda: None)
    with pytest.raises(BackendUnavailableError, match="backend 'triton' is not available for family 'attention'"):
        fastvit.use_backend({"attention": "triton"})
    registry.register_availability("cuda", lambda: "no CUDA GPU is visible")
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available for 'mlp': no CUDA GPU"):
        fastvit.use_backend({"mlp": "cuda"})


def test_registered_kernel_is_selected_and_refuses_with_its_reason(registry):
    calls = []

    def fake_attention(q, k, v, mask, scale, dropout_p):
        calls.append(q.shape)
        return torch.zeros_like(q)

    registry.register_availability("triton", lambda: None)
    registry.register("attention", "triton", fake_attention, lambda q, *a: None if q.shape[-1] == 16 else f"head dim {q.shape[-1]}")
    q = torch.randn(1, 2, 5, 16)
    with fastvit.use_backend({"attention": "triton"}):
        assert torch.equal(ops.attention(q, q, q), torch.zeros_like(q)) and len(calls) == 1
        q88 = torch.randn(1, 2, 5, 88)
        with pytest.raises(BackendUnavailableError, match="cannot serve attention here: head dim 88"):
            ops.attention(q88, q88, q88)
    # auto never takes a fused backend for CPU tensors: the interpreter is a testing tool
    assert not torch.equal(ops.attention(q, q, q), torch.zeros_like(q)) and len(calls) == 1


def test_auto_order_triton_cuda_eager_without_a_measured_order(registry, monkeypatch):
    registry.register_availability("triton", lambda: None)
    registry.register_availability("cuda", lambda: None)
    registry.register("layer_norm", "triton", lambda *a: "triton", lambda x, *a: None if x.shape[-1] % 2 == 0 else "odd C")
    registry.register("layer_norm", "cuda", lambda *a: "cuda", lambda x, *a: None if x.shape[-1] % 3 == 0 else "C % 3")
    assert backend.select("layer_norm", torch.empty(2, 6), None, None, 1e-5).backend == "eager"  # CPU input
    monkeypatch.setattr(backend, "_auto_arch", lambda args, kwargs: 9)  # as for inputs on an sm_90 GPU
    assert backend.auto_order("mlp", 9) == ("triton", "cuda", "eager")
    assert backend.select("layer_norm", torch.empty(2, 6, device="meta"), None, None, 1e-5).backend == "triton"
    assert backend.select("layer_norm", torch.empty(2, 9, device="meta"), None, None, 1e-5).backend == "cuda"
    assert backend.select("layer_norm", torch.empty(2, 7, device="meta"), None, None, 1e-5).backend == "eager"
    # a measured order for this family and architecture wins; other architectures keep the default
    monkeypatch.setitem(backend.AUTO_ORDER_MEASURED, ("mlp", 9), (("cuda", "triton"), "benchmarks/results/x.md"))
    assert backend.auto_order("mlp", 9) == ("cuda", "triton", "eager") and backend.auto_order("mlp", 8)[0] == "triton"
    assert backend.auto_order("attention", 9)[0] == "triton" and backend.auto_order("mlp", None) == ("eager",)
    assert backend.select("layer_norm", torch.empty(2, 6, device="meta"), None, None, 1e-5).backend == "cuda"
    with pytest.raises(ValueError, match="unknown op family 'mpl'"):
        backend.auto_order("mpl", 9)


def test_every_measured_auto_order_cites_a_committed_result():
    root = pathlib.Path(__file__).resolve().parents[1]
    for (family, arch), (order, source) in backend.AUTO_ORDER_MEASURED.items():
        assert family in backend.FAMILIES and arch >= 7, (family, arch)
        assert set(order) <= {"triton", "cuda"} and len(set(order)) == len(order), order
        assert source.startswith("benchmarks/results/") and (root / source).is_file(), f"{family} sm_{arch}0: {source}"


def test_env_var_parsing(monkeypatch):
    monkeypatch.setenv("FASTVIT_BACKEND", "mlp=eager, attention=auto")
    backend._init_from_env()
    assert fastvit.get_backend("mlp") == "eager" and fastvit.get_backend("embed") == "auto"
    monkeypatch.setenv("FASTVIT_BACKEND", "warp")
    with pytest.raises(ValueError, match="FASTVIT_BACKEND='warp'"):
        backend._init_from_env()


def test_env_var_is_read_at_import():
    env = {**os.environ, "FASTVIT_BACKEND": "eager"}
    out = subprocess.run(
        [sys.executable, "-c", "import fastvit; print(sorted(set(fastvit.get_backend().values())))"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "['eager']"


def test_add_function(registry):
    families = {k: v for k, v in backend.FAMILIES.items()}
    try:
        registry.add_function("soft_split_layer_norm_test", "embed")
        assert backend.FUNCTIONS["soft_split_layer_norm_test"] == "embed"
        registry.register("soft_split_layer_norm_test", "eager", lambda x: x + 1)
        assert backend.dispatch("soft_split_layer_norm_test", 1) == 2
        with pytest.raises(ValueError, match="already belongs to family 'embed'"):
            registry.add_function("soft_split_layer_norm_test", "mlp")
        with pytest.raises(ValueError, match="family must be one of"):
            registry.add_function("x", "vision")
    finally:
        backend.FAMILIES.clear()
        backend.FAMILIES.update(families)
        backend.FUNCTIONS.pop("soft_split_layer_norm_test", None)
        backend._impls.pop("soft_split_layer_norm_test", None)


def test_availability_is_a_constant_under_torch_compile(registry):
    """torch.compile(fullgraph=True) calls the availability checks eagerly (they may lock, read files, run nvcc)."""
    import threading

    lock = threading.RLock()

    def check():
        with lock:  # dynamo cannot trace an RLock: it must not try
            return "built elsewhere"

    registry.register_availability("cuda", lambda: None, auto_check=check)

    def f(x):
        return x + (1.0 if backend.availability("cuda", auto=True) is None else 2.0)

    assert torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist() == [2.0, 2.0]
    assert backend.availability("cuda") is None


@pytest.mark.parametrize("name", ["triton", "eager", "auto"])
def test_meta_device_models_run_under_any_named_backend(name):
    """Meta tensors carry no data: with a backend named explicitly, a model built and run on the meta
    device gets its shapes from the ops' meaning (no BackendUnavailableError)."""
    try:
        fastvit.use_backend(name)
    except BackendUnavailableError as e:
        pytest.skip(f"{name} cannot be named here: {e}")
    tiny = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_classes=10)
    with torch.device("meta"):
        vit = fastvit.create_model("vit_tiny_patch16_224", **tiny)
        t2t = fastvit.create_model("t2t_vit_7", img_size=32, num_classes=10)
        x = torch.empty(2, 3, 32, 32)
    assert vit(x).shape == (2, 10) and vit(x).device.type == "meta"
    assert t2t(x).shape == (2, 10)
