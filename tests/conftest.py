"""Test harness: Triton's interpreter on CPU, a fixed seed per test, NaN-poisoned kernel outputs, the gpu marker."""

import os
import zlib

# CPU test tensors are tiny: one BLAS thread (the interpreter's tl.dot is a numpy matmul) avoids
# threads spin-waiting for cores, which made tiny ops ~100x slower on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Triton reads TRITON_INTERPRET when a kernel is defined: set it before anything imports triton.
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)

import pytest  # noqa: E402

import fastvit  # noqa: E402
from fastvit import _ext, _library  # noqa: E402

REQUIRE_BUILD = os.environ.get("FASTVIT_REQUIRE_CUDA_BUILD") == "1"


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    """Seed every test from its id (fixed, but different per test) and poison kernel outputs."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    _library.poison_outputs(True)
    yield
    _library.poison_outputs(False)


@pytest.fixture(autouse=True)
def _restore_backend():
    """No test leaks a backend selection into the next one."""
    before = fastvit.get_backend()
    yield
    fastvit.use_backend(before)


def _toolchain_missing() -> str | None:
    try:
        _ext.cuda_home()
        _ext.cutlass_include()
    except _ext.ExtensionError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def ext():
    """The loaded CUDA extension: built here if needed. Without a toolkit this skips, except in CI
    (FASTVIT_REQUIRE_CUDA_BUILD=1), where a missing toolkit or a failed build fails the run."""
    reason = _toolchain_missing()
    if reason is not None and not REQUIRE_BUILD:
        pytest.skip(f"no CUDA toolchain to build the extension with: {reason}")
    return _ext.load()


@pytest.fixture(scope="module")
def emulator(ext):
    """The CPU warp emulator of the CUDA kernels, loaded: the CUDA attention, embed and performer ops get CPU
    kernels that run the kernel bodies (csrc/emulate.h)."""
    return _ext.load_emulator()
