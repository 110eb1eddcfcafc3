"""``fastvit.optimize(model)``: swap fastvit's fused ops into an existing ViT, in place.

What is recognised, and what its forward becomes (``fastvit.ops``):

- timm ``PatchEmbed``: ``patch_embed`` (size checks, dynamic padding, ``output_fmt`` and ``norm`` as timm);
- timm ``Attention``: ``attention_qkvpacked`` on the qkv projection's output (``attention`` on the
  normalised q, k with ``qk_norm``); ``scale_norm`` and the gate applied to the op's output as timm does;
- timm ``Block``: ``norm2`` + ``Mlp`` as one ``layernorm_mlp`` call, the residual fused when ``ls2``
  and drop path allow (else added after the op); ``norm1`` as ``layer_norm``;
- ``nn.LayerNorm`` and timm's ``LayerNorm`` over the last dim: ``layer_norm``;
- vit-pytorch ``Attention`` (its LayerNorm, then ``attention_qkvpacked``), ``FeedForward``
  (``layernorm_mlp``, the residual passed in by its ``Transformer``), the ``to_patch_embedding`` of
  ``ViT`` / ``SimpleViT`` (``patch_embed(patch_order="hwc")`` with the pre- and post-LayerNorms);
- the official T2T-ViT ``Token_performer`` (``performer_attention`` + ``layernorm_mlp``), ``Block`` and
  ``Attention`` (as timm's), and ``nn.Unfold`` soft splits in an official ``T2T_module`` or a
  vit-pytorch ``T2TViT`` (``soft_split``).

How a module is rebound: its ``__class__`` becomes a subclass of its own class (``FastvitAttention``
for timm's ``Attention``, ...) whose ``forward`` calls the ops. Nothing closes over the module, no
parameter is copied or re-registered: ``state_dict`` keys, shapes and values are unchanged,
optimizers built before the call keep working, ``isinstance`` checks against the original classes
still hold, and ``copy.deepcopy`` (timm's EMA), ``torch.save(model)`` / pickling (the subclass is
rebuilt on load by :func:`_new_swapped`), ``torch.compile``, DDP and ``train()``/``eval()`` work as
before. Dropout and drop path read ``module.training`` and the module's own ``p`` at each call.

Every swapped forward computes the same function as the one it replaces (up to the numerics of the
fused ops, DESIGN.md). Where it cannot, the module is left alone and the report says why. At each
call a swapped module also checks that the submodules it reads directly (e.g. a Block's ``mlp.fc1``)
are still of the classes seen by ``optimize`` and carry no hooks; if not (model surgery after
``optimize``, LoRA wrappers, a FLOP counter's hooks) that call runs the original forward.

Classes from the official T2T-ViT repository (which are not importable from a package) are
recognised by class name and structure, and ``Block`` / ``Attention`` / ``Mlp`` / ``Token_performer``
/ ``T2T_module`` only when their ``forward`` parses to the official code. timm and vit-pytorch
classes are recognised by identity; their ``forward`` may only use attributes fastvit knows
(a newer timm whose ``Attention.forward`` reads, say, ``self.rope`` is left alone, not guessed at).
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import logging
import numbers
import os
import sys
import textwrap
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastvit import backend as _backend
from fastvit import ops
from fastvit._autocast import autocast_dtype, autocast_off
from fastvit._torchscript import not_scriptable
from fastvit.models import convert as _convert

__all__ = ["OptimizeReport", "SwapEntry", "load_checkpoint", "optimize", "restore"]

logger = logging.getLogger("fastvit")


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
            if t is nn.GELU and p.approximate != "none":  # the fused MLPs compute erf GELU
                return False
        return not _hooked(parts)

    # -- at optimize time
    @classmethod
    def _fv_matches(cls, m, env) -> bool:
        raise NotImplementedError

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


def _dump_body(node: ast.FunctionDef) -> str:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # a docstring does not change what the code computes
    args = [a.arg for a in node.args.args]
    return repr(args) + "".join(ast.dump(s) for s in body)


@functools.lru_cache(maxsize=None)
def _official_dump(key: str) -> str:
    return _dump_body(ast.parse(textwrap.dedent(_OFFICIAL_T2T[key])).body[0])


def _is_official(cls: type, method: str, key: str) -> str | None:
    """None when ``cls.<method>`` is the official T2T-ViT code (whitespace and comments aside)."""
    node = _function_ast(getattr(cls, method, None))
    if node is None:
        return f"the source of {cls.__qualname__}.{method} cannot be read, so it cannot be matched to the official T2T-ViT"
    if _dump_body(node) != _official_dump(key):
        return f"{cls.__qualname__}.{method} is not the official T2T-ViT code ({key})"
    return None


# The official T2T-ViT code (yitu-opensource/T2T-ViT, models/transformer_block.py, token_performer.py,
# t2t_vit.py): a class with one of these names is swapped only when its method parses to the same code.
_OFFICIAL_T2T = {
    "Block.forward": """
        def forward(self, x):
            x = x + self.drop_path(self.attn(self.norm1(x)))
            x = x + self.drop_path(self.mlp(self.norm2(x)))
            return x
    """,
    "Attention.forward": """
        def forward(self, x):
            B, N, C = x.shape
            qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = (attn @ v).transpose(1, 2).reshape(B, N, C)
            x = self.proj(x)
            x = self.proj_drop(x)
            return x
    """,
    "Mlp.forward": """
        def forward(self, x):
            x = self.fc1(x)
            x = self.act(x)
            x = self.drop(x)
            x = self.fc2(x)
            x = self.drop(x)
            return x
    """,
    "Token_performer.forward": """
        def forward(self, x):
            x = self.single_attn(self.norm1(x))
            x = x + self.mlp(self.norm2(x))
            return x
    """,
    "T2T_module.forward": """
        def forward(self, x):
            x = self.soft_split0(x).transpose(1, 2)
            x = self.attention1(x)
            B, new_HW, C = x.shape
            x = x.transpose(1,2).reshape(B, C, int(np.sqrt(new_HW)), int(np.sqrt(new_HW)))
            x = self.soft_split1(x).transpose(1, 2)
            x = self.attention2(x)
            B, new_HW, C = x.shape
            x = x.transpose(1, 2).reshape(B, C, int(np.sqrt(new_HW)), int(np.sqrt(new_HW)))
            x = self.soft_split2(x).transpose(1, 2)
            x = self.project(x)
            return x
    """,
}


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
        self.timm_gelu = _classes(_attr("timm.layers.activations", "GELU"))
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


def _is_erf_gelu(act, env) -> bool:
    t = _orig_type(act)
    return (t is nn.GELU and act.approximate == "none") or t in env.timm_gelu


def _activation_reason(act, env) -> str:
    name = type(act).__name__
    if isinstance(act, nn.GELU) and act.approximate != "none":
        return f"tanh-approximated GELU (GELU(approximate={act.approximate!r})): the fused MLP computes exact erf GELU"
    if "tanh" in name.lower():
        return f"tanh-approximated GELU ({name}): the fused MLP computes exact erf GELU"
    if "quick" in name.lower():
        return f"QuickGELU activation ({name}): the fused MLP computes exact erf GELU"
    return f"activation {name}: the fused MLP computes exact erf GELU"


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

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.layer_norms

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


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------

_TIMM_ATTENTION_ATTRS = {
    "qkv", "num_heads", "head_dim", "attn_dim", "q_norm", "k_norm", "fused_attn", "attn_drop", "training",
    "scale", "norm", "gate", "proj", "proj_drop",
}
_TIMM_ATTENTION_NEEDS = ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "fused_attn", "attn_drop", "scale", "proj",
                         "proj_drop")
_TIMM_BLOCK_ATTRS = {"norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"}
_TIMM_MLP_ATTRS = {"fc1", "act", "drop1", "norm", "fc2", "drop2"}
_TIMM_PATCH_EMBED_ATTRS = {
    "img_size", "strict_img_size", "patch_size", "dynamic_img_pad", "proj", "flatten", "output_fmt", "norm",
}


def _missing_attrs(m, names) -> str | None:
    missing = [n for n in names if not hasattr(m, n)]
    if missing:
        return f"{type(m).__qualname__} has no {', '.join(missing)} (a timm older than 1.0 is not supported)"
    return None


def _forward_kwargs(cls: type) -> tuple[str, ...]:
    """Which of attn_mask / is_causal a class's forward takes (timm <= 1.0.15: none; 1.0.16: attn_mask)."""
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return ()
    return tuple(k for k in ("attn_mask", "is_causal") if k in params)


