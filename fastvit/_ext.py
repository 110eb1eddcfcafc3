"""Build and load the CUDA extension (csrc/) once per torch / CUDA / GPU-arch configuration.

The first use compiles ``csrc/*.cu`` and ``csrc/bindings*.cpp`` with ninja through
``torch.utils.cpp_extension.load`` (a few minutes; ``python -m fastvit.build`` does it ahead of
time) into ``$TORCH_EXTENSIONS_DIR/fastvit_cuda_<hash>/``; the hash covers the sources, torch, CUDA,
the arch list and the flags, so a changed configuration builds anew and an unchanged one loads in
milliseconds. Arches come from ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0a"``).

Needs a CUDA toolkit whose major.minor matches ``torch.version.cuda`` (``CUDA_HOME``, else the pip
toolkit ``cuda-toolkit[nvcc,cccl,cudart]`` in site-packages/nvidia/cu<major>, else the system's) and
the CUTLASS headers (``CUTLASS_PATH``, else the pip package ``nvidia-cutlass``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import threading

import torch

DEFAULT_ARCHS = "8.0;9.0a"
SOURCES = ("bindings.cpp", "mlp.cu", "mlp_gemm_f32.cu", "mlp_gemm_f16.cu", "mlp_gemm_bf16.cu",
           "bindings_attention.cpp", "attention.cu", "attention_sm90.cu", "bindings_embed.cpp", "embed.cu", "embed_split.cu",
           "bindings_performer.cpp", "performer.cu")
# host-only: the tests' CPU warp emulator (load_emulator)
EMULATOR_SOURCES = ("attention_emulate.cpp", "embed_emulate.cpp", "performer_emulate.cpp")
FAMILIES = ("mlp", "attention", "embed", "performer")  # fastvit.csrc.<family> registers each family's fakes and autograd
_CXX_FLAGS = ["-O3"]  # torch picks the C++ standard its headers need
_NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DNDEBUG", "-lineinfo", "-diag-suppress=20013,20015"]

_lock = threading.RLock()
_loaded: pathlib.Path | None = None


class ExtensionError(RuntimeError):
    """The CUDA extension cannot be built or loaded here; the message says why and what to do."""


def csrc_dir() -> pathlib.Path:
    """Where the CUDA sources are (the fastvit.csrc package: the repository's csrc/, or the wheel's copy)."""
    spec = importlib.util.find_spec("fastvit.csrc")
    if spec is None or spec.origin is None:
        raise ExtensionError("fastvit.csrc is not installed: reinstall fastvit (pip install -e .)")
    return pathlib.Path(spec.origin).parent


def _nvcc_version(home: pathlib.Path) -> str | None:
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        return None
    try:
        out = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _pip_toolkit() -> pathlib.Path | None:
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not torch.version.cuda:
        return None
    major = torch.version.cuda.split(".")[0]
    for root in spec.submodule_search_locations or ():
        home = pathlib.Path(root) / f"cu{major}"
        if (home / "bin" / "nvcc").exists():
            return home
    return None


@functools.cache
def cuda_home() -> tuple[pathlib.Path, str]:
    """The CUDA toolkit to build with and its nvcc release ("13.2"); raises ExtensionError if none fits."""
    want = ".".join((torch.version.cuda or "").split(".")[:2])
    if not want:
        raise ExtensionError(f"this torch ({torch.__version__}) is a CPU-only build: the CUDA backend needs a CUDA build")
    candidates: list[tuple[str, pathlib.Path]] = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append((f"${var}", pathlib.Path(os.environ[var])))
    pip = _pip_toolkit()
    if pip is not None:
        candidates.append(("pip cuda-toolkit", pip))
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME:
        candidates.append(("torch's CUDA_HOME", pathlib.Path(cpp_extension.CUDA_HOME)))
    candidates.append(("/usr/local/cuda", pathlib.Path("/usr/local/cuda")))
    found = [(label, home, _nvcc_version(home)) for label, home in candidates]
    for same in (lambda v: v == want, lambda v: v.split(".")[0] == want.split(".")[0]):  # exact, then same major
        for _, home, version in found:
            if version is not None and same(version):
                return home, version
    seen = "; ".join(f"{label} {home}: " + (f"nvcc {v}" if v else "no nvcc") for label, home, v in found)
    raise ExtensionError(
        f"no CUDA toolkit matching torch's CUDA {want} was found ({seen}). Install one with "
        f'pip install "cuda-toolkit[nvcc,cccl,cudart]=={want}.*" or set CUDA_HOME.'
    )


def cutlass_include() -> pathlib.Path:
    """The CUTLASS include directory (``$CUTLASS_PATH[/include]``, else the nvidia-cutlass package's)."""
    if os.environ.get("CUTLASS_PATH"):
        root = pathlib.Path(os.environ["CUTLASS_PATH"])
        for inc in (root / "include", root):
            if (inc / "cutlass" / "cutlass.h").exists():
                return inc
        raise ExtensionError(f"CUTLASS_PATH={root} has no include/cutlass/cutlass.h")
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.origin is not None:
        inc = pathlib.Path(spec.origin).parent / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").exists():
            return inc
    raise ExtensionError(
        'the CUTLASS headers were not found: pip install --no-deps "nvidia-cutlass>=4.2,<5", or set CUTLASS_PATH'
    )


def arch_list() -> list[str]:
    """The GPU architectures to build for: ``TORCH_CUDA_ARCH_LIST`` or ``"8.0;9.0a"``."""
    text = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    archs = [a for a in re.split(r"[;\s,]+", text.strip()) if a]
    for a in archs:
        if not re.fullmatch(r"\d+\.\d+[af]?(\+PTX)?", a):
            raise ExtensionError(f"TORCH_CUDA_ARCH_LIST: cannot read arch {a!r} (expected e.g. '8.0;9.0a')")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """nvcc -gencode flags for arches such as "8.0", "9.0a", "8.6+PTX"."""
    flags = []
    for a in archs:
        ptx = a.endswith("+PTX")
        num = a.removesuffix("+PTX").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def arch_defines(archs: list[str]) -> list[str]:
    """Macros naming the arch-specific images in the build: FASTVIT_SM90A when "9.0a" is one and plain
    "9.0" is not (the Hopper attention kernels serve sm_90 devices only then: with both images the
    loader could pick the one without wgmma)."""
    plain = [a.removesuffix("+PTX") for a in archs]
    return ["-DFASTVIT_SM90A"] if "9.0a" in plain and "9.0" not in plain else []


def _digest(archs: list[str], nvcc_version: str) -> str:
    h = hashlib.sha256()
    src = csrc_dir()
    for name in sorted(p.name for p in src.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")):
        h.update(name.encode())
        h.update((src / name).read_bytes())
    for part in (torch.__version__, torch.version.cuda or "", nvcc_version, *archs, *_CXX_FLAGS, *_NVCC_FLAGS):
        h.update(part.encode())
    try:  # another CUTLASS is another build
        h.update((cutlass_include() / "cutlass" / "version.h").read_bytes())
    except (ExtensionError, OSError):
        pass
    return h.hexdigest()[:12]


def _extensions_root() -> pathlib.Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return pathlib.Path(root) if root else pathlib.Path(cpp_extension.get_default_build_root()) / "fastvit"


def build_dir(archs: list[str] | None = None, nvcc_version: str | None = None) -> tuple[str, pathlib.Path]:
    """(extension name, build directory) for this configuration."""
    archs = arch_list() if archs is None else archs
    if nvcc_version is None:
        nvcc_version = cuda_home()[1]
    name = f"fastvit_cuda_{_digest(archs, nvcc_version)}"
    return name, _extensions_root() / name


def _library_file(name: str, directory: pathlib.Path) -> pathlib.Path:
    return directory / f"{name}.so"


def is_loaded() -> bool:
    """True once the extension's ops are registered in this process."""
    return _loaded is not None


def is_built() -> bool:
    """True when a build for this configuration is on disk (loading it compiles nothing)."""
    if _loaded is not None:
        return True
    try:
        name, directory = build_dir()
    except ExtensionError:
        return False
    return _library_file(name, directory).exists()


@contextlib.contextmanager
def _toolkit(home: pathlib.Path):
    """Point torch.utils.cpp_extension at ``home`` for the duration of a build."""
    from torch.utils import cpp_extension

    saved_env, saved_home = os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME
    os.environ["CUDA_HOME"] = str(home)
    cpp_extension.CUDA_HOME = str(home)
    try:
        yield
    finally:
        cpp_extension.CUDA_HOME = saved_home
        if saved_env is None:
            os.environ.pop("CUDA_HOME", None)
        else:
            os.environ["CUDA_HOME"] = saved_env


def _link_flags(home: pathlib.Path, directory: pathlib.Path) -> list[str]:
    """-L/-rpath for libcudart; the pip toolkit ships only libcudart.so.<major>, linked through a symlink."""
    for sub in ("lib64", "lib"):
        lib = home / sub
        if (lib / "libcudart.so").exists():
            return [f"-L{lib}", f"-Wl,-rpath,{lib}"]
    lib = home / "lib"
    real = sorted(lib.glob("libcudart.so.*"))
    if not real:
        raise ExtensionError(f"no libcudart.so in {home}/lib64 or {home}/lib: install cuda-toolkit[cudart]")
    shim = directory / "cudart_link"
    shim.mkdir(parents=True, exist_ok=True)
    target = shim / "libcudart.so"
    if not target.exists():
        target.symlink_to(real[0])
    return [f"-L{shim}", f"-Wl,-rpath,{lib}"]


def build(verbose: bool = False) -> pathlib.Path:
    """Compile the extension for this configuration if it is not on disk; return the library's path."""
    home, version = cuda_home()
    archs = arch_list()
    include = cutlass_include()
    name, directory = build_dir(archs, version)
    lib = _library_file(name, directory)
    if lib.exists():
        return lib
    from torch.utils import cpp_extension

    directory.mkdir(parents=True, exist_ok=True)
    src = csrc_dir()
    print(
        f"fastvit: compiling the CUDA extension for {';'.join(archs)} with nvcc {version} ({home}) into {directory}; "
        "this takes a few minutes, once per configuration (python -m fastvit.build does it ahead of time)",
        file=sys.stderr, flush=True,
    )
    with _toolkit(home):
        try:
            cpp_extension.load(
                name=name,
                sources=[str(src / s) for s in SOURCES],
                extra_cflags=_CXX_FLAGS,
                extra_cuda_cflags=[*_NVCC_FLAGS, *gencode_flags(archs), *arch_defines(archs)],
                extra_include_paths=[str(src), str(include)],
                extra_ldflags=_link_flags(home, directory),
                build_directory=str(directory),
                is_python_module=False,
                verbose=verbose,
            )
        except (RuntimeError, subprocess.CalledProcessError) as e:
            raise ExtensionError(f"fastvit: building the CUDA extension failed in {directory}: {e}") from e
    if not lib.exists():
        raise ExtensionError(f"fastvit: the build finished but {lib} is missing")
    return lib


def load(build_if_missing: bool = True) -> pathlib.Path:
    """Load the extension (building it first unless ``build_if_missing=False``) and register its ops'
    fake implementations and autograd. Idempotent; raises ExtensionError with the reason when it cannot."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if build_if_missing:
            lib = build()
        else:
            name, directory = build_dir()
            lib = _library_file(name, directory)
            if not lib.exists():
                raise ExtensionError("the CUDA extension is not built for this configuration: python -m fastvit.build")
        try:
            torch.ops.load_library(str(lib))
        except OSError as e:
            raise ExtensionError(f"fastvit: loading {lib} failed: {e}") from e
        _loaded = lib
        for family in FAMILIES:
            importlib.import_module(f"fastvit.csrc.{family}")
        return lib


_emulator: pathlib.Path | None = None


def load_emulator() -> pathlib.Path:
    """Build with the host compiler (no nvcc, no GPU) and load the CPU warp emulator of the CUDA kernels
    (csrc/emulate.h; csrc/<family>_emulate.cpp): it registers the CPU kernels of the CUDA attention, embed
    and performer ops, so the tests run the CUDA kernels' code on CPU tensors. Loads the extension first
    (it defines the ops)."""
    global _emulator
    with _lock:
        if _emulator is not None:
            return _emulator
        load()
        home, _ = cuda_home()
        name = "fastvit_emulate_" + build_dir()[0].rsplit("_", 1)[1]
        directory = _extensions_root() / name
        lib = _library_file(name, directory)
        if not lib.exists():
            from torch.utils import cpp_extension

            directory.mkdir(parents=True, exist_ok=True)
            src = csrc_dir()
            try:
                cpp_extension.load(
                    name=name, sources=[str(src / s) for s in EMULATOR_SOURCES], extra_cflags=_CXX_FLAGS,
                    extra_include_paths=[str(src), str(home / "include")], build_directory=str(directory),
                    is_python_module=False,
                )
            except (RuntimeError, subprocess.CalledProcessError) as e:
                raise ExtensionError(f"fastvit: building the warp emulator failed in {directory}: {e}") from e
        torch.ops.load_library(str(lib))
        _emulator = lib
        return lib


def unavailable_reason(build_if_missing: bool) -> str | None:
    """None when the extension is (or, with ``build_if_missing``, can be made) loaded, else why not."""
    try:
        load(build_if_missing)
    except ExtensionError as e:
        return str(e)
    return None
