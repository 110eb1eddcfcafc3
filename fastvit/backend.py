"""Backend state and selection.

Every public op belongs to a family (``embed``, ``attention``, ``performer``, ``mlp``), and each
family runs on one backend: ``"eager"`` (``fastvit.reference``, plain PyTorch), ``"triton"``,
``"cuda"``, or ``"auto"``, which picks per call the first backend that can serve the inputs in the
order :func:`auto_order` gives for the family and the GPU's architecture (measured, or Triton
before CUDA), eager last. The choice is process-wide module state, set by :func:`use_backend` and read only by the
Python front of each op (never inside an op body, where ``torch.compile`` would bake it in).
``FASTVIT_BACKEND`` (``"triton"`` or ``"mlp=cuda,attention=triton"``) is read once when fastvit
is imported.

Kernels plug in with :func:`register` (one implementation per function and backend, with an
optional ``why_not(*args, **kwargs) -> str | None`` that names the inputs it cannot serve) and
backends with :func:`register_availability`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

BACKENDS = ("auto", "eager", "triton", "cuda")
FAMILIES: dict[str, tuple[str, ...]] = {
    "embed": ("patch_embed", "soft_split"),
    "attention": ("attention", "attention_qkvpacked"),
    "performer": ("performer_attention",),
    "mlp": ("layer_norm", "layernorm_mlp"),
}
FUNCTIONS: dict[str, str] = {fn: fam for fam, fns in FAMILIES.items() for fn in fns}
BACKEND_ORDER = ("triton", "cuda", "eager")  # how backends are listed (implementations(), messages)

# "auto"'s order of the fused backends per (family, GPU architecture = compute capability major), the
# fastest measured first. Every entry cites the committed result it was read from (a test checks that
# the file exists): {("mlp", 9): (("triton", "cuda"), "benchmarks/results/h200/<date>-<commit>/summary.md")}.
# Without an entry Triton comes before CUDA (DESIGN.md): the CUDA GEMMs are CUTLASS 2.x mma.sync
# kernels, which on Hopper usually reach about half of cuBLAS, while Triton compiles to wgmma.
# No GPU result is committed yet, so the table is empty.
AUTO_ORDER_MEASURED: dict[tuple[str, int], tuple[tuple[str, ...], str]] = {}
AUTO_ORDER_DEFAULT = ("triton", "cuda")
ENV_VAR = "FASTVIT_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot serve the request."""


@dataclass(frozen=True)
class Impl:
    """One backend's implementation of one public function."""

    fn: str
    backend: str
    call: Callable
    why_not: Callable[..., str | None] | None = None

    def reason(self, *args, **kwargs) -> str | None:
        """None when this implementation serves these (already checked) inputs, else why not."""
        return None if self.why_not is None else self.why_not(*args, **kwargs)


def _triton_available() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        return None
    return "no CUDA GPU is visible (TRITON_INTERPRET=1 runs Triton kernels on CPU tensors, for tests)"


def _cuda_available() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    from fastvit import _ext

    return _ext.unavailable_reason(build_if_missing=True)


def _cuda_prebuilt() -> str | None:
    """What "auto" asks: the extension loads without compiling (a first build takes minutes, so only
    naming "cuda" or ``python -m fastvit.build`` starts one)."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    from fastvit import _ext

    return _ext.unavailable_reason(build_if_missing=False)


_impls: dict[str, dict[str, Impl]] = {fn: {} for fn in FUNCTIONS}
_availability: dict[str, Callable[[], str | None]] = {
    "eager": lambda: None,
    "triton": _triton_available,
    "cuda": _cuda_available,
}
_auto_availability: dict[str, Callable[[], str | None]] = {**_availability, "cuda": _cuda_prebuilt}
_availability_cache: dict[tuple[str, bool], str | None] = {}
_state: dict[str, str] = dict.fromkeys(FAMILIES, "auto")


def add_function(fn: str, family: str) -> None:
    """Declare another public function of ``family`` (e.g. a packed or fused variant of its ops)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    if not fn.isidentifier():
        raise ValueError(f"fn must be an identifier, got {fn!r}")
    if FUNCTIONS.get(fn, family) != family:
        raise ValueError(f"{fn!r} already belongs to family {FUNCTIONS[fn]!r}")
    if fn not in FUNCTIONS:
        FAMILIES[family] = (*FAMILIES[family], fn)
        FUNCTIONS[fn] = family
        _impls[fn] = {}


