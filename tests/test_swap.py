"""fastvit.optimize / fastvit.load_checkpoint on timm, vit-pytorch and official-structure T2T-ViT models.

Every optimized model is judged against an untouched deepcopy by DESIGN.md's numerics rule: the
untouched model in float64 is ref64, in float32 the same-dtype eager run; logits and every parameter
gradient. The eager backend runs on CPU; each family with a Triton kernel gets one interpreter-backed
parity test on a tiny model.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvit
from fastvit import backend as fbackend
from fastvit import swap
from numerics import assert_model_grads, assert_numerics

timm = pytest.importorskip("timm")
from timm.layers import DropPath  # noqa: E402


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _one_thread():
    """These shapes are tiny: one intra-op thread is an order of magnitude faster than two on a loaded
    2-core machine, and keeps reductions in one order from run to run."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "state_dict keys changed"
    for k, v in before.items():
        assert after[k].shape == v.shape and after[k].dtype == v.dtype, f"{k}: shape/dtype changed"
        assert torch.equal(after[k], v), f"{k}: value changed"


def run(model: nn.Module, x: torch.Tensor, g: torch.Tensor | None = None):
    """Logits and the gradient of every trainable parameter for loss = sum(logits * g)."""
    model.zero_grad(set_to_none=True)
    y = model(x)
    if g is None:
        g = torch.randn(y.shape, dtype=torch.float64)
    (y * g.to(y.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), grads, g


def check_optimized(model: nn.Module, x: torch.Tensor, backend="eager", name: str = "", **kw):
    """optimize ``model`` (float32, eval) in place and judge logits and parameter grads against an
    untouched deepcopy; returns the report. state_dict and parameter objects must be unchanged."""
    model.eval()
    untouched = copy.deepcopy(model)
    ref64 = copy.deepcopy(model).double()
    before = snapshot(model)
    params_before = [id(p) for p in model.parameters()]
    report = fastvit.optimize(model, backend=backend, **kw)
    assert_same_state(model, before)
    assert [id(p) for p in model.parameters()] == params_before, "parameters must be reused, not replaced"

    y64, g64, g = run(ref64, x.double())
    ye, ge, _ = run(untouched, x, g)
    yf, gf, _ = run(model, x, g)
    assert_numerics(f"{name} logits", yf, y64, ye, torch.float32)
    assert_model_grads(name, gf, g64, ge, torch.float32)
    return report


def kinds(report) -> dict[str, int]:
    return report.counts()


def image(batch=8, size=32, chans=3):
    return torch.randn(batch, chans, size, size)


def small_vit(**kw):
    args = dict(img_size=32, num_classes=10, depth=2)
    args.update(kw)
    name = args.pop("name", "vit_tiny_patch16_224")
    return timm.create_model(name, **args)


from official_t2t import T2T_ViT  # noqa: E402


def tiny_t2t(**kw):
    args = dict(img_size=32, num_classes=10, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0, token_dim=16)
    args.update(kw)
    return T2T_ViT(**args)


# ------------------------------------------------------------------------------------------------
# parity: logits and every parameter gradient, eager backend
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", dict(depth=12)),
    ("vit_small_patch16_224", dict(depth=4)),  # dim 384, 6 heads; 4 of its 12 blocks keep the test fast
    ("deit_tiny_patch16_224", dict(depth=12)),
    # layer scale, qk_norm, drop path, registers, dynamic size (NHWC patch output), no cls token, avg pool
    ("vit_tiny_patch16_224", dict(init_values=1e-2, qk_norm=True, drop_path_rate=0.1, reg_tokens=2,
                                  dynamic_img_size=True, class_token=False, global_pool="avg", no_embed_class=True)),
])
def test_timm_models_match(name, kwargs):
    model = small_vit(name=name, **kwargs)
    x = image(size=kwargs.get("img_size", 32))
    report = check_optimized(model, x, name=name)
    depth = kwargs.get("depth", 2)
    n_ln = 1 + (2 * depth if kwargs.get("qk_norm") else 0)  # q_norm / k_norm are LayerNorms too
    assert kinds(report) == {"timm PatchEmbed": 1, "timm Block": depth, "timm Attention": depth, "LayerNorm": n_ln}
    assert not report.left_alone
    assert isinstance(model.blocks[0].attn, timm.layers.Attention), "isinstance against timm's class still holds"


