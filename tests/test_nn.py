"""fastvit.nn modules against timm's and T2T-ViT's own modules, loaded with the same state_dict."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvit
import fastvit.nn as fnn
from official_t2t import Token_performer

timm_vit = pytest.importorskip("timm.models.vision_transformer")
timm_layers = pytest.importorskip("timm.layers")


def _same(ours, theirs, *inputs, dtype=torch.float64):
    ours.to(dtype).eval()
    theirs.to(dtype).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    a = [x.to(dtype).requires_grad_() for x in inputs]
    b = [x.to(dtype).requires_grad_() for x in inputs]
    ya, yb = ours(*a), theirs(*b)
    torch.testing.assert_close(ya, yb)
    ga = torch.autograd.grad(ya.square().sum(), [*a, *(p for p in ours.parameters() if p.requires_grad)])
    gb = torch.autograd.grad(yb.square().sum(), [*b, *(p for p in theirs.parameters() if p.requires_grad)])
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_patch_embed_matches_timm():
    ours = fnn.PatchEmbed(32, 8, 3, 48)
    _same(ours, timm_layers.PatchEmbed(32, 8, 3, 48), torch.randn(2, 3, 32, 32))
    pos, cls = torch.randn(1, 17, 48, dtype=torch.float64), torch.randn(1, 1, 48, dtype=torch.float64)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = torch.cat([cls.expand(2, 1, 48), ours(x)], 1) + pos
    torch.testing.assert_close(ours(x, pos, cls), expected)
    # an img_size that is not a multiple: the floor grid, as timm (SigLIP's 384 px at patch 14)
    assert fnn.PatchEmbed(30, 8).grid_size == timm_layers.PatchEmbed(30, 8).grid_size == (3, 3)


def test_soft_split_matches_unfold():
    x = torch.randn(2, 3, 32, 32)
    ss = fnn.SoftSplit(7, 4, 2)
    assert torch.equal(ss(x), nn.Unfold(7, stride=4, padding=2)(x).transpose(1, 2))
    assert ss.output_size(224, 224) == (56, 56)


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_attention_matches_timm(qkv_bias):
    _same(fnn.Attention(48, 3, qkv_bias=qkv_bias), timm_vit.Attention(48, 3, qkv_bias=qkv_bias), torch.randn(2, 7, 48))


@pytest.mark.parametrize("init_values", [None, 1e-2])
def test_block_matches_timm(init_values):
    ours = fnn.Block(48, 3, mlp_ratio=3.0, qkv_bias=True, init_values=init_values)
    theirs = timm_vit.Block(48, 3, mlp_ratio=3.0, qkv_bias=True, init_values=init_values)
    _same(ours, theirs, torch.randn(2, 11, 48))


def test_block_training_dropout_and_drop_path():
    block = fnn.Block(32, 2, proj_drop=0.2, attn_drop=0.2, drop_path=0.5).train()
    x = torch.randn(8, 5, 32)
    torch.manual_seed(0)
    a = block(x)
    torch.manual_seed(0)
    assert torch.equal(a, block(x))  # reproducible under a seed
    assert not torch.equal(a, block(x))
    block.eval()
    assert torch.equal(block(x), block(x))


def test_token_performer_matches_official():
    _same(fnn.TokenPerformer(147, 64), Token_performer(147, 64), torch.randn(2, 49, 147))
    ours = fnn.TokenPerformer(27, 64)
    assert not ours.w.requires_grad and ours.w.shape == (32, 64)
    assert set(ours.state_dict()) == set(Token_performer(27, 64).state_dict())


def test_layernorm_mlp_and_layer_norm_modules():
    m = fnn.LayerNormMLP(24, 96, drop=0.1).double().eval()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    expected = m.fc2(F.gelu(m.fc1(m.norm(x))))
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(m(x, residual=x), x + expected)
    ln = fnn.LayerNorm(24, eps=1e-6).double()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (24,), ln.weight, ln.bias, 1e-6))
    mlp = fnn.Mlp(24, 48).double()
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


def test_fronts_trace_with_torch_compile_fullgraph():
    """Checks, autocast and backend selection in the op fronts trace without graph breaks."""
    block, tp, pe = fnn.Block(64, 4, qkv_bias=True), fnn.TokenPerformer(27, 64).eval(), fnn.PatchEmbed(32, 8, 3, 64)

    def f(x, img):
        t = pe(img, torch.zeros(1, 17, 64), torch.zeros(64))
        return block(x).sum() + block(t).sum() + tp(fastvit.ops.soft_split(img, 3, 2, 1)).sum()

    x, img = torch.randn(2, 17, 64, requires_grad=True), torch.randn(2, 3, 32, 32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, img)
    (gx,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, f(x, img))
    torch.testing.assert_close(gx, torch.autograd.grad(f(x, img), x)[0])


def test_wrong_width_input_names_the_parameter():
    cases = [
        (fnn.Block(32, 2), "norm1.weight"),
        (fnn.Attention(32, 2), "qkv.weight"),
        (fnn.LayerNormMLP(32, 64), "norm.weight"),
        (fnn.TokenPerformer(32, 16), "norm1.weight"),
    ]
    for module, name in cases:
        with pytest.raises(ValueError, match=rf"x must be a tensor \(\.\.\., 32\) to match {name} \(32 features\), got \(2, 5, 40\)"):
            module(torch.randn(2, 5, 40))