def register(fn: str, backend: str, call: Callable, why_not: Callable[..., str | None] | None = None) -> Impl:
    """Make ``call`` the ``backend`` implementation of public function ``fn``.

    ``call`` and ``why_not`` receive the arguments exactly as the op's front passes them (checked,
    autocast applied); ``why_not`` runs on every call and must stay cheap and traceable by
    torch.compile (shapes, dtypes, strides only). Registering twice for the same (fn, backend)
    replaces the first.
    """
    if fn not in FUNCTIONS:
        raise ValueError(f"fn must be one of {sorted(FUNCTIONS)}, got {fn!r}")
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend must be one of 'eager', 'triton', 'cuda', got {backend!r}")
    impl = Impl(fn, backend, call, why_not)
    _impls[fn][backend] = impl
    return impl


def register_availability(
    backend: str, check: Callable[[], str | None], auto_check: Callable[[], str | None] | None = None
) -> None:
    """Replace the check that says whether ``backend`` can run at all (None = yes, else why not).

    ``auto_check``, if given, is what ``"auto"`` asks instead (e.g. "already built", where ``check``
    would start a build).
    """
    if backend not in ("triton", "cuda"):
        raise ValueError(f"backend must be 'triton' or 'cuda', got {backend!r}")
    _availability[backend] = check
    _auto_availability[backend] = auto_check or check
    _availability_cache.pop((backend, False), None)
    _availability_cache.pop((backend, True), None)


@torch.compiler.assume_constant_result  # traced by torch.compile as a constant: checks run eagerly, once
def availability(backend: str, auto: bool = False) -> str | None:
    """None when ``backend`` can run on this machine, else the reason it cannot (checked once).

    With ``auto=True``, what ``"auto"`` asks, which never starts a build of the CUDA extension.
    """
    key = (backend, auto)
    if key not in _availability_cache:
        _availability_cache[key] = (_auto_availability if auto else _availability)[backend]()
        if not auto and _availability_cache[key] is None:
            _availability_cache.pop((backend, True), None)  # e.g. built just now: auto may use it too
    return _availability_cache[key]


def implementations(fn: str) -> tuple[str, ...]:
    """The backends that have an implementation of ``fn`` (triton, cuda, eager order)."""
    return tuple(b for b in BACKEND_ORDER if b in _impls[fn])