class _TimmAttention(_Swapped):
    """timm ``Attention``: qkv Linear -> ops.attention_qkvpacked (or ops.attention after qk_norm) ->
    scale_norm -> gate -> proj -> proj_drop. ``is_causal=True`` runs timm's own forward."""

    _fv_kind, _fv_label, _fv_flag = "timm_attention", "timm Attention", "attention"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.timm_attention

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_ATTENTION_ATTRS) or _missing_attrs(m, _TIMM_ATTENTION_NEEDS)
        if reason:
            return reason
        if not isinstance(m.attn_drop, nn.Dropout):
            return "attn_drop is not an nn.Dropout"
        width = getattr(m.qkv, "out_features", None)
        if width is not None and width != 3 * m.num_heads * m.head_dim:
            return f"qkv has {width} outputs, not 3 * num_heads * head_dim = {3 * m.num_heads * m.head_dim}"
        if not isinstance(m.scale, numbers.Real):
            return f"scale is a {type(m.scale).__name__}, not a number"
        return _head_dim_reason(m.head_dim, ctx)

    @classmethod
    def _fv_describe(cls, m, ctx):
        extras = []
        qk_norm = not isinstance(m.q_norm, nn.Identity) or not isinstance(m.k_norm, nn.Identity)
        if qk_norm:
            extras.append("qk_norm applied to the q, k views first")
        if getattr(m, "norm", None) is not None and not isinstance(m.norm, nn.Identity):
            extras.append("scale_norm on the op's output")
        if getattr(m, "gate", None) is not None:
            extras.append("sigmoid gate on the op's output")
        op = "ops.attention" if qk_norm else "ops.attention_qkvpacked"
        return op + (f" ({'; '.join(extras)})" if extras else "")

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"base_kwargs": _forward_kwargs(type(m))}

    def forward(self, x, attn_mask=None, is_causal=False):
        if is_causal or (attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or attn_mask.requires_grad
                                                    or attn_mask.dim() > 4)):
            # fastvit's attention is non-causal and takes no differentiable mask: timm's own forward.
            kw = {}
            if attn_mask is not None:
                kw["attn_mask"] = attn_mask
            if is_causal:
                kw["is_causal"] = is_causal
            return type(self)._fastvit_base.forward(self, x, **kw)
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        # timm's fused path (SDPA) uses the default scale head_dim ** -0.5, its other path self.scale
        scale = None if self.fused_attn else float(self.scale)
        p = _dropout_p(self.attn_drop)
        with _Pin(self._fastvit_backend):
            qkv = self.qkv(x)
            if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
                o = ops.attention_qkvpacked(qkv, self.num_heads, mask=attn_mask, scale=scale, dropout_p=p)
            else:
                q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
                q, k = self.q_norm(q), self.k_norm(k)
                o = ops.attention(q, k, v, mask=attn_mask, scale=scale, dropout_p=p)
                o = o.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        norm = getattr(self, "norm", None)
        if norm is not None:
            o = norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))


