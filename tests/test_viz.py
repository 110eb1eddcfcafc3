"""fastvit.viz: attention maps out of fused attention, rollout, plots and the fastvit-viz command line."""

from __future__ import annotations

import collections

import pytest
import timm
import torch
from numerics import assert_numerics
from PIL import Image
from torch import nn

import fastvit
from fastvit import backend, viz
from fastvit.viz.cli import main as viz_main


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    s = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.softmax(-1)


def _inputs_of(modules):
    """Record each module's input (forward hooks) while the model runs on the eager backend."""
    seen, handles = {}, []
    for name, m in modules:
        handles.append(m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, args[0])))
    return seen, handles


@pytest.fixture
def dispatches(monkeypatch):
    """(fn, backend) of every op dispatch while the test runs."""
    counts = collections.Counter()
    select = backend.select

    def counting(fn, *args, **kwargs):
        impl = select(fn, *args, **kwargs)
        counts[(fn, impl.backend)] += 1
        return impl

    monkeypatch.setattr(backend, "select", counting)
    return counts


def test_maps_equal_the_eager_softmax_with_every_layer_fused(dispatches):
    """fastvit's VisionTransformer (a class and 2 register tokens) on Triton: the chosen layers' maps by
    the numerics rule against q k^T softmax in float64; every attention call still runs the Triton kernel."""
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=3, reg_tokens=2).eval()
    x = torch.randn(2, 3, 32, 32)
    with fastvit.use_backend("triton"):
        maps = viz.attention_maps(model, x, layers=[0, -1])
    assert dispatches[("attention_qkvpacked", "triton")] == 3 and not dispatches[("attention_qkvpacked", "eager")]
    assert dispatches[("layernorm_mlp", "triton")] == 3
    assert maps.names == ["blocks.0.attn", "blocks.2.attn"] and maps.prefix_tokens == 3 and maps.grid == (2, 2)
    layers = [(n, m) for n, m in model.named_modules() if n in maps.names]
    seen, handles = _inputs_of(layers)
    with fastvit.use_backend("eager"), torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    for (name, attn), got in zip(layers, maps):
        assert got.shape == (2, 3, 7, 7) and got.dtype == torch.float32
        B, N, _ = seen[name].shape

        def probs(dtype):
            qkv = torch.nn.functional.linear(seen[name].to(dtype), attn.qkv.weight.to(dtype), attn.qkv.bias.to(dtype))
            q, k, _ = qkv.reshape(B, N, 3, 3, -1).permute(2, 0, 3, 1, 4)
            return _probs(q, k, attn.scale)

        assert_numerics(f"{name} probabilities", got, probs(torch.float64), probs(torch.float32), torch.float32)
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, 7))


class MaskedBlocks(nn.Module):
    """Blocks under a key-padding mask (the last 3 tokens hidden); the "image" is (B, 1, N, D) tokens."""

    def __init__(self, dim=32, heads=2, depth=2):
        super().__init__()
        self.blocks = nn.ModuleList(fastvit.nn.Block(dim, heads, qkv_bias=True) for _ in range(depth))

    def forward(self, x):
        x = x[:, 0]
        keep = torch.ones(x.shape[0], 1, 1, x.shape[1], dtype=torch.bool)
        keep[..., -3:] = False
        for blk in self.blocks:
            x = blk(x, keep)
        return x


def test_masked_keys_get_zero_and_rows_sum_to_one():
    model = MaskedBlocks().eval()
    maps = viz.attention_maps(model, torch.randn(2, 1, 9, 32), heads=1)
    assert len(maps) == 2 and maps[0].shape == (2, 1, 9, 9)
    for m in maps:
        assert torch.equal(m[..., -3:], torch.zeros_like(m[..., -3:]))
        torch.testing.assert_close(m.sum(-1), torch.ones(2, 1, 9))