@pytest.mark.parametrize("kwargs,size", [
    (dict(img_size=32), (32, 32)),
    (dict(img_size=32, dynamic_img_pad=True, strict_img_size=False), (36, 41)),
    (dict(img_size=32, output_fmt="NCHW"), (32, 32)),
    (dict(img_size=32, output_fmt="NHWC", strict_img_size=False), (48, 64)),
    (dict(img_size=32, output_fmt="NCL"), (32, 32)),
    (dict(img_size=None, norm_layer=nn.LayerNorm), (40, 37)),  # no size check: the remainder is ignored
])
def test_timm_patch_embed_variants(kwargs, size):
    pe = timm.layers.PatchEmbed(patch_size=16, in_chans=3, embed_dim=48, **kwargs)
    ref = copy.deepcopy(pe)
    report = fastvit.optimize(pe, backend="eager")
    assert report.replaced[0].kind == "timm PatchEmbed"
    x = torch.randn(2, 3, *size)
    y, r = pe(x), ref(x)
    assert y.shape == r.shape
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-5)
    if kwargs.get("strict_img_size", True) and kwargs["img_size"] is not None:
        with pytest.raises(AssertionError, match="doesn't match model"):
            pe(torch.randn(1, 3, 48, 32))


def test_timm_partial_swaps_are_reported():
    model = small_vit(init_values=1e-2, qk_norm=True)
    report = check_optimized(model, image())
    text = str(report)
    assert "residual added after the op (layer scale ls2 sits between)" in text
    assert "qk_norm applied to the q, k views first" in text
    print(text)


def vit_pytorch_models():
    vp = pytest.importorskip("vit_pytorch")
    from vit_pytorch.simple_vit import SimpleViT
    from vit_pytorch.t2t import T2TViT

    return {
        "ViT": lambda: vp.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128,
                              dim_head=32),
        "ViT-mean": lambda: vp.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=96,
                                   dim_head=32, pool="mean"),
        "SimpleViT": lambda: SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2,
                                       mlp_dim=128, dim_head=32),
        # one input channel keeps the T2T transformers at 49 and 441 features (147 and 1323 with RGB)
        "T2TViT": lambda: T2TViT(image_size=32, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, dim_head=32,
                                 channels=1),
    }


@pytest.mark.parametrize("which", ["ViT", "ViT-mean", "SimpleViT", "T2TViT"])
def test_vit_pytorch_models_match(which):
    model = vit_pytorch_models()[which]()
    report = check_optimized(model, image(chans=1 if which == "T2TViT" else 3), name=which)
    counts = kinds(report)
    if which == "T2TViT":
        # 2 + 1 transformers (the T2T ones with heads=1 and head dim = 49 / 441), 3 soft splits
        assert counts == {"vit-pytorch Transformer": 3, "vit-pytorch Attention": 4, "vit-pytorch FeedForward": 4,
                          "nn.Unfold (T2T soft split)": 3, "LayerNorm": 3}
    else:
        assert counts == {"vit-pytorch patch embedding": 1, "vit-pytorch Transformer": 1,
                          "vit-pytorch Attention": 2, "vit-pytorch FeedForward": 2, "LayerNorm": 1}


def test_official_t2t_matches():
    model = tiny_t2t(qk_scale=64 ** -0.5, drop_path_rate=0.1)
    report = check_optimized(model, image(), name="T2T-ViT")
    assert kinds(report) == {"nn.Unfold (T2T soft split)": 3, "T2T-ViT Token_performer": 2, "T2T-ViT Block": 2,
                             "T2T-ViT Attention": 2, "LayerNorm": 1}
    assert not report.left_alone


def test_fastvit_t2t_convenience_model_is_native():
    """fastvit's own T2TViT already runs on fastvit.ops: nothing to swap, and the report says so."""
    model = fastvit.T2TViT(img_size=32, embed_dim=64, depth=1, num_heads=2, token_dim=16, num_classes=10)
    before = snapshot(model)
    report = fastvit.optimize(model)
    assert not report.changed and report.native == [""]
    assert "nothing replaced" in str(report) and "fastvit modules" in str(report)
    assert_same_state(model, before)