def _mlp_half_reason(norm2, mlp, env, official: bool) -> str | None:
    """Why ``norm2`` + ``mlp`` cannot become one ops.layernorm_mlp call (timm's or the official Mlp)."""
    if not _is_ln(norm2, env):
        return f"norm2 is {type(norm2).__name__}, not a LayerNorm over the last dim: the fused op takes a LayerNorm"
    if official:
        if _orig_type(mlp).__name__ != "Mlp":
            return f"mlp is {type(mlp).__name__}, not the official Mlp"
        reason = _is_official(_orig_type(mlp), "forward", "Mlp.forward")
        if reason:
            return reason
        drops = (mlp.drop,)
    else:
        if _orig_type(mlp) not in env.timm_mlp:
            return f"mlp is {type(mlp).__name__}, not timm's Mlp (GLU / SwiGLU MLPs are not fused)"
        reason = _unknown_attrs(_orig_type(mlp), "forward", _TIMM_MLP_ATTRS) or _missing_attrs(mlp, sorted(_TIMM_MLP_ATTRS))
        if reason:
            return reason
        if not isinstance(mlp.norm, nn.Identity):
            return "Mlp.norm (scale_mlp_norm): a norm between the activation and fc2 cannot be fused"
        drops = (mlp.drop1, mlp.drop2)
    if not (_plain_linear(mlp.fc1) and _plain_linear(mlp.fc2)):
        return f"Mlp.fc1/fc2 are {type(mlp.fc1).__name__}/{type(mlp.fc2).__name__}, not nn.Linear (e.g. use_conv)"
    if not _is_erf_gelu(mlp.act, env):
        return _activation_reason(mlp.act, env)
    if not all(_plain_dropout(d) for d in drops):
        return "the Mlp's dropout modules are not nn.Dropout"
    if mlp.fc1.in_features != norm2.normalized_shape[0]:
        return "fc1's input width differs from norm2's"
    return None


def _drop_path_inactive(dp, training: bool) -> bool:
    if isinstance(dp, nn.Identity) or not training:
        return True
    p = getattr(dp, "drop_prob", None)
    return p is not None and p == 0.0


def _attn_is_linear_first(attn, env) -> bool:
    """The attention's input only feeds Linear layers (so norm1 may be written in the GEMM dtype)."""
    t = _orig_type(attn)
    return t in env.timm_attention or (t.__name__ == "Attention" and _is_official(t, "forward", "Attention.forward") is None)


class _TimmBlock(_Swapped):
    """timm ``Block``: ``x + drop_path1(ls1(attn(norm1(x))))``, then ``norm2`` + ``Mlp`` as one
    ops.layernorm_mlp call, the residual fused unless ``ls2`` or an active drop path sit between."""

    _fv_kind, _fv_label, _fv_flag = "timm_block", "timm Block", "mlp"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.timm_block

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_BLOCK_ATTRS) or _missing_attrs(m, sorted(_TIMM_BLOCK_ATTRS))
        if reason:
            return reason
        return _mlp_half_reason(m.norm2, m.mlp, ctx.env, official=False)

    @classmethod
    def _fv_describe(cls, m, ctx):
        what = ("norm1 as ops.layer_norm, " if cls._fv_norm1_fused(m, ctx.env) else "") + "norm2 + Mlp as ops.layernorm_mlp"
        if not isinstance(m.ls2, nn.Identity):
            return what + ", residual added after the op (layer scale ls2 sits between)"
        if not isinstance(m.drop_path2, nn.Identity):
            return what + ", residual fused (added after the op in training, where drop path is active)"
        return what + ", residual fused"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        out = (m.norm2, m.mlp, *m.mlp.children())
        return out + ((m.norm1,) if cls._fv_norm1_fused(m, ctx.env) else ())

    @staticmethod
    def _fv_norm1_fused(m, env) -> bool:
        return _is_ln(m.norm1, env) and _attn_is_linear_first(m.attn, env)

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"base_kwargs": _forward_kwargs(type(m)), "norm1_fused": cls._fv_norm1_fused(m, ctx.env)}

    def _fv_parts(self):
        mlp = self.mlp
        parts = (self.norm2, mlp, getattr(mlp, "fc1", None), getattr(mlp, "act", None), getattr(mlp, "fc2", None),
                 getattr(mlp, "drop1", None), getattr(mlp, "drop2", None), getattr(mlp, "norm", None))
        if self._fastvit_norm1_fused:
            parts = parts + (self.norm1, self.attn)
        return parts

    def forward(self, x, attn_mask=None, is_causal=False):
        # pass attn_mask / is_causal on exactly as this timm version's Block does
        base_kw = self._fastvit_base_kwargs
        kw = {}
        for key, value, default in (("attn_mask", attn_mask, None), ("is_causal", is_causal, False)):
            if key in base_kw:
                kw[key] = value
            elif value is not default:
                raise TypeError(f"{type(self)._fastvit_base.__qualname__}.forward() got an unexpected keyword argument {key!r}")
        if not self._fv_intact() or (self.training and self.mlp.drop1.p != self.mlp.drop2.p):
            return type(self)._fastvit_base.forward(self, x, **kw)  # surgery, hooks, or two dropout rates
        with _Pin(self._fastvit_backend):
            h = _ln_into_gemm(self.norm1, x) if self._fastvit_norm1_fused else self.norm1(x)
            x = x + self.drop_path1(self.ls1(self.attn(h, **kw)))
            n, mlp = self.norm2, self.mlp
            args = (n.weight, n.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, n.eps)
            p = _dropout_p(mlp.drop1)
            if isinstance(self.ls2, nn.Identity) and _drop_path_inactive(self.drop_path2, self.training):
                return ops.layernorm_mlp(x, *args, residual=x, dropout_p=p)
            return x + self.drop_path2(self.ls2(ops.layernorm_mlp(x, *args, dropout_p=p)))


_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


