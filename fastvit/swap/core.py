"""The shared core of ``fastvit.optimize``: backend pinning, the report, the swapped-module
mechanism (a fastvit subclass of each original class, rebuilt by name when unpickled), ``restore``,
the source checks, and the helpers every library's swaps share. One module per library
(``timm``, ``vit_pytorch``, ``t2t_vit``) defines its swaps on top of this."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass

from torch import nn

from fastvit import backend as _backend
from fastvit import ops
from fastvit._autocast import autocast_dtype, autocast_off
from fastvit._fx import leaf
from fastvit._torchscript import not_scriptable


# ------------------------------------------------------------------------------------------------
# backend pinning
# ------------------------------------------------------------------------------------------------


class _Pin:
    """Run the ops of one call under a model's pinned backends, then put the selection back.

    ``spec`` is None (follow the process-wide selection: nothing happens) or a dict family -> name.
    The selection is module state read by each op's Python front, so it is set around the call and
    restored in ``__exit__``; under ``torch.compile`` Dynamo traces the set and the restore (the
    op fronts then read the pinned value while tracing) and leaves the selection as it found it.
    """

    __slots__ = ("spec", "prev")

    def __init__(self, spec):
        self.spec = spec
        self.prev = None

    def __enter__(self):
        if self.spec is not None:
            state = _backend._state
            self.prev = {fam: state[fam] for fam in self.spec}
            state.update(self.spec)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            _backend._state.update(self.prev)
            self.prev = None
        return False


def _parse_backend(backend) -> dict[str, str] | None:
    """None for "auto" (follow the process selection), else the validated dict family -> backend."""
    if backend is None or (isinstance(backend, str) and backend.strip().lower() == "auto"):
        return None
    spec = _backend._parse(backend)
    for fam, name in spec.items():
        _backend._check_can_serve(fam, name)
    return spec


def _describe_backend(pin: dict[str, str] | None) -> str:
    if pin is None:
        return "'auto': follows fastvit.use_backend() at each call"
    names = set(pin.values())
    if len(pin) == len(_backend.FAMILIES) and len(names) == 1:
        return f"{next(iter(names))!r} pinned for this model"
    return ", ".join(f"{k}={v}" for k, v in pin.items()) + " pinned for this model"


# ------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapEntry:
    """One module: its path in the model (``""`` = the model itself), what it is, and either what
    it became (``OptimizeReport.replaced``) or why it was left alone (``OptimizeReport.left_alone``)."""

    name: str
    kind: str
    detail: str


def _ranges(nums: list[int]) -> str:
    nums = sorted(set(nums))
    out, start, prev = [], nums[0], nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ",".join(out)


def _compact(names: list[str]) -> str:
    """``blocks.0.attn, ..., blocks.11.attn`` -> ``blocks.{0-11}.attn`` (on the first numeric part)."""
    order: list[str] = []
    groups: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".") if name else []
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        if i is None:
            key = name or "(model)"
            order.append(key)
            continue
        key = ".".join(parts[:i] + ["\0"] + parts[i + 1:])
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(int(parts[i]))
    shown = []
    for key in order:
        if key in groups:
            nums = groups[key]
            shown.append(key.replace("\0", str(nums[0]) if len(nums) == 1 else "{" + _ranges(nums) + "}"))
        else:
            shown.append(key)
    return ", ".join(shown)


class OptimizeReport:
    """What :func:`optimize` did to a model.

    ``replaced`` and ``left_alone`` are lists of :class:`SwapEntry`; ``already`` lists modules an
    earlier ``optimize`` had swapped (left as they are) and ``native`` fastvit's own modules (which
    already run on fastvit.ops). ``str(report)`` groups them for reading; the same text is logged on
    the ``"fastvit"`` logger. ``report.model`` is the model, so ``model = fastvit.optimize(m).model``
    also reads well.
    """

    def __init__(self, model: nn.Module, backend: str):
        self.model = model
        self.model_type = type(model).__name__
        self.backend = backend
        self.replaced: list[SwapEntry] = []
        self.left_alone: list[SwapEntry] = []
        self.already: list[str] = []
        self.native: list[str] = []

    @property
    def changed(self) -> bool:
        """True when at least one module was swapped by this call."""
        return bool(self.replaced)

    def counts(self) -> dict[str, int]:
        """Number of replaced modules per kind."""
        out: dict[str, int] = {}
        for e in self.replaced:
            out[e.kind] = out.get(e.kind, 0) + 1
        return out

    @staticmethod
    def _grouped(entries: list[SwapEntry]) -> list[tuple[str, str, str]]:
        groups: dict[tuple[str, str], list[str]] = {}
        for e in entries:
            groups.setdefault((e.kind, e.detail), []).append(e.name)
        return [(_compact(names), kind, detail) for (kind, detail), names in groups.items()]

    def __str__(self) -> str:
        head = f"fastvit.optimize({self.model_type}), backend {self.backend}: "
        if not self.replaced:
            head += "nothing replaced, the model is unchanged"
            if not self.left_alone and not self.already and not self.native:
                head += " (no module fastvit recognises)"
        else:
            head += f"{len(self.replaced)} modules replaced, {len(self.left_alone)} left alone"
        lines = [head]
        if self.replaced:
            lines.append("  replaced:")
            lines += [f"    {names}: {kind} -> {detail}" for names, kind, detail in self._grouped(self.replaced)]
        if self.left_alone:
            lines.append("  left alone (original forward kept):")
            lines += [f"    {names} ({kind}): {detail}" for names, kind, detail in self._grouped(self.left_alone)]
        if self.already:
            lines.append(f"  already swapped by an earlier optimize (left as they are): {_compact(self.already)}")
        if self.native:
            lines.append(f"  fastvit modules (already on fastvit.ops): {_compact(self.native)}")
        return "\n".join(lines)

    __repr__ = __str__


# ------------------------------------------------------------------------------------------------
# swapped classes: a fastvit subclass of each original class, rebuilt by name when unpickled
# ------------------------------------------------------------------------------------------------

_KINDS: dict[str, type] = {}  # kind -> mixin
_SUBCLASSES: dict[tuple[type, type], type] = {}


def _swapped_class(mixin: type, base: type) -> type:
    """``class Fastvit<Base>(mixin, base)``, made once per (mixin, base)."""
    key = (mixin, base)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        name = f"Fastvit{base.__name__}"
        cls = type(name, (mixin, base), {"__module__": __name__, "__qualname__": name, "_fastvit_base": base,
                                         "__prepare_scriptable__": not_scriptable})
        _SUBCLASSES[key] = cls
    return cls


def _new_swapped(base: type, kind: str):
    """Unpickling / deepcopy: an empty instance of the swapped subclass of ``base`` (state follows)."""
    cls = _swapped_class(_KINDS[kind], base)
    return cls.__new__(cls)


def _orig_type(m) -> type:
    """The class a module had before optimize (its own class when not swapped)."""
    return getattr(type(m), "_fastvit_base", type(m))


_global_hooks = (
    nn.modules.module._global_forward_hooks,
    nn.modules.module._global_forward_pre_hooks,
    nn.modules.module._global_backward_hooks,
    nn.modules.module._global_backward_pre_hooks,
)


def _hooked(mods) -> bool:
    """True when a hook would have run on one of ``mods`` (whose forward the fused path skips)."""
    for h in _global_hooks:
        if h:
            return True
    for m in mods:
        if m is None:
            continue
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return True
    return False


class _Swapped:
    """Base of every swap mixin: pickling, the per-call integrity check, the class-level facts.

    Subclasses set ``_fv_kind``, ``_fv_label`` and ``_fv_flag`` (the ``optimize`` argument that enables
    them) and implement ``_fv_matches`` / ``_fv_why_not`` / ``_fv_describe`` (classmethods run by
    ``optimize``), ``_fv_parts`` (the submodules whose forward the fused path replaces) and ``forward``.
    Every name they add starts with ``_fv_`` / ``_fastvit_`` so it cannot shadow the original class's.
    """

    _fv_kind = ""
    _fv_label = ""
    _fv_flag = ""
    _fastvit_activation = "gelu"  # the fused MLP's activation (set per instance by MLP swaps)
    _fastvit_base: type

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("_fv_kind"):
            _KINDS[cls._fv_kind] = cls

    # -- pickling and deepcopy: rebuild the swapped subclass from the (importable) original class
    def __reduce_ex__(self, protocol):
        rv = object.__reduce_ex__(self, max(protocol, 2))  # (copyreg.__newobj__, (cls,), state, ...)
        return (_new_swapped, (type(self)._fastvit_base, type(self)._fv_kind), *rv[2:])

    # -- per call
    def _fv_parts(self) -> tuple:
        return ()

    def _fv_intact(self) -> bool:
        """The submodules the fused path reads are still of the classes optimize saw, un-hooked."""
        parts = self._fv_parts()
        expected = self.__dict__.get("_fastvit_types")
        if expected is None or len(parts) != len(expected):
            return False
        for p, t in zip(parts, expected):
            if (p is None and t is not None) or (p is not None and _orig_type(p) is not t):
                return False
            if t is nn.GELU and _GELU_APPROXIMATE.get(p.approximate) != self._fastvit_activation:
                return False  # the GELU's approximation changed after optimize
        return not _hooked(parts)

    # -- at optimize time
    _fv_classes = ""  # the _Env attribute holding the library classes this kind swaps (class identity)

    @classmethod
    def _fv_matches(cls, m, env) -> bool:
        """By default: ``m``'s class is one of ``getattr(env, cls._fv_classes)``."""
        return bool(cls._fv_classes) and type(m) in getattr(env, cls._fv_classes)

    @classmethod
    def _fv_why_not(cls, m, ctx) -> str | None:
        return None

    @classmethod
    def _fv_describe(cls, m, ctx) -> str:
        raise NotImplementedError

    @classmethod
    def _fv_consumed(cls, m, ctx) -> tuple:
        """Submodules computed inside this module's fused path (not swapped or reported on their own)."""
        return ()

    @classmethod
    def _fv_configure(cls, m, ctx) -> dict:
        """Per-instance settings stored as ``m._fastvit_<key>``."""
        return {}

    @classmethod
    def _fv_input_feeds_linear(cls, m, env) -> bool:
        """For attention kinds: ``m``'s input only feeds Linear layers (a Block's norm1 may then be
        written in the GEMM dtype)."""
        return False