# ------------------------------------------------------------------------------------------------
# what is left alone, and why
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act_layer, activation", [("gelu_tanh", "gelu_tanh"), ("quick_gelu", "quick_gelu")])
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_gelu_variants_are_fused(act_layer, activation, backend):
    """SigLIP's tanh GELU and CLIP's QuickGELU: the Block's MLP half is one layernorm_mlp call with that
    activation, and the model computes what timm's does."""
    model = small_vit(depth=1, act_layer=act_layer)
    report = check_optimized(model, image(), backend=backend, name=act_layer)
    assert kinds(report)["timm Block"] == 1 and not report.left_alone
    assert model.blocks[0]._fastvit_activation == activation
    model.blocks[0].mlp.act = nn.GELU()  # surgery after optimize: the original forward runs
    assert not model.blocks[0]._fv_intact()


def test_left_alone_with_reasons():
    model = nn.Sequential()
    model.add_module("tanh", small_vit(depth=1, act_layer="gelu_tanh"))
    model.add_module("silu", small_vit(depth=1, act_layer="silu"))
    model.add_module("mlpnorm", small_vit(depth=1, scale_mlp_norm=True))
    model.add_module("swiglu", small_vit(depth=1, mlp_layer=timm.layers.SwiGLUPacked, act_layer="silu",
                                         mlp_ratio=2.0))
    model.add_module("heads", small_vit(depth=1, num_heads=16))  # head dim 12: no fused kernel takes it
    model.add_module("heads48", small_vit(depth=1, num_heads=4))  # head dim 48: fused (a multiple of 8)
    before = snapshot(model)
    report = fastvit.optimize(model)  # auto: the head-dim rule applies
    assert_same_state(model, before)
    reasons = {e.name: e.detail for e in report.left_alone}
    assert "tanh.blocks.0" not in reasons  # tanh GELU is fused
    assert "activation SiLU" in reasons["silu.blocks.0"]
    assert "Mlp.norm (scale_mlp_norm)" in reasons["mlpnorm.blocks.0"]
    assert "not timm's Mlp" in reasons["swiglu.blocks.0"]
    if fbackend.implementations("attention_qkvpacked")[0] != "eager":
        assert "head dim 12" in reasons["heads.blocks.0.attn"]
        assert isinstance(model.heads48.blocks[0].attn, swap.timm._TimmAttention)
    text = str(report)
    assert "left alone" in text and "SiLU" in text
    # the attention of the left-alone blocks is still swapped
    assert isinstance(model.silu.blocks[0].attn, swap.timm._TimmAttention)
    assert not isinstance(model.silu.blocks[0], swap.core._Swapped)


def test_flags_leave_families_alone():
    model = small_vit(depth=1)
    report = fastvit.optimize(model, attention=False, embed=False)
    assert kinds(report) == {"timm Block": 1, "LayerNorm": 1}
    assert {e.detail for e in report.left_alone} == {"attention=False", "embed=False"}
    assert type(model.blocks[0].attn) is timm.layers.Attention


def test_nothing_to_swap_comes_back_unchanged(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 30 * 30, 10))
    before = snapshot(model)
    classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.INFO, logger="fastvit"):
        report = fastvit.optimize(model)
    assert not report.changed and not report.replaced and not report.left_alone
    assert "nothing replaced, the model is unchanged" in str(report)
    assert "nothing replaced" in caplog.text, "the report is logged on the 'fastvit' logger"
    assert [type(m) for m in model.modules()] == classes
    assert_same_state(model, before)
    assert report.model is model


def test_optimize_twice_and_restore():
    model = small_vit(depth=1)
    ref = copy.deepcopy(model).eval()
    first = fastvit.optimize(model)
    second = fastvit.optimize(model)
    assert not second.changed and len(second.already) == len(first.replaced)
    n = swap.restore(model)
    assert n == len(first.replaced)
    assert not any(isinstance(m, swap.core._Swapped) for m in model.modules())
    assert not any(k.startswith("_fastvit") for m in model.modules() for k in m.__dict__)
    x = image()
    torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# the model stays an ordinary model
# ------------------------------------------------------------------------------------------------