class _TimmPatchEmbed(_Swapped):
    """timm ``PatchEmbed``: size checks and dynamic padding as timm, then the conv as ops.patch_embed,
    then ``output_fmt`` and ``norm``."""

    _fv_kind, _fv_label, _fv_flag = "timm_patch_embed", "timm PatchEmbed", "embed"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.timm_patch_embed

    @staticmethod
    def _fv_conv_reason(m) -> str | None:
        proj = m.proj
        if _orig_type(proj) is not nn.Conv2d:
            return f"proj is {type(proj).__name__}, not nn.Conv2d"
        k = tuple(proj.kernel_size)
        if tuple(proj.stride) != k or tuple(m.patch_size) != k:
            return f"proj's kernel {k} / stride {tuple(proj.stride)} differ from the patch size {tuple(m.patch_size)}"
        if isinstance(proj.padding, str) or tuple(proj.padding) != (0, 0) or tuple(proj.dilation) != (1, 1) \
                or proj.groups != 1 or proj.padding_mode != "zeros":
            return "proj has padding, dilation or groups: not a plain patch projection"
        return None

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _TIMM_PATCH_EMBED_ATTRS) \
            or _missing_attrs(m, ("img_size", "patch_size", "proj", "flatten", "output_fmt", "norm"))
        if reason:
            return reason
        reason = cls._fv_conv_reason(m)
        if reason:
            return reason
        if not m.flatten and getattr(m.output_fmt, "value", m.output_fmt) not in _FORMATS:
            return f"output_fmt {m.output_fmt!r} is not one fastvit knows"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.patch_embed"

    def _fv_parts(self):
        return (self.proj,)

    def forward(self, x):
        if not self._fv_intact() or self._fv_conv_reason(self) is not None:
            return type(self)._fastvit_base.forward(self, x)
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        if self.img_size is not None:
            if getattr(self, "strict_img_size", True):
                torch._assert(H == self.img_size[0], f"Input height ({H}) doesn't match model ({self.img_size[0]}).")
                torch._assert(W == self.img_size[1], f"Input width ({W}) doesn't match model ({self.img_size[1]}).")
            elif not getattr(self, "dynamic_img_pad", False):
                torch._assert(H % ph == 0, f"Input height ({H}) should be divisible by patch size ({ph}).")
                torch._assert(W % pw == 0, f"Input width ({W}) should be divisible by patch size ({pw}).")
        if getattr(self, "dynamic_img_pad", False):
            pad_h = (ph - H % ph) % ph
            pad_w = (pw - W % pw) % pw
            x = F.pad(x, (0, pad_w, 0, pad_h))
        gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
        if x.shape[-2] != gh * ph or x.shape[-1] != gw * pw:
            x = x[..., : gh * ph, : gw * pw]  # a stride-p conv ignores the remainder
        with _Pin(self._fastvit_backend):
            y = ops.patch_embed(x, self.proj.weight, self.proj.bias, (ph, pw))  # (B, gh * gw, D)
        if not self.flatten:
            fmt = getattr(self.output_fmt, "value", self.output_fmt)
            if fmt == "NCHW":
                y = y.transpose(1, 2).reshape(B, -1, gh, gw)
            elif fmt == "NHWC":
                y = y.reshape(B, gh, gw, -1)
            elif fmt == "NCL":
                y = y.transpose(1, 2)
        return self.norm(y)


# ------------------------------------------------------------------------------------------------
# vit-pytorch
# ------------------------------------------------------------------------------------------------

_VITP_ATTENTION_ATTRS = {"norm", "to_qkv", "heads", "scale", "attend", "dropout", "to_out"}


class _VitpAttention(_Swapped):
    """vit-pytorch ``Attention`` (vit.py, simple_vit.py): LayerNorm, to_qkv, ops.attention_qkvpacked, to_out."""

    _fv_kind, _fv_label, _fv_flag = "vitp_attention", "vit-pytorch Attention", "attention"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.vitp_attention

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", _VITP_ATTENTION_ATTRS)
        if reason:
            return reason
        if not _is_ln(m.norm, ctx.env):
            return f"norm is {type(m.norm).__name__}, not a LayerNorm"
        if not (isinstance(m.attend, nn.Softmax) and m.attend.dim in (-1, 3)):
            return "attend is not a softmax over the keys"
        drop = getattr(m, "dropout", None)
        if drop is not None and not _plain_dropout(drop):
            return "dropout is not an nn.Dropout"
        if not isinstance(m.scale, numbers.Real):
            return f"scale is a {type(m.scale).__name__}, not a number"
        width = m.to_qkv.out_features
        if width % (3 * m.heads):
            return f"to_qkv's {width} outputs are not 3 * heads * dim_head"
        return _head_dim_reason(width // (3 * m.heads), ctx)

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "norm + ops.attention_qkvpacked"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return (m.norm, m.attend)

    def _fv_parts(self):
        return (self.norm, self.attend, getattr(self, "dropout", None))

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        with _Pin(self._fastvit_backend):
            qkv = self.to_qkv(_ln_into_gemm(self.norm, x))
            o = ops.attention_qkvpacked(qkv, self.heads, scale=float(self.scale),
                                        dropout_p=_dropout_p(getattr(self, "dropout", None)))
        return self.to_out(o)


def _feedforward_layout(net, env) -> tuple[tuple[int, ...] | None, str | None]:
    """Indices (ln, fc1, act, drop1 or -1, fc2, drop2 or -1) of a LayerNorm-Linear-GELU-(Dropout)-Linear-(Dropout)
    Sequential, or None and why not."""
    mods = list(net)
    if not mods or not _is_ln(mods[0], env):
        return None, "the FeedForward does not start with a LayerNorm"
    i = 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None, "no Linear after the LayerNorm"
    fc1 = i
    i += 1
    if i >= len(mods) or not (_orig_type(mods[i]) is nn.GELU or _orig_type(mods[i]) in env.timm_gelu):
        return None, f"the layer after fc1 is {type(mods[i]).__name__ if i < len(mods) else 'missing'}, not a GELU"
    if not _is_erf_gelu(mods[i], env):
        return None, _activation_reason(mods[i], env)
    act = i
    i += 1
    d1 = -1
    if i < len(mods) and _plain_dropout(mods[i]):
        d1, i = i, i + 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None, "no Linear after the activation"
    fc2 = i
    i += 1
    d2 = -1
    if i < len(mods) and _plain_dropout(mods[i]):
        d2, i = i, i + 1
    if i != len(mods):
        return None, f"the FeedForward has extra layers after fc2 ({type(mods[i]).__name__})"
    return (0, fc1, act, d1, fc2, d2), None


class _VitpFeedForward(_Swapped):
    """vit-pytorch ``FeedForward``: ``net`` = LayerNorm, Linear, GELU, (Dropout), Linear, (Dropout) as one
    ops.layernorm_mlp call; ``forward(x, residual=None)`` also takes the residual (the swapped Transformer
    passes it)."""

    _fv_kind, _fv_label, _fv_flag = "vitp_feedforward", "vit-pytorch FeedForward", "mlp"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.vitp_feedforward

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", {"net"})
        if reason:
            return reason
        if type(m.net) is not nn.Sequential:
            return "net is not an nn.Sequential"
        return _feedforward_layout(m.net, ctx.env)[1]

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.layernorm_mlp (residual fused by the Transformer)"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return (m.net, *m.net)

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"layout": _feedforward_layout(m.net, ctx.env)[0]}

    def _fv_parts(self):
        net = self.net
        return (net, *net._modules.values())

    def forward(self, x, residual=None):
        ln_i, fc1_i, act_i, d1_i, fc2_i, d2_i = self._fastvit_layout
        net = self.net
        p1 = net[d1_i].p if d1_i >= 0 else 0.0
        p2 = net[d2_i].p if d2_i >= 0 else 0.0
        if not self._fv_intact() or (self.training and p1 != p2):
            y = type(self)._fastvit_base.forward(self, x)
            return y if residual is None else y + residual
        ln, fc1, fc2 = net[ln_i], net[fc1_i], net[fc2_i]
        with _Pin(self._fastvit_backend):
            return ops.layernorm_mlp(x, ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, ln.eps,
                                     residual=residual, dropout_p=p1 if self.training else 0.0)