def _swap(m: nn.Module, mixin: type, ctx) -> None:
    settings = mixin._fv_configure(m, ctx)
    m.__class__ = _swapped_class(mixin, type(m))
    m.__dict__["_fastvit_backend"] = None if ctx.pin is None else dict(ctx.pin)
    for k, v in settings.items():
        m.__dict__["_fastvit_" + k] = v


def _record_types(m) -> None:
    m.__dict__["_fastvit_types"] = tuple(None if p is None else _orig_type(p) for p in m._fv_parts())


def restore(model: nn.Module) -> int:
    """Undo :func:`optimize`: every swapped module gets its original class back. Returns how many."""
    n = 0
    for m in _unwrap(model).modules():
        if isinstance(m, _Swapped):
            m.__class__ = type(m)._fastvit_base
            for k in [k for k in m.__dict__ if k.startswith("_fastvit_")]:
                del m.__dict__[k]
            n += 1
    return n


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (the same objects, not copies)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


# ------------------------------------------------------------------------------------------------
# source checks: what a class's forward reads, and whether it is the official T2T-ViT code
# ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _function_ast(fn) -> ast.FunctionDef | None:
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    try:
        node = ast.parse(src).body[0]
    except (SyntaxError, IndexError):
        return None
    return node if isinstance(node, ast.FunctionDef) else None