def test_deepcopy_pickle_and_ema():
    model = small_vit(drop_rate=0.1)
    fastvit.optimize(model, backend="eager")
    x = image()
    model.eval()
    y = model(x)

    clone = copy.deepcopy(model)
    assert type(clone.blocks[0]) is type(model.blocks[0]) and clone.blocks[0]._fastvit_backend == {
        f: "eager" for f in fbackend.FAMILIES}
    assert clone.blocks[0].mlp.fc1.weight is not model.blocks[0].mlp.fc1.weight
    torch.testing.assert_close(clone(x), y, rtol=0, atol=0)

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.blocks[0], swap.timm._TimmBlock)
    assert isinstance(loaded.blocks[0], timm.models.vision_transformer.Block)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)

    # timm's EMA deep-copies the model and lerps towards it
    from timm.utils import ModelEmaV3

    model.train()
    ema = ModelEmaV3(model, decay=0.5)
    assert isinstance(ema.module.blocks[0].attn, swap.timm._TimmAttention)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().mean().backward()
    opt.step()
    expected = {k: 0.5 * v + 0.5 * model.state_dict()[k] for k, v in ema.module.state_dict().items()}
    ema.update(model, step=100)
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(v, expected[k])
    ema.module.eval()(x)


def test_ddp_wrapping(tmp_path):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("no gloo process group")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = small_vit(depth=1)
        ref = copy.deepcopy(model)
        fastvit.optimize(model, backend="eager")
        ddp = nn.parallel.DistributedDataParallel(model)
        x = image()
        ddp(x).square().sum().backward()
        ref(x).square().sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)
        again = fastvit.optimize(ddp)  # a wrapped model is unwrapped: nothing new to swap
        assert not again.changed and again.already
    finally:
        dist.destroy_process_group()