class _VitpTransformer(_Swapped):
    """vit-pytorch ``Transformer``: ``x = attn(x) + x``, then ``ff(x, residual=x)`` so the FeedForward's
    residual add happens inside ops.layernorm_mlp."""

    _fv_kind, _fv_label, _fv_flag = "vitp_transformer", "vit-pytorch Transformer", "mlp"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) in env.vitp_transformer

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _unknown_attrs(type(m), "forward", {"layers", "norm"})
        if reason:
            return reason
        if not all(isinstance(layer, nn.ModuleList) and len(layer) == 2 for layer in m.layers):
            return "layers are not (attention, feed-forward) pairs"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "feed-forward residuals fused into ops.layernorm_mlp"

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x, residual=x) if isinstance(ff, _VitpFeedForward) else ff(x) + x
        return self.norm(x)


_VITP_PATCH_PATTERN = "b c (h p1) (w p2) -> b (h w) (p1 p2 c)"


def _patch_embedding_layout(seq, env):
    """(ph, pw, i_pre or -1, i_linear, i_post or -1) for vit-pytorch's Rearrange-(LayerNorm)-Linear-(LayerNorm)."""
    mods = list(seq)
    r = mods[0] if mods else None
    if env.rearrange is None or _orig_type(r) is not env.rearrange:
        return None
    if " ".join(str(r.pattern).split()) != _VITP_PATCH_PATTERN or set(r.axes_lengths) != {"p1", "p2"}:
        return None
    ph, pw = int(r.axes_lengths["p1"]), int(r.axes_lengths["p2"])
    i, pre = 1, -1
    if i < len(mods) and _is_ln(mods[i], env):
        pre, i = i, i + 1
    if i >= len(mods) or not _plain_linear(mods[i]):
        return None
    lin = i
    i += 1
    post = -1
    if i < len(mods) and _is_ln(mods[i], env):
        post, i = i, i + 1
    if i != len(mods):
        return None
    return ph, pw, pre, lin, post


def _is_vitp_soft_split(seq, env):
    """Indices of nn.Unfold modules followed by Rearrange('b c n -> b n c') (vit-pytorch's T2TViT)."""
    mods = list(seq)
    out = []
    for i, m in enumerate(mods[:-1]):
        nxt = mods[i + 1]
        if type(m) is nn.Unfold and env.rearrange is not None and _orig_type(nxt) is env.rearrange \
                and " ".join(str(nxt.pattern).split()) == "b c n -> b n c":
            out.append(m)
    return out


class _VitpPatchEmbedding(_Swapped):
    """vit-pytorch's ``to_patch_embedding`` Sequential (Rearrange to (p1 p2 c) patches, LayerNorm, Linear,
    LayerNorm) as one ops.patch_embed(patch_order="hwc") call. Under autocast the last LayerNorm runs
    on its own, in torch's output dtype (its output becomes the residual stream)."""

    _fv_kind, _fv_label, _fv_flag = "vitp_patch_embedding", "vit-pytorch patch embedding", "embed"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) is nn.Sequential and _patch_embedding_layout(m, env) is not None

    @classmethod
    def _fv_describe(cls, m, ctx):
        ph, pw, pre, lin, post = _patch_embedding_layout(m, ctx.env)
        norms = " + ".join(n for n, i in (("pre-norm", pre), ("post-norm", post)) if i >= 0)
        return "ops.patch_embed(patch_order='hwc'" + (f", {norms})" if norms else ")")

    @classmethod
    def _fv_consumed(cls, m, ctx):
        return tuple(m)

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"layout": _patch_embedding_layout(m, ctx.env)}

    def _fv_parts(self):
        return tuple(self._modules.values())

    def __getitem__(self, idx):
        if isinstance(idx, slice):  # a slice is a new, plain Sequential of those layers
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return nn.Sequential.__getitem__(self, idx)

    def forward(self, input):
        if not self._fv_intact():
            return nn.Sequential.forward(self, input)
        ph, pw, pre_i, lin_i, post_i = self._fastvit_layout
        lin = self[lin_i]
        pre = self[pre_i] if pre_i >= 0 else None
        post = self[post_i] if post_i >= 0 else None
        eps = pre.eps if pre is not None else (post.eps if post is not None else 1e-5)
        fuse_post = post is not None and autocast_dtype(input) is None and (pre is None or pre.eps == post.eps)
        with _Pin(self._fastvit_backend):
            y = ops.patch_embed(
                input, lin.weight, lin.bias, (ph, pw), patch_order="hwc",
                pre_norm=pre is not None, pre_norm_weight=None if pre is None else pre.weight,
                pre_norm_bias=None if pre is None else pre.bias,
                post_norm=fuse_post, post_norm_weight=post.weight if fuse_post else None,
                post_norm_bias=post.bias if fuse_post else None, norm_eps=eps,
            )
            if post is not None and not fuse_post:
                y = _ln_torch_dtype(y, post.weight, post.bias, post.eps)
        return y