@pytest.mark.parametrize("library", ["timm", "vit_pytorch", "t2t"])
def test_optimized_library_models(library, dispatches):
    """timm (distilled DeiT: two prefix tokens), vit-pytorch and T2T-ViT (its Performer layers have no
    map: only its ViT blocks count) after optimize, on Triton: maps of every layer, rows summing to 1."""
    if library == "timm":
        model, size, prefix = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=2), 32, 2
    elif library == "vit_pytorch":
        vit_pytorch = pytest.importorskip("vit_pytorch")
        model = vit_pytorch.ViT(image_size=32, patch_size=8, num_classes=5, dim=64, depth=2, heads=4, mlp_dim=128)
        size, prefix = 32, 1
    else:
        from official_t2t import T2T_ViT

        model = T2T_ViT(img_size=32, embed_dim=64, depth=2, num_heads=2, token_dim=16, num_classes=5)
        size, prefix = 32, 1
    fastvit.optimize(model.eval(), backend="triton")
    layers = viz.attention_layers(model)
    assert len(layers) == 2 and not any("tokens_to_token" in n for n, _ in layers)
    maps = viz.attention_maps(model, torch.randn(1, 3, size, size))
    assert dispatches[("attention_qkvpacked", "triton")] == 2
    assert maps.prefix_tokens == prefix and maps.grid is not None
    for m in maps:
        torch.testing.assert_close(m.sum(-1), torch.ones(m.shape[:-1]))


def test_any_image_size_the_model_takes():
    """A dynamic-size model at 48 x 32: the grid follows the image (3 x 2 patches of 16)."""
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=2, dynamic_img_size=True).eval()
    maps = viz.attention_maps(model, torch.randn(1, 3, 48, 32))
    assert maps[0].shape == (1, 3, 7, 7) and maps.grid == (3, 2)
    assert viz.attention_rollout(maps).shape == viz.class_token_attention(maps).shape == (1, 3, 2)


@pytest.mark.gpu
def test_gpu_maps_under_bf16_autocast_are_the_eager_softmax_of_the_layer_inputs():
    """On the GPU, Triton backend, bf16 autocast: each map is softmax(q k^T * scale) in fp32 of the bf16
    q, k that the layer's qkv Linear makes from the layer's input in the same run."""
    from fastvit import reference

    model = fastvit.create_model("vit_small_patch16_224", depth=4).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    layers = viz.attention_layers(model)
    seen, handles = _inputs_of(layers)
    with fastvit.use_backend("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        maps = viz.attention_maps(model, x)
        for h in handles:
            h.remove()
        for (name, attn), got in zip(layers, maps):
            qkv = attn.qkv(seen[name])  # bf16, as in the run
            q, k, _ = qkv.reshape(4, 197, 3, 6, 64).permute(2, 0, 3, 1, 4)
            with torch.autocast("cuda", enabled=False):  # fp32 scores and softmax, not autocast's bf16 matmul
                expected = reference.attention_probs(q.float(), k.float(), None, attn.scale)
            assert got.dtype == torch.float32 and got.shape == (4, 6, 197, 197)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            torch.testing.assert_close(got.sum(-1), torch.ones_like(got[..., 0]))


def test_review_findings(dispatches):
    """Registers without a class token are not taken for one; maps are fp32 under autocast; hooks leave an
    optimized timm Block fused (its MLP still one layernorm_mlp call); the grid comes from the model's
    patch embedding (dynamic padding); rollout refuses layers out of order."""
    regs = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=2, class_token=False, reg_tokens=2,
                                global_pool="avg").eval()
    maps = viz.attention_maps(regs, torch.randn(1, 3, 32, 32))
    assert maps.prefix_tokens == 2 and not maps.class_token
    with pytest.raises(ValueError, match="no class token"):
        viz.class_token_attention(maps)
    rows = maps[0].mean(1)[:, 2:, 2:].mean(1)  # one layer: ((A + I) / 2) rows over the patches, averaged
    expected = (rows + torch.eye(6)[2:, 2:].mean(0)) / 2
    torch.testing.assert_close(viz.attention_rollout(maps[:1], grid=(2, 2), prefix_tokens=2, class_token=False),
                               (expected / expected.amax()).reshape(1, 2, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert viz.attention_maps(regs, torch.randn(1, 3, 32, 32))[0].dtype == torch.float32

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3).eval()
    fastvit.optimize(model, backend="triton")
    dispatches.clear()
    viz.attention_maps(model, torch.randn(1, 3, 32, 32))
    assert dispatches[("layernorm_mlp", "triton")] == 3 and dispatches[("attention_qkvpacked", "triton")] == 3

    padded = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_size=True,
                               dynamic_img_pad=True).eval()
    fastvit.optimize(padded)
    assert viz.attention_maps(padded, torch.randn(1, 3, 17, 31)).grid == (2, 2)
    backwards = viz.attention_maps(regs, torch.randn(1, 3, 32, 32), layers=[1, 0])
    assert backwards.names == ["blocks.1.attn", "blocks.0.attn"]
    with pytest.raises(ValueError, match="in order"):
        viz.attention_rollout(backwards)