def _self_attrs(fn) -> frozenset[str] | None:
    """The names ``self.<name>`` a method reads, None when its source cannot be read."""
    node = _function_ast(fn)
    if node is None or not node.args.args:
        return None
    me = node.args.args[0].arg
    return frozenset(
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == me
    )


def _unknown_attrs(cls: type, method: str, known: set[str]) -> str | None:
    """None when ``cls.<method>`` reads only ``known`` attributes of self, else why it is left alone."""
    fn = getattr(cls, method, None)
    used = _self_attrs(fn) if fn is not None else None
    if used is None:
        return f"the source of {cls.__qualname__}.{method} cannot be read, so fastvit cannot check what it computes"
    extra = sorted(used - known)
    if extra:
        return (f"{cls.__qualname__}.{method} uses self.{', self.'.join(extra)}, which fastvit does not know "
                f"(a version of {cls.__module__.split('.')[0]} newer than fastvit's swap)")
    return None



# ------------------------------------------------------------------------------------------------
# what optimize knows: classes found in already-imported libraries (nothing is imported here)
# ------------------------------------------------------------------------------------------------


def _attr(modname: str, name: str):
    mod = sys.modules.get(modname)
    return getattr(mod, name, None) if mod is not None else None


def _classes(*found) -> tuple[type, ...]:
    out = []
    for c in found:
        if isinstance(c, type) and c not in out:
            out.append(c)
    return tuple(out)