# ------------------------------------------------------------------------------------------------
# T2T-ViT (official structure) and soft splits
# ------------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _SoftSplit(_Swapped):
    """``nn.Unfold`` in a T2T model (official ``T2T_module``, vit-pytorch ``T2TViT``): ops.soft_split,
    returned transposed to unfold's (B, C*k*k, L) layout (a view; the next step transposes it back)."""

    _fv_kind, _fv_label, _fv_flag = "soft_split", "nn.Unfold (T2T soft split)", "embed"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m) is nn.Unfold

    @classmethod
    def _fv_why_not(cls, m, ctx):
        if _pair(m.dilation) != (1, 1):
            return "dilated unfold"
        return None

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.soft_split"

    def forward(self, input):
        if input.dim() != 4 or _pair(self.dilation) != (1, 1):
            return nn.Unfold.forward(self, input)
        with _Pin(self._fastvit_backend):
            return ops.soft_split(input, self.kernel_size, self.stride, self.padding).transpose(1, 2)


def _official_attention_reason(m, ctx) -> str | None:
    t = _orig_type(m)
    reason = _is_official(t, "forward", "Attention.forward")
    if reason:
        return reason
    for name in ("qkv", "attn_drop", "proj", "proj_drop"):
        if not isinstance(getattr(m, name, None), nn.Module):
            return f"no {name} submodule"
    if not _plain_dropout(m.attn_drop):
        return "attn_drop is not an nn.Dropout"
    width = getattr(m.qkv, "out_features", None)
    dim = getattr(m.qkv, "in_features", None)
    if width is None or dim is None or width != 3 * dim or dim % m.num_heads:
        return "qkv is not a Linear(dim, 3 * dim) with dim divisible by num_heads"
    if not isinstance(m.scale, numbers.Real):
        return f"scale is a {type(m.scale).__name__}, not a number"
    return _head_dim_reason(dim // m.num_heads, ctx)


class _T2TAttention(_Swapped):
    """The official T2T-ViT ``Attention`` (transformer_block.py): qkv -> ops.attention_qkvpacked with
    its ``scale`` (``qk_scale`` or head_dim ** -0.5) -> proj -> proj_drop."""

    _fv_kind, _fv_label, _fv_flag = "t2t_attention", "T2T-ViT Attention", "attention"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Attention" and set(m._modules) == {"qkv", "attn_drop", "proj", "proj_drop"} \
            and hasattr(m, "num_heads") and hasattr(m, "scale")

    @classmethod
    def _fv_why_not(cls, m, ctx):
        return _official_attention_reason(m, ctx)

    @classmethod
    def _fv_describe(cls, m, ctx):
        return "ops.attention_qkvpacked"

    def _fv_parts(self):
        return (self.attn_drop,)

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        with _Pin(self._fastvit_backend):
            o = ops.attention_qkvpacked(self.qkv(x), self.num_heads, scale=float(self.scale),
                                        dropout_p=_dropout_p(self.attn_drop))
        return self.proj_drop(self.proj(o))


class _T2TBlock(_Swapped):
    """The official T2T-ViT ``Block``: ``x + drop_path(attn(norm1(x)))``, then norm2 + Mlp as one
    ops.layernorm_mlp call with the residual fused (added after the op while drop path is active)."""

    _fv_kind, _fv_label, _fv_flag = "t2t_block", "T2T-ViT Block", "mlp"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Block" and set(m._modules) == {"norm1", "attn", "drop_path", "norm2", "mlp"}

    @classmethod
    def _fv_why_not(cls, m, ctx):
        reason = _is_official(type(m), "forward", "Block.forward")
        if reason:
            return reason
        return _mlp_half_reason(m.norm2, m.mlp, ctx.env, official=True)

    @classmethod
    def _fv_describe(cls, m, ctx):
        what = ("norm1 as ops.layer_norm, " if cls._fv_norm1_fused(m, ctx.env) else "") + "norm2 + Mlp as ops.layernorm_mlp"
        if isinstance(m.drop_path, nn.Identity):
            return what + ", residual fused"
        return what + ", residual fused (added after the op in training, where drop path is active)"

    @staticmethod
    def _fv_norm1_fused(m, env) -> bool:
        return _is_ln(m.norm1, env) and _attn_is_linear_first(m.attn, env)

    @classmethod
    def _fv_consumed(cls, m, ctx):
        out = (m.norm2, m.mlp, *m.mlp.children())
        return out + ((m.norm1,) if cls._fv_norm1_fused(m, ctx.env) else ())

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"norm1_fused": cls._fv_norm1_fused(m, ctx.env)}

    def _fv_parts(self):
        mlp = self.mlp
        parts = (self.norm2, mlp, getattr(mlp, "fc1", None), getattr(mlp, "act", None), getattr(mlp, "fc2", None),
                 getattr(mlp, "drop", None))
        if self._fastvit_norm1_fused:
            parts = parts + (self.norm1, self.attn)
        return parts

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        with _Pin(self._fastvit_backend):
            h = _ln_into_gemm(self.norm1, x) if self._fastvit_norm1_fused else self.norm1(x)
            x = x + self.drop_path(self.attn(h))
            n, mlp = self.norm2, self.mlp
            args = (n.weight, n.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, n.eps)
            p = _dropout_p(mlp.drop)
            if _drop_path_inactive(self.drop_path, self.training):
                return ops.layernorm_mlp(x, *args, residual=x, dropout_p=p)
            return x + self.drop_path(ops.layernorm_mlp(x, *args, dropout_p=p))