def test_optimizer_built_before_keeps_working():
    model = small_vit(depth=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    fastvit.optimize(model)
    w = model.blocks[0].mlp.fc1.weight
    before = w.detach().clone()
    model(image()).logsumexp(-1).mean().backward()
    assert w.grad is not None, "the fused op's gradient reaches the original parameter"
    opt.step()
    assert not torch.equal(w, before)


def test_train_eval_dropout_and_drop_path():
    model = small_vit(drop_rate=0.3, attn_drop_rate=0.3, proj_drop_rate=0.3, drop_path_rate=0.3)
    ref = copy.deepcopy(model)
    fastvit.optimize(model, backend="eager")
    x = image()
    model.train()
    assert all(m.training for m in model.modules())
    a, b = model(x), model(x)
    assert not torch.allclose(a, b), "dropout / drop path are active in train()"
    model.eval()
    ref.eval()
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    # the module's own p is read at each call: p = 0 makes train() deterministic again
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    model.train()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_torch_compile_after_optimize():
    model = small_vit(depth=1, embed_dim=64, num_heads=2).eval()
    fastvit.optimize(model)
    x = image()
    expected = model(x)
    compiled = torch.compile(model, fullgraph=False, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
    assert fastvit.get_backend() == dict.fromkeys(fbackend.FAMILIES, "auto")


# ------------------------------------------------------------------------------------------------
# timm Attention: masks, is_causal, timm <= 1.0.15
# ------------------------------------------------------------------------------------------------


def test_timm_attention_mask_and_is_causal():
    attn = timm.layers.Attention(64, num_heads=2, qkv_bias=True).eval()
    ref = copy.deepcopy(attn)
    fastvit.optimize(attn, backend="eager")
    x = torch.randn(2, 7, 64)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True  # every query attends to something (SDPA gives NaN rows otherwise)
    torch.testing.assert_close(attn(x, attn_mask=mask), ref(x, attn_mask=mask), rtol=1e-5, atol=1e-5)
    additive = torch.randn(7, 7)
    torch.testing.assert_close(attn(x, attn_mask=additive), ref(x, attn_mask=additive), rtol=1e-5, atol=1e-5)
    # causal: timm's own forward (fastvit's attention is non-causal)
    torch.testing.assert_close(attn(x, is_causal=True), ref(x, is_causal=True), rtol=0, atol=0)
    assert not torch.allclose(attn(x, is_causal=True), attn(x))


class OldTimmAttention(nn.Module):
    """timm 1.0.15's vision_transformer.Attention, forward(x) only."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, proj_bias=True, attn_drop=0., proj_drop=0.,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = False
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v,
                dropout_p=self.attn_drop.p if self.training else 0.,
            )
        else:
            q = q * self.scale
            attn = q @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v

        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


class OldTimmBlock(timm.models.vision_transformer.Block):
    """timm 1.0.15's Block.forward(x): no attn_mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


def test_timm_1_0_15_attention_and_block(monkeypatch):
    import timm.models.vision_transformer as tv

    monkeypatch.setattr(tv, "Attention", OldTimmAttention)
    monkeypatch.setattr(tv, "Block", OldTimmBlock)
    model = small_vit(depth=2)
    for blk in model.blocks:  # the same weights in 1.0.15's classes
        old = OldTimmAttention(192, num_heads=3, qkv_bias=True)
        old.load_state_dict(blk.attn.state_dict())
        blk.attn = old
        blk.__class__ = OldTimmBlock
    report = check_optimized(model, image(), name="timm 1.0.15")
    assert kinds(report) == {"timm PatchEmbed": 1, "timm Block": 2, "timm Attention": 2, "LayerNorm": 1}
    with pytest.raises(TypeError, match="attn_mask"):
        model.blocks[0](torch.randn(1, 5, 192), attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_unknown_attribute_in_forward_is_left_alone():
    class NewerAttention(timm.layers.Attention):
        def forward(self, x, attn_mask=None, is_causal=False):
            return super().forward(x * self.rope_scale, attn_mask, is_causal)

    import timm.layers.attention as ta

    attn = NewerAttention(64, num_heads=2)
    attn.rope_scale = 2.0
    env = swap.core._Env()
    env.timm_attention += (NewerAttention,)
    ctx = swap.core._Ctx(env, None, dict(attention=True, mlp=True, embed=True, performer=True))
    assert "self.rope_scale" in swap.timm._TimmAttention._fv_why_not(attn, ctx)
    assert ta.Attention is timm.layers.Attention


# ------------------------------------------------------------------------------------------------
# per-call integrity: model surgery and hooks after optimize run the original forward
# ------------------------------------------------------------------------------------------------


def test_surgery_and_hooks_after_optimize_fall_back():
    model = small_vit(depth=1).eval()
    fastvit.optimize(model, backend="eager")
    ref = copy.deepcopy(model)
    swap.restore(ref)
    x = image()
    model.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    ref.blocks[0].mlp.act = nn.GELU(approximate="tanh")
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    seen = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    model(x)
    assert seen == [torch.Size([8, 5, 768])], "a hook on a fused-away module still runs"


# ------------------------------------------------------------------------------------------------
# backend=
# ------------------------------------------------------------------------------------------------


def test_backend_argument(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvit.optimize(small_vit(depth=1), backend="fast")
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only error")
    with pytest.raises(fastvit.BackendUnavailableError, match="cuda"):
        fastvit.optimize(small_vit(depth=1), backend="cuda")

    calls = []
    impl = fbackend._impls["layernorm_mlp"]["eager"]
    spy = fbackend.Impl(impl.fn, impl.backend, lambda *a, **k: (calls.append(1), impl.call(*a, **k))[1], impl.why_not)
    monkeypatch.setitem(fbackend._impls["layernorm_mlp"], "eager", spy)
    model = small_vit(depth=2)
    report = fastvit.optimize(model, backend={"mlp": "eager"})
    assert "mlp=eager pinned" in str(report)
    with fastvit.use_backend("eager"):
        model(image())
    assert len(calls) == 2
    assert fastvit.get_backend() == dict.fromkeys(fbackend.FAMILIES, "auto"), "the pin is put back after each call"


# ------------------------------------------------------------------------------------------------
# load_checkpoint
# ------------------------------------------------------------------------------------------------


def test_load_checkpoint_into_optimized_model(tmp_path):
    src = small_vit(depth=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"_orig_mod." + k: v for k, v in src.state_dict().items()}}, path)
    model = small_vit(depth=1)
    fastvit.optimize(model)
    missing, unexpected = fastvit.load_checkpoint(model, path)
    assert not missing and not unexpected
    x = image()
    torch.testing.assert_close(model.eval()(x), src.eval()(x), rtol=1e-5, atol=1e-5)
    # another image size: the position table is resampled (convert.py)
    big = small_vit(depth=1, img_size=64)
    fastvit.optimize(big)
    fastvit.load_checkpoint(big, src.state_dict())
    assert big.pos_embed.shape == (1, 17, 192)


# ------------------------------------------------------------------------------------------------
# Triton interpreter: one parity test per family that has a Triton kernel
# ------------------------------------------------------------------------------------------------


def _triton_serves(fn: str) -> bool:
    return "triton" in fbackend.implementations(fn) and fbackend.availability("triton") is None


@pytest.mark.parametrize("family,fns,which", [
    ("embed", ("patch_embed", "soft_split"), "both"),
    ("attention", ("attention_qkvpacked",), "vit"),
    ("mlp", ("layernorm_mlp", "layer_norm"), "vit"),
    ("performer", ("performer_attention",), "t2t"),
])
def test_triton_interpreter_parity(family, fns, which):
    if not all(_triton_serves(fn) for fn in fns):
        pytest.skip(f"no Triton kernel for {fns} here")
    calls = []
    originals = {fn: fbackend._impls[fn]["triton"] for fn in fns}

    def spy(impl):
        return fbackend.Impl(impl.fn, impl.backend, lambda *a, **k: (calls.append(impl.fn), impl.call(*a, **k))[1],
                             impl.why_not)

    try:
        for fn, impl in originals.items():
            fbackend._impls[fn]["triton"] = spy(impl)
        models = []
        if which in ("vit", "both"):
            models.append(("vit", timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=64, depth=1,
                                                    num_heads=2, mlp_ratio=2.0, num_classes=10)))
        if family == "mlp":
            # layer scale multiplying the fused MLP's output in place (the op keeps its output for backward)
            vit = timm.create_model("vit_tiny_patch16_224", img_size=32, embed_dim=64, depth=1, num_heads=2,
                                    mlp_ratio=2.0, num_classes=10, init_values=0.5)
            vit.blocks[0].ls2.inplace = True
            models.append(("vit-inplace-ls", vit))
        if which in ("t2t", "both"):
            models.append(("t2t", tiny_t2t(depth=1)))
        if which == "both" and importlib.util.find_spec("vit_pytorch") is not None:
            # vit-pytorch's (p1 p2 c) patches with both LayerNorms; SimpleViT adds pos in place
            models.append(("simple_vit", vit_pytorch_models()["SimpleViT"]()))
        for name, model in models:
            check_optimized(model, image(batch=2), backend={family: "triton"}, name=f"{family}/{name}")
    finally:
        for fn, impl in originals.items():
            fbackend._impls[fn]["triton"] = impl
    assert set(calls) == set(fns), f"the Triton kernels ran: {sorted(set(calls))}"


def test_wrong_width_input_names_the_parameter():
    """A swapped module's input check names the parameter that sets its width, not an op argument."""
    timm_model = small_vit()
    vp_model = vit_pytorch_models()["ViT"]()
    t2t = tiny_t2t()
    for model in (timm_model, vp_model, t2t):
        assert fastvit.optimize(model).changed
    cases = [
        (timm_model.blocks[0], 192, "norm2.weight"),
        (timm_model.blocks[0].attn, 192, "qkv.weight"),
        (vp_model.transformer.layers[0][0], 64, "norm.weight"),
        (vp_model.transformer.layers[0][1], 64, "net.0.weight"),
        (t2t.blocks[0], 64, "norm2.weight"),
        (t2t.tokens_to_token.attention1, 3 * 7 * 7, "norm1.weight"),
    ]
    for module, width, name in cases:
        assert isinstance(module, swap.core._Swapped), type(module)
        with pytest.raises(ValueError, match=rf"x must be a tensor \(\.\.\., {width}\) to match {name}"):
            module(torch.randn(2, 5, width + 8))


# The ViTs people fine-tune, at depth 2 and a small image: every Block, Attention, PatchEmbed and LayerNorm
# fused (CLIP's QuickGELU and SigLIP's tanh GELU MLPs included); the hybrids' CNN stem stays timm's and
# the patch projection on its feature map (HybridEmbed.proj) becomes ops.patch_embed.
VARIANTS = {
    "deit_tiny_distilled_patch16_224": (dict(img_size=32), 32),
    "vit_small_patch14_dinov2": (dict(img_size=28), 28),
    "vit_small_patch14_reg4_dinov2": (dict(img_size=28), 28),
    "vit_base_patch16_clip_224": (dict(img_size=32), 32),
    "vit_base_patch16_clip_quickgelu_224": (dict(img_size=32), 32),
    "vit_base_patch16_siglip_224": (dict(img_size=32), 32),
    "vit_base_patch32_siglip_256": (dict(img_size=64), 64),  # tanh GELU in the blocks and the pool's Mlp
    "vit_tiny_r_s16_p8_224": (dict(img_size=64), 64),
    "vit_small_r26_s32_224": (dict(img_size=64), 64),
}


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_timm_variants_fused_end_to_end(name, backend):
    kwargs, size = VARIANTS[name]
    model = timm.create_model(name, depth=2, **kwargs)
    report = check_optimized(model, image(batch=2, size=size), backend=backend, name=name)
    counts = kinds(report)
    left = {e.name: e.detail for e in report.left_alone}
    if "siglip" in name:  # the map pool head: ops.attention and ops.layernorm_mlp
        assert counts["timm AttentionPoolLatent"] == 1, str(report)
    assert counts["timm Block"] == 2 and counts["timm Attention"] == 2 and not left, str(report)
    hybrid = "_r_" in name or "_r26_" in name
    assert counts.get("timm HybridEmbed" if hybrid else "timm PatchEmbed") == 1, str(report)


class LoraLinear(nn.Module):
    """A LoRA adapter the way peft wraps a Linear: the base layer plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(x))


@pytest.mark.parametrize("when", ["before", "after"])
def test_lora_wrapped_mlp_unfuses_its_block(when):
    """A LoRA-wrapped fc1 cannot be one ops.layernorm_mlp call: wrapped before optimize, the report
    says so for that Block; wrapped after, the Block runs its original forward. Either way the
    logits and gradients equal timm's, and the other Block stays fused."""
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)
    if when == "before":
        model.blocks[1].mlp.fc1 = LoraLinear(model.blocks[1].mlp.fc1)
        report = check_optimized(model, image(batch=2, size=32), name="lora before")
        left = {e.name: e.detail for e in report.left_alone}
        assert "blocks.1" in left and "LoraLinear" in left["blocks.1"] and "nn.Linear" in left["blocks.1"], str(report)
        assert kinds(report)["timm Block"] == 1, str(report)
        return
    fastvit.optimize(model, backend="eager")
    model.blocks[1].mlp.fc1 = LoraLinear(model.blocks[1].mlp.fc1)
    reference = copy.deepcopy(model)
    fastvit.restore(reference)
    x = image(batch=2, size=32)
    torch.testing.assert_close(model.eval()(x), reference.eval()(x))
    assert not model.blocks[1]._fv_intact() and model.blocks[0]._fv_intact()