class _Env:
    """Library classes optimize recognises, looked up at each call (a library not imported by the
    user's model is not imported here)."""

    def __init__(self):
        tv = "timm.models.vision_transformer"
        # timm <= 1.0.15 defines Attention in vision_transformer.py; from 1.0.16 it lives in
        # timm.layers.attention (re-exported by vision_transformer).
        self.timm_attention = _classes(_attr("timm.layers.attention", "Attention"), _attr(tv, "Attention"))
        self.timm_block = _classes(_attr(tv, "Block"))
        self.timm_mlp = _classes(_attr("timm.layers.mlp", "Mlp"))
        self.timm_patch_embed = _classes(_attr("timm.layers.patch_embed", "PatchEmbed"))
        self.timm_hybrid_embed = _classes(_attr("timm.layers.hybrid_embed", "HybridEmbed"),
                                          _attr("timm.models.vision_transformer_hybrid", "HybridEmbed"))
        self.timm_attention_pool = _classes(_attr("timm.layers.attention_pool", "AttentionPoolLatent"))
        self.timm_gelu = _classes(_attr("timm.layers.activations", "GELU"))
        self.timm_gelu_tanh = _classes(_attr("timm.layers.activations", "GELUTanh"))
        self.timm_quick_gelu = _classes(_attr("timm.layers.activations", "QuickGELU"))
        self.layer_norms = _classes(nn.LayerNorm, _attr("timm.layers.norm", "LayerNorm"))
        vp = ("vit_pytorch.vit", "vit_pytorch.simple_vit")
        self.vitp_attention = _classes(*(_attr(mod, "Attention") for mod in vp))
        self.vitp_feedforward = _classes(*(_attr(mod, "FeedForward") for mod in vp))
        self.vitp_transformer = _classes(*(_attr(mod, "Transformer") for mod in vp))
        self.vitp_simple_vit = _classes(_attr("vit_pytorch.simple_vit", "SimpleViT"))
        self.rearrange = _attr("einops.layers.torch", "Rearrange")


class _Ctx:
    def __init__(self, env: _Env, pin, flags: dict[str, bool]):
        self.env, self.pin, self.flags = env, pin, flags
        self.soft_splits: set[int] = set()  # ids of nn.Unfold modules found in a T2T context


def _is_ln(m, env) -> bool:
    return _orig_type(m) in env.layer_norms and len(m.normalized_shape) == 1


_GELU_APPROXIMATE = {"none": "gelu", "tanh": "gelu_tanh"}  # nn.GELU(approximate=...) -> the op's activation


def _activation_name(act, env) -> str | None:
    """The ops.layernorm_mlp ``activation`` that ``act`` computes: "gelu" (nn.GELU, timm's GELU),
    "gelu_tanh" (nn.GELU(approximate="tanh"), timm's GELUTanh), "quick_gelu" (timm's QuickGELU); None
    for anything else."""
    t = _orig_type(act)
    if t is nn.GELU:
        return _GELU_APPROXIMATE.get(act.approximate)
    if t in env.timm_gelu:
        return "gelu"
    if t in env.timm_gelu_tanh:
        return "gelu_tanh"
    if t in env.timm_quick_gelu:
        return "quick_gelu"
    return None


def _activation_reason(act, env) -> str:
    return (f"activation {type(act).__name__}: the fused MLP takes exact GELU, tanh-approximated GELU and "
            f"QuickGELU")


def _plain_linear(m) -> bool:
    return _orig_type(m) is nn.Linear


def _plain_dropout(m) -> bool:
    return _orig_type(m) in (nn.Dropout,)


def _fused_head_dims() -> tuple[int, ...] | None:
    """Head dims the fused attention kernels take, None when no fused kernel is registered."""
    if not any(b != "eager" for b in _backend.implementations("attention_qkvpacked")):
        return None
    mod = sys.modules.get("fastvit.ops.attention") or importlib.import_module("fastvit.ops.attention")
    return tuple(getattr(mod, "HEAD_DIMS", ()))


def _head_dim_reason(head_dim: int, ctx) -> str | None:
    """Leave an attention alone when no fused kernel takes its head dim: fastvit would run its eager
    reference there, slower than the library's own (SDPA) path. Pinning "eager" swaps it anyway."""
    if ctx.pin is not None and ctx.pin.get("attention") == "eager":
        return None
    dims = _fused_head_dims()
    if dims is None or head_dim in dims:
        return None
    return (f"head dim {head_dim}: no fused attention kernel takes it (they take {', '.join(map(str, dims))}); "
            f"the original attention is kept rather than fastvit's slower eager reference")


def _dropout_p(m) -> float:
    return m.p if m is not None and m.training else 0.0