class _TokenPerformer(_Swapped):
    """The official T2T-ViT ``Token_performer``: ``single_attn(norm1(x))`` as ops.performer_attention,
    then ``x + mlp(norm2(x))`` as ops.layernorm_mlp (the MLP only drops its output: in training with
    dropout the residual is added after the op). The MLP half is fused only with ``mlp=True``."""

    _fv_kind, _fv_label, _fv_flag = "token_performer", "T2T-ViT Token_performer", "performer"

    @classmethod
    def _fv_matches(cls, m, env):
        return type(m).__name__ == "Token_performer" and {"kqv", "dp", "proj", "norm1", "norm2", "mlp"} <= set(m._modules)

    @classmethod
    def _fv_why_not(cls, m, ctx):
        t = type(m)
        reason = _is_official(t, "forward", "Token_performer.forward") \
            or _unknown_attrs(t, "single_attn", {"kqv", "emb", "prm_exp", "dp", "proj", "epsilon"}) \
            or _unknown_attrs(t, "prm_exp", {"m", "w"})
        if reason:
            return reason
        if getattr(m, "head_cnt", 1) != 1:
            return f"head_cnt = {m.head_cnt}: the official code (and fastvit) use one head"
        if not (_plain_linear(m.kqv) and _plain_linear(m.proj) and _plain_dropout(m.dp)):
            return "kqv / proj / dp are not plain Linear / Dropout"
        emb, w = m.emb, m.w
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape == (m.m, emb)):
            return "w is not an (m, emb) tensor"
        if m.kqv.out_features != 3 * emb or tuple(m.proj.weight.shape) != (emb, emb):
            return "kqv / proj do not have the official shapes (3 * emb, dim) / (emb, emb)"
        if not _is_ln(m.norm1, ctx.env):
            return f"norm1 is {type(m.norm1).__name__}, not a LayerNorm"
        if not isinstance(m.epsilon, numbers.Real) or m.epsilon <= 0:
            return f"epsilon = {m.epsilon!r} is not a positive number"
        return None

    @classmethod
    def _fv_mlp_reason(cls, m, env) -> str | None:
        mlp = m.mlp
        if type(mlp) is not nn.Sequential or len(mlp) != 4:
            return "mlp is not the official Sequential(Linear, GELU, Linear, Dropout)"
        if not (_plain_linear(mlp[0]) and _plain_linear(mlp[2]) and _plain_dropout(mlp[3])):
            return "mlp is not the official Sequential(Linear, GELU, Linear, Dropout)"
        if not _is_erf_gelu(mlp[1], env):
            return _activation_reason(mlp[1], env)
        if not _is_ln(m.norm2, env):
            return f"norm2 is {type(m.norm2).__name__}, not a LayerNorm"
        return None

    @classmethod
    def _fv_fuse_mlp(cls, m, ctx) -> bool:
        return ctx.flags["mlp"] and cls._fv_mlp_reason(m, ctx.env) is None

    @classmethod
    def _fv_describe(cls, m, ctx):
        if cls._fv_fuse_mlp(m, ctx):
            return "ops.performer_attention + ops.layernorm_mlp"
        why = "mlp=False" if not ctx.flags["mlp"] else cls._fv_mlp_reason(m, ctx.env)
        return f"ops.performer_attention (MLP half left as it is: {why})"

    @classmethod
    def _fv_consumed(cls, m, ctx):
        out = (m.norm1, m.dp)
        if cls._fv_fuse_mlp(m, ctx):
            out += (m.norm2, m.mlp, *m.mlp)
        return out

    @classmethod
    def _fv_configure(cls, m, ctx):
        return {"fuse_mlp": cls._fv_fuse_mlp(m, ctx)}

    def _fv_parts(self):
        parts = (self.norm1, self.kqv, self.proj, self.dp)
        if self._fastvit_fuse_mlp:
            parts = parts + (self.norm2, self.mlp, *self.mlp._modules.values())
        return parts

    def forward(self, x):
        if not self._fv_intact():
            return type(self)._fastvit_base.forward(self, x)
        with _Pin(self._fastvit_backend):
            x = ops.performer_attention(
                _ln_into_gemm(self.norm1, x), self.kqv.weight, self.kqv.bias, self.w, self.proj.weight,
                self.proj.bias, eps=float(self.epsilon), dropout_p=_dropout_p(self.dp),
            )
            if not self._fastvit_fuse_mlp:
                return x + self.mlp(self.norm2(x))
            n, fc1, fc2, drop = self.norm2, self.mlp[0], self.mlp[2], self.mlp[3]
            args = (n.weight, n.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, n.eps)
            if self.training and drop.p > 0:
                # the official MLP drops only its output; the op would also drop the hidden layer
                return x + drop(ops.layernorm_mlp(x, *args))
            return ops.layernorm_mlp(x, *args, residual=x)


def _is_official_t2t_module(m) -> bool:
    return type(m).__name__ == "T2T_module" and _is_official(type(m), "forward", "T2T_module.forward") is None


# Recognised kinds, most specific first.
_MIXINS: tuple[type, ...] = (
    _TimmBlock, _TimmAttention, _TimmPatchEmbed,
    _VitpTransformer, _VitpAttention, _VitpFeedForward, _VitpPatchEmbedding,
    _TokenPerformer, _T2TBlock, _T2TAttention,
    _SoftSplit, _LayerNorm,
)