def test_timm_attention_pool_variants():
    """timm's AttentionPoolLatent: two latents without pooling, qk_norm and no q projection fused; a mask
    runs timm's own forward; a position table is reported and left alone."""
    from timm.layers import AttentionPoolLatent

    cases = [
        AttentionPoolLatent(64, num_heads=4, latent_len=2, pool_type="", qk_norm=True, norm_layer=nn.LayerNorm),
        AttentionPoolLatent(64, num_heads=2, q_proj=False, mlp_ratio=2.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm),
    ]
    x = torch.randn(3, 9, 64)
    for pool in cases:
        with torch.no_grad():
            for p in pool.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model = nn.Sequential(pool)
        report = check_optimized(model, x, backend="triton", name="attention pool")
        assert kinds(report).get("timm AttentionPoolLatent") == 1 and not report.left_alone, str(report)
    mask = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    mask[..., -2:] = False
    reference = copy.deepcopy(cases[0])
    fastvit.restore(reference)
    torch.testing.assert_close(cases[0](x, attn_mask=mask), reference(x, attn_mask=mask))
    positioned = nn.Sequential(AttentionPoolLatent(64, num_heads=4, feat_size=9, pos_embed="abs", norm_layer=nn.LayerNorm))
    report = fastvit.optimize(positioned)
    assert "pos_embed" in {e.name: e.detail for e in report.left_alone}["0"], str(report)
    report = fastvit.optimize(nn.Sequential(AttentionPoolLatent(64, num_heads=4)))  # timm's default: no norm
    assert "norm is Identity" in {e.name: e.detail for e in report.left_alone}["0"], str(report)