def test_rollout_matches_a_hand_computed_case():
    # one head, a class token and two patches (grid 1 x 2), two layers
    a1 = [[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]
    a2 = [[0.2, 0.4, 0.4], [0.3, 0.3, 0.4], [0.0, 0.5, 0.5]]

    def half_plus_identity(a):  # (A + I) / 2 keeps rows summing to 1
        return [[(a[i][j] + (i == j)) / 2 for j in range(3)] for i in range(3)]

    s1, s2 = half_plus_identity(a1), half_plus_identity(a2)
    row0 = [sum(s2[0][k] * s1[k][j] for k in range(3)) for j in range(3)]  # (s2 @ s1)[0]
    expected = torch.tensor([[row0[1:]]]) / max(row0[1:])
    maps = [torch.tensor([[a]]) for a in (a1, a2)]
    got = viz.attention_rollout(maps, prefix_tokens=1, grid=(1, 2))
    torch.testing.assert_close(got, expected)
    # discard_ratio 0.5 of a 2-token map: the two weakest entries dropped, the class token's own kept
    a = torch.tensor([[[[0.1, 0.9], [0.3, 0.7]]]])
    dropped = torch.tensor([[0.1, 0.9], [0.0, 0.7]])  # 0.1 is the weakest but is the class token's own
    step = (dropped + torch.eye(2)) / 2
    step = step / step.sum(-1, keepdim=True)
    got = viz.attention_rollout([a], discard_ratio=0.5, prefix_tokens=1, grid=(1, 1))
    torch.testing.assert_close(got, torch.ones(1, 1, 1))
    assert step[0, 1] > 0  # the rollout row is 1 patch wide: scaled to max 1
    with pytest.raises(ValueError, match="discard_ratio"):
        viz.attention_rollout(maps, discard_ratio=1.0, grid=(1, 2))
    with pytest.raises(ValueError, match="head_fusion"):
        viz.attention_rollout(maps, head_fusion="median", grid=(1, 2))


def test_class_token_attention_and_head_fusion():
    maps = [torch.rand(2, 3, 5, 5).softmax(-1)]
    got = viz.class_token_attention(maps, head_fusion="max", prefix_tokens=1)
    row = maps[0].amax(1)[:, 0, 1:].reshape(2, 2, 2)
    torch.testing.assert_close(got, row / row.flatten(1).amax(1)[:, None, None])
    with pytest.raises(ValueError, match="no class token"):
        viz.class_token_attention(maps, prefix_tokens=0)
    with pytest.raises(ValueError, match="grid"):
        viz.class_token_attention([torch.rand(1, 1, 4, 4)], prefix_tokens=1)


def test_plots_write_pngs_of_the_expected_size(tmp_path):
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=64, depth=2).eval()
    image = torch.rand(3, 64, 64)
    maps = viz.attention_maps(model, image)
    out = viz.overlay(image, viz.class_token_attention(maps)[0])
    assert out.shape == (64, 64, 3) and 0.0 <= out.min() and out.max() <= 1.0
    for name, fig in (
        ("attention", lambda p: viz.plot_attention(image, maps, out=p, figsize=(6, 2), dpi=50)),
        ("pos", lambda p: viz.plot_pos_embed_similarity(model, out=p, figsize=(4, 4), dpi=50)),
        ("filters", lambda p: viz.plot_patch_embed_filters(model, components=10, out=p, figsize=(5, 3), dpi=50)),
    ):
        path = tmp_path / f"{name}.png"
        fig(path)
        assert Image.open(path).size == {"attention": (300, 100), "pos": (200, 200), "filters": (250, 150)}[name]
    table, grid = viz.position_table(model)
    assert table.shape == (16, 192) and grid == (4, 4)