@leaf
def _ln_torch_dtype(x, weight, bias, eps):
    """LayerNorm whose output leaves the swapped module, in torch's dtype: CUDA autocast runs
    layer_norm in float32 (a float32 result, which may feed a residual stream); CPU autocast keeps
    x's dtype. Outside autocast: x's dtype."""
    if autocast_dtype(x) is None:
        return ops.layer_norm(x, weight, bias, eps)
    with autocast_off(x):
        if x.device.type == "cuda":
            x = x.float()
        return ops.layer_norm(x, weight, bias, eps)


def _ln_into_gemm(norm, x):
    """LayerNorm whose output only feeds a Linear: DESIGN.md's rule (written in the autocast dtype,
    the value the Linear would cast it to anyway)."""
    return ops.layer_norm(x, norm.weight, norm.bias, norm.eps)


# ------------------------------------------------------------------------------------------------
# LayerNorm
# ------------------------------------------------------------------------------------------------


class _LayerNorm(_Swapped):
    """``nn.LayerNorm`` / timm's ``LayerNorm`` over the last dim -> ops.layer_norm (torch's output dtype)."""

    _fv_kind, _fv_label, _fv_flag = "layer_norm", "LayerNorm", "mlp"
    _fv_classes = "layer_norms"

    @classmethod
    def _fv_why_not(cls, m, ctx):
        if len(m.normalized_shape) != 1:
            return f"normalized_shape {tuple(m.normalized_shape)} spans more than the last dim"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.layer_norm"

    def forward(self, input):
        with _Pin(self._fastvit_backend):
            if getattr(self, "_fast_norm", False):  # timm's fast norm writes the autocast dtype, as fastvit does
                return ops.layer_norm(input, self.weight, self.bias, self.eps)
            return _ln_torch_dtype(input, self.weight, self.bias, self.eps)



def _mlp_tail_reason(norm2, mlp, drops, env) -> str | None:
    """Why a (norm2, Mlp with fc1 / act / fc2 and ``drops``) pair cannot be one ops.layernorm_mlp call."""
    if not (_plain_linear(mlp.fc1) and _plain_linear(mlp.fc2)):
        return f"Mlp.fc1/fc2 are {type(mlp.fc1).__name__}/{type(mlp.fc2).__name__}, not nn.Linear (e.g. use_conv)"
    if _activation_name(mlp.act, env) is None:
        return _activation_reason(mlp.act, env)
    if not all(_plain_dropout(d) for d in drops):
        return "the Mlp's dropout modules are not nn.Dropout"
    if mlp.fc1.in_features != norm2.normalized_shape[0]:
        return "fc1's input width differs from norm2's"
    return None


def _norm2_reason(norm2, env, name: str = "norm2") -> str | None:
    if not _is_ln(norm2, env):
        return f"{name} is {type(norm2).__name__}, not a LayerNorm over the last dim: the fused op takes a LayerNorm"
    return None


def _drop_path_inactive(dp, training: bool) -> bool:
    if isinstance(dp, nn.Identity) or not training:
        return True
    p = getattr(dp, "drop_prob", None)
    return p is not None and p == 0.0


def _norm1_fused(block, env) -> bool:
    """A Block's norm1 may be written in the GEMM dtype: it is a LayerNorm and the attention's input
    only feeds Linear layers (an attention kind that says so with ``_fv_input_feeds_linear``)."""
    return _is_ln(block.norm1, env) and any(k._fv_input_feeds_linear(block.attn, env) for k in _KINDS.values())


class _MlpBlock(_Swapped):
    """What timm's and the official T2T-ViT's Block swaps share: ``norm2`` + ``mlp`` as one
    ops.layernorm_mlp call, ``norm1`` as ops.layer_norm where ``_norm1_fused``. Subclasses name the
    Mlp's submodules their fused path reads in ``_fv_mlp_parts``."""

    _fv_mlp_parts: tuple[str, ...] = ()

    @staticmethod
    def _fv_what(m, ctx) -> str:
        return ("norm1 as ops.layer_norm, " if _norm1_fused(m, ctx.env) else "") + "norm2 + Mlp as ops.layernorm_mlp"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        out = (m.norm2, m.mlp, *m.mlp.children())
        return out + ((m.norm1,) if _norm1_fused(m, ctx.env) else ())

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"norm1_fused": _norm1_fused(m, ctx.env), "activation": _activation_name(m.mlp.act, ctx.env)}

    def _fv_parts(self):
        mlp = self.mlp
        parts = (self.norm2, mlp, *(getattr(mlp, name, None) for name in self._fv_mlp_parts))
        if self._fastvit_norm1_fused:
            parts = parts + (self.norm1, self.attn)
        return parts