def auto_order(family: str, arch: int | None) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``family`` on a GPU of compute capability ``arch``.x (None: no
    GPU input), eager last: the measured order from ``AUTO_ORDER_MEASURED``, else Triton before CUDA."""
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; families are {tuple(FAMILIES)}")
    fused = AUTO_ORDER_MEASURED.get((family, arch), (AUTO_ORDER_DEFAULT, ""))[0] if arch is not None else ()
    return (*fused, "eager")


@torch.compiler.assume_constant_result  # a constant to torch.compile, like availability()
def _arch(index: int) -> int:
    """Compute capability major of CUDA device ``index`` (cached)."""
    if index not in _arch_cache:
        _arch_cache[index] = torch.cuda.get_device_capability(index)[0]
    return _arch_cache[index]


_arch_cache: dict[int, int] = {}


def _parse(spec) -> dict[str, str]:
    if isinstance(spec, str):
        text = spec.strip().lower()
        if "=" in text:  # the FASTVIT_BACKEND form "mlp=cuda,attention=triton"
            pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"backend spec {spec!r}: expected 'name' or 'family=name,family=name'")
            return _parse({k.strip(): v.strip() for k, v in pairs})
        if text not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or a dict family -> backend, got {spec!r}")
        return dict.fromkeys(FAMILIES, text)
    if isinstance(spec, Mapping):
        out = {}
        for fam, name in spec.items():
            if fam not in FAMILIES:
                raise ValueError(f"unknown op family {fam!r} in backend dict; families are {tuple(FAMILIES)}")
            if not isinstance(name, str) or name.lower() not in BACKENDS:
                raise ValueError(f"backend for family {fam!r} must be one of {BACKENDS}, got {name!r}")
            out[fam] = name.lower()
        return out
    raise TypeError(f"backend must be a str or a dict family -> backend name, got {type(spec).__name__}")


def _check_can_serve(family: str, name: str) -> None:
    if name in ("auto", "eager"):
        return
    reason = availability(name)
    if reason is not None:
        raise BackendUnavailableError(f"fastvit: backend {name!r} is not available for {family!r}: {reason}")
    if not any(name in _impls[fn] for fn in FAMILIES[family]):
        served = sorted({b for fn in FAMILIES[family] for b in _impls[fn]})
        raise BackendUnavailableError(
            f"fastvit: backend {name!r} is not available for family {family!r}: no {name} kernel is "
            f"registered for {', '.join(FAMILIES[family])}. Backends that serve it: {served}; "
            f"use 'auto', or a dict such as {{{family!r}: 'eager'}}."
        )


class use_backend:
    """Select backends: ``use_backend("triton")``, ``use_backend({"mlp": "cuda", "attention": "triton"})``.

    Takes effect at once; used as a context manager, the previous selection comes back on exit.
    A dict changes only the families it names. Naming a backend that cannot run here, or that has no
    kernel for a family, raises :class:`BackendUnavailableError` now rather than at the first call.
    """

    def __init__(self, spec: str | Mapping[str, str]):
        new = _parse(spec)
        for fam, name in new.items():
            _check_can_serve(fam, name)
        self._previous = dict(_state)
        _state.update(new)

    def __enter__(self) -> use_backend:
        return self

    def __exit__(self, *exc) -> None:
        _state.update(self._previous)


def get_backend(family: str | None = None) -> str | dict[str, str]:
    """The selected backend of ``family``, or a dict family -> backend for all families."""
    if family is None:
        return dict(_state)
    if family not in FAMILIES:
        raise ValueError(f"unknown op family {family!r}; families are {tuple(FAMILIES)}")
    return _state[family]


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)


def _auto_arch(args, kwargs) -> int | None:
    """The compute capability major of the first tensor input's GPU; None for CPU (or meta) inputs,
    for which auto looks at eager only."""
    x = _first_tensor(args, kwargs)
    if x is None or x.device.type != "cuda":
        return None
    return _arch(x.device.index if x.device.index is not None else torch.cuda.current_device())


def _without_data(args, kwargs) -> bool:
    """The inputs carry no data: meta tensors, or fake tensors outside torch.compile (whose tracing
    Python does not see as fake)."""
    x = _first_tensor(args, kwargs)
    return x is not None and (x.device.type == "meta" or isinstance(x, FakeTensor))


def select(fn: str, *args, **kwargs) -> Impl:
    """The implementation of ``fn`` that serves these inputs under the current selection.

    ``"auto"`` considers the fused backends only for CUDA tensors (the Triton interpreter is a
    testing tool, not a CPU path) and falls back to eager.
    """
    name = _state[FUNCTIONS[fn]]
    impls = _impls[fn]
    if torch.compiler.is_exporting():
        # torch.export (and torch.onnx.export) records the op's eager meaning: an exported program is
        # a portable artifact (ONNX, ExecuTorch, AOTInductor, any device), not tied to fastvit's kernels.
        return impls["eager"]
    if name == "auto":
        for b in auto_order(FUNCTIONS[fn], _auto_arch(args, kwargs)):
            impl = impls.get(b)
            if impl is None:
                continue
            if b != "eager" and availability(b, auto=True) is not None:
                continue
            if impl.reason(*args, **kwargs) is None:
                return impl
        raise BackendUnavailableError(f"fastvit: no backend serves {fn} for these inputs")  # eager serves all
    if _without_data(args, kwargs):
        # Meta and fake tensors carry no data: whichever backend is named, the op's meaning gives the
        # shapes (meta-device construction, FakeTensorMode shape inference and make_fx tracing work
        # under any selection; the Triton interpreter could not run on them).
        return impls["eager"]
    impl = impls.get(name)
    if impl is None:
        raise BackendUnavailableError(
            f"fastvit: backend {name!r} has no kernel for {fn} (backends with one: {implementations(fn)}); "
            f"select 'auto' or another backend for family {FUNCTIONS[fn]!r}"
        )
    reason = availability(name) or impl.reason(*args, **kwargs)
    if reason is not None:
        raise BackendUnavailableError(f"fastvit: backend {name!r} cannot serve {fn} here: {reason}")
    return impl


def dispatch(fn: str, *args, **kwargs):
    """Run ``fn`` on the selected backend."""
    return select(fn, *args, **kwargs).call(*args, **kwargs)


def _init_from_env() -> None:
    spec = os.environ.get(ENV_VAR, "").strip()
    if not spec:
        return
    try:
        use_backend(spec)
    except (ValueError, TypeError, BackendUnavailableError) as e:
        raise type(e)(f"{ENV_VAR}={spec!r}: {e}") from None