def test_bad_input_gets_clear_errors():
    model = fastvit.create_model("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    with pytest.raises(ValueError, match="no attention layer fastvit recognises.*optimize"):
        viz.attention_maps(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="no attention layer.*Performer"):
        viz.attention_maps(fastvit.create_model("t2t_vit_7", img_size=32, depth=0), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"layers must index the 2 attention layers \(-2\.\.1\), got 5"):
        viz.attention_maps(model, torch.randn(1, 3, 32, 32), layers=5)
    with pytest.raises(ValueError, match="heads must index"):
        viz.attention_maps(model, torch.randn(1, 3, 32, 32), heads=[3])
    with pytest.raises(ValueError, match="differs from img_size"):
        viz.attention_maps(model, torch.randn(1, 3, 48, 48))
    timm_model = fastvit.optimize(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)) and None
    with pytest.raises(ValueError, match="images must be a tensor"):
        viz.attention_maps(model, torch.randn(32, 32))
    plain = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="after fastvit.optimize"):
        viz.attention_maps(plain, torch.randn(1, 3, 32, 32))
    fastvit.optimize(plain)
    with pytest.raises(ValueError, match="cannot take them"):
        viz.attention_maps(plain, torch.randn(1, 3, 48, 48))
    assert timm_model is None
    with pytest.raises(ValueError, match="hybrid"):
        viz.plot_patch_embed_filters(fastvit.create_model("vit_tiny_r_s16_p8_224", img_size=64, depth=1))


def test_cli_end_to_end(tmp_path, capsys):
    from fastvit.train import main as train_main

    run = tmp_path / "run"
    assert train_main(["--output", str(run), "--no-progress", "--epochs", "1", "--train-steps", "2", "--val-steps", "1",
                       "--img-size", "16"]) == 0
    for args in (
        ["attention", "--model", str(run / "best.pt")],
        ["attention", "--model", str(run / "best.pt"), "--layer", "-2", "--head-fusion", "mean"],
        ["pos-embed", "--model", str(run / "best.pt")],
        ["filters", "--model", str(run / "best.pt"), "--components", "6"],
        ["attention", "--model", "vit_tiny_patch16_224", "--img-size", "32"],
    ):
        out = tmp_path / f"{args[0]}-{len(args)}.png"
        assert viz_main([*args, "--out", str(out), "--dpi", "40"]) == 0, capsys.readouterr().err
        assert Image.open(out).size[0] > 0
    Image.new("RGB", (40, 30), "white").save(tmp_path / "white.png")
    assert viz_main(["attention", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--image",
                     str(tmp_path / "white.png"), "--out", str(tmp_path / "w.png")]) == 0
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    for args, message in (
        (["attention", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--image", str(bad)], "not a readable image"),
        (["attention", "--model", "vit_nope"], "unknown model name"),
        (["attention", "--model", str(tmp_path / "missing.pt")], "no such checkpoint"),
        (["attention", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--layer", "12"], "--layer must index"),
        (["filters", "--model", "t2t_vit_7"], "no patch-embedding filters"),
        (["filters", "--model", "vit_tiny_patch16_224", "--out", str(tmp_path / "noext")], "ending in .png"),
    ):
        capsys.readouterr()
        assert viz_main(args if "--out" in args else [*args, "--out", str(tmp_path / "x.png")]) == 2
        assert message in capsys.readouterr().err