# ------------------------------------------------------------------------------------------------
# optimize / load_checkpoint
# ------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers (the same objects, not copies)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def optimize(
    model: nn.Module,
    backend: str | Mapping[str, str] = "auto",
    attention: bool = True,
    mlp: bool = True,
    embed: bool = True,
    performer: bool = True,
) -> OptimizeReport:
    """Swap fastvit's fused ops into ``model`` in place; return an :class:`OptimizeReport`.

    Recognised (the module docstring lists what each becomes): timm ``PatchEmbed``, ``Attention``
    (timm <= 1.0.15 in vision_transformer.py and >= 1.0.16 in timm.layers.attention, with
    ``attn_mask``; ``is_causal=True`` runs timm's own forward), ``Block`` (norm2 + Mlp -> one
    ``layernorm_mlp``, residual fused), ``LayerNorm``; vit-pytorch ``Attention``, ``FeedForward``,
    ``Transformer`` and the ``to_patch_embedding`` of ViT / SimpleViT; the official T2T-ViT
    ``Token_performer``, ``Block``, ``Attention`` and soft splits (``nn.Unfold`` in ``T2T_module`` or
    vit-pytorch's ``T2TViT``). Unknown modules are left as they are; recognised ones that cannot be
    swapped without changing what they compute are left alone and listed in the report with the
    reason. Parameters are reused (state_dict unchanged); the swap is a change of ``__class__`` to a
    fastvit subclass, so deepcopy, pickling, ``torch.compile``, DDP and train/eval keep working.
    Call it before ``torch.compile`` / DDP wrapping (a wrapped model is unwrapped first).

    Args:
        model: the model (or any submodule of one), changed in place.
        backend: ``"auto"`` (default) pins nothing: every swapped forward uses fastvit's process-wide
            selection at each call — ``fastvit.use_backend(...)`` / ``FASTVIT_BACKEND``, itself
            ``"auto"`` unless changed (fused kernels for CUDA tensors where they serve the inputs,
            else the eager reference) — exactly as fastvit's own models do, so ``use_backend("eager")``
            still switches an optimized model to the reference for debugging. Any other value
            (``"eager"``, ``"triton"``, ``"cuda"``, or a dict such as ``{"attention": "triton"}``) is
            validated now, as ``use_backend`` would (a backend that cannot run here raises
            :class:`fastvit.BackendUnavailableError`), and *pinned on this model's swapped modules*:
            each of their calls runs under that selection (families the dict does not name follow
            the process selection), and the selection is put back when the call returns, so other
            models are not affected. This is done per call rather than by setting the global
            selection because optimize should change this model, not every fastvit op in the process;
            it is traced by torch.compile (the op fronts read the selection at trace time, as always).
            The pin sets module state around each call, so it is not meant for threads that run
            models concurrently with different pins (DataParallel replicas share one pin: fine).
            An explicitly pinned backend that cannot serve an input raises at that call, as
            ``use_backend`` does.
        attention: swap attention modules (timm, vit-pytorch, T2T-ViT).
        mlp: swap LayerNorm + MLP halves (timm / T2T-ViT Blocks, vit-pytorch FeedForward and Transformer,
            the Token_performer's MLP half) and standalone LayerNorms.
        embed: swap patch embeddings and T2T soft splits.
        performer: swap the official T2T-ViT Token_performer.

    Returns:
        An :class:`OptimizeReport` (also logged on the ``"fastvit"`` logger at INFO).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = {"attention": attention, "mlp": mlp, "embed": embed, "performer": performer}
    for k, v in flags.items():
        if not isinstance(v, bool):
            raise TypeError(f"{k} must be a bool, got {type(v).__name__}")
    pin = _parse_backend(backend)
    root = _unwrap(model)
    ctx = _Ctx(_Env(), pin, flags)
    report = OptimizeReport(root, _describe_backend(pin))

    # soft splits are swapped only where the next step transposes them (T2T contexts)
    for m in root.modules():
        if _is_official_t2t_module(m):
            for name in ("soft_split0", "soft_split1", "soft_split2"):
                s = getattr(m, name, None)
                if type(s) is nn.Unfold:
                    ctx.soft_splits.add(id(s))
        elif type(m) is nn.Sequential:
            ctx.soft_splits.update(id(s) for s in _is_vitp_soft_split(m, ctx.env))

    consumed: set[int] = set()
    swapped: list[nn.Module] = []
    for name, m in root.named_modules():
        if id(m) in consumed:
            continue
        if isinstance(m, _Swapped):
            report.already.append(name)
            consumed.update(id(c) for c in type(m)._fv_consumed(m, ctx))
            continue
        if type(m).__module__.startswith(("fastvit.nn", "fastvit.models")):
            report.native.append(name)
            consumed.update(id(c) for c in m.modules())
            continue
        mixin = next((x for x in _MIXINS if x._fv_matches(m, ctx.env)), None)
        if mixin is None or (mixin is _SoftSplit and id(m) not in ctx.soft_splits):
            continue
        if not flags[mixin._fv_flag]:
            report.left_alone.append(SwapEntry(name, mixin._fv_label, f"{mixin._fv_flag}=False"))
            continue
        reason = "forward is overridden on the instance" if "forward" in m.__dict__ else mixin._fv_why_not(m, ctx)
        if reason:
            report.left_alone.append(SwapEntry(name, mixin._fv_label, reason))
            continue
        detail = mixin._fv_describe(m, ctx)
        consumed.update(id(c) for c in mixin._fv_consumed(m, ctx))
        _swap(m, mixin, ctx)
        swapped.append(m)
        report.replaced.append(SwapEntry(name, mixin._fv_label, detail))
    for m in swapped:  # after all swaps, so a Block records its (swapped) attention's original class
        _record_types(m)
    logger.info("%s", report)
    return report


def _strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Drop the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes every key shares."""
    while state_dict:
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                break
        else:
            return state_dict
    return state_dict


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike | Mapping,
    strict: bool = True,
    use_ema: bool = False,
    filter_head: bool = False,
    old_grid_size=None,
):
    """Load a checkpoint into a (possibly optimized, compiled or DDP-wrapped) timm / vit-pytorch /
    T2T-ViT / fastvit model, through :mod:`fastvit.models.convert`.

    ``path`` is a file (``.safetensors`` or a ``torch.save`` file, read with ``weights_only=True``) or
    an already-loaded dict. The state_dict is unwrapped (``{'model': ...}``, ``{'state_dict': ...}``,
    the EMA weights with ``use_ema``, ``module.`` / ``_orig_mod.`` prefixes), converted to the model's
    key layout (timm, vit-pytorch or T2T-ViT; linear-layout patch weights, DeiT-III ``gamma_1/2``,
    old 3-D vit-pytorch tensors), its position embedding resampled to the model's grid (from a square
    grid unless ``old_grid_size``), and loaded. ``optimize`` leaves keys unchanged, so checkpoints of
    the original model load into the optimized one and back. ``filter_head`` keeps the model's own
    classifier when the checkpoint's has another shape. Raises
    :class:`fastvit.models.convert.CheckpointError` listing missing / unexpected / mis-shaped keys.
    Returns torch's ``(missing_keys, unexpected_keys)``.
    """
    target = _unwrap(model)
    source = path if isinstance(path, Mapping) else _convert.read_checkpoint(path)
    state_dict = _strip_wrapper_prefixes(_convert.unwrap_state_dict(source, use_ema=use_ema))
    result = _convert.load_checkpoint(target, state_dict, strict=strict, filter_head=filter_head,
                                      old_grid_size=old_grid_size)
    where = "a state_dict" if isinstance(path, Mapping) else repr(os.fspath(path))
    logger.info("fastvit.load_checkpoint: %d tensors from %s into %s (%s keys)", len(state_dict), where,
                type(target).__name__, _convert.checkpoint_format(state_dict) or "unknown")
    return result

