"""Models: timm / vit-pytorch / official T2T-ViT parity, state_dict keys both ways, checkpoints, training."""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import checkpoint_filter_fn

import fastvit
from fastvit.models import (
    CheckpointError,
    SimpleViT,
    T2TViT,
    ViT,
    VisionTransformer,
    create_model,
    list_models,
    load_checkpoint,
    resample_pos_embed,
)
from fastvit.models._pos_embed import get_sinusoid_encoding

RTOL = 1e-4


@pytest.fixture
def vit_pytorch():
    """vit-pytorch, installed by the test extra; the GPU machine's stack lacks it (and has no network)."""
    return pytest.importorskip("vit_pytorch")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """max |actual - expected| <= RTOL * max |expected| (float32)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3g} > {RTOL} * max |expected| {scale:.3g}"


@torch.no_grad()
def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every parameter (LayerNorm weights included) so that swapped roles cannot pass."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * (0.3 if p.dim() < 2 else 0.02))
    return model


def norm_eps(model: torch.nn.Module) -> dict[str, float]:
    return {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}


def activations(model: torch.nn.Module) -> list[str]:
    """Each MLP's activation, by the fused op's names (timm: its act module; fastvit: Mlp.activation)."""
    names = {"GELU": "gelu", "GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu"}
    out = []
    for m in model.modules():
        if hasattr(m, "fc1") and hasattr(m, "fc2"):
            act = getattr(m, "act", None)
            if act is None:
                out.append(m.activation)
            elif type(act).__name__ == "GELU" and getattr(act, "approximate", "none") == "tanh":
                out.append("gelu_tanh")
            else:
                out.append(names[type(act).__name__])
    return out


def drop_rates(model: torch.nn.Module) -> dict[str, float]:
    """Every dropout / drop-path rate by a name common to timm and fastvit (timm's mlp.drop1 = mlp.drop)."""
    out = {}
    for n, m in model.named_modules():
        leaf = n.rsplit(".", 1)[-1]
        if leaf.startswith("drop_path"):
            out[n] = float(getattr(m, "drop_prob", getattr(m, "p", 0.0)))
        elif isinstance(m, torch.nn.Dropout) and leaf != "drop2":
            out[n.replace("mlp.drop1", "mlp.drop")] = m.p
    return out


def image(batch: int, size, chans: int = 3) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    return torch.randn(batch, chans, h, w)


# ---------------------------------------------------------------------------------------------- timm


TIMM_CASES = [
    ("vit_tiny_patch16_224", dict(img_size=32)),
    ("vit_small_patch16_224", dict(img_size=48, depth=2, global_pool="avg")),
    ("vit_medium_patch16_gap_256", dict(img_size=32, depth=2)),
    ("deit3_small_patch16_224", dict(img_size=32, depth=2)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, reg_tokens=2, pre_norm=True, global_pool="avgmax", fc_norm=False)),
    ("vit_tiny_patch16_224", dict(img_size=(32, 48), depth=2, pos_embed="none", class_token=False, global_pool="max")),
    ("vit_tiny_patch16_224", dict(
        img_size=32, depth=2, reg_tokens=1, class_token=False, no_embed_class=True, global_pool="avg", pool_include_prefix=True,
    )),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, num_classes=0)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, qk_norm=True, init_values=1e-3)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, proj_bias=False, qkv_bias=False)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, fc_norm=True, final_norm=True, global_pool="token", init_values=0.1)),
    ("vit_base_patch16_224_miil", dict(
        img_size=32, depth=2, num_classes=7, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1,
        drop_path_rate=0.1,
    )),
    ("vit_tiny_patch16_224", dict(img_size=40, depth=2)),  # not a multiple of the patch: floor grid, as timm
    # the families people fine-tune, at depth 2 and a small image
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=2)),
    ("vit_small_patch14_dinov2", dict(img_size=28, depth=2)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2)),
    ("vit_base_patch16_clip_224", dict(img_size=32, depth=2)),
    ("vit_base_patch32_clip_quickgelu_224", dict(img_size=64, depth=2)),
    ("vit_base_patch16_siglip_224", dict(img_size=32, depth=2)),
    ("vit_base_patch32_siglip_256", dict(img_size=64, depth=2)),
    ("vit_so400m_patch14_siglip_384", dict(img_size=44, depth=2)),  # head dim 72, 44 px at patch 14
    ("vit_base_patch16_siglip_gap_224", dict(img_size=32, depth=2)),
    ("vit_tiny_r_s16_p8_224", dict(img_size=64, depth=2)),
    ("vit_tiny_patch16_224", dict(img_size=40, depth=2, dynamic_img_size=True, dynamic_img_pad=True)),
    # the attention-pool head after a class token and registers: it reads the patch tokens only
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, global_pool="map", reg_tokens=2)),
    ("vit_tiny_patch16_224", dict(img_size=32, depth=2, global_pool="map", pool_include_prefix=True)),
]


@pytest.mark.parametrize("name,kwargs", TIMM_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(TIMM_CASES)])
def test_timm_state_dict_loads_strict_and_matches(name, kwargs):
    ref = randomize(timm.create_model(name, pretrained=False, **kwargs)).eval()
    model = create_model(name, **kwargs).eval()
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].shape == ref_sd[k].shape for k in sd)
    model.load_state_dict(ref_sd, strict=True)
    assert norm_eps(model) == norm_eps(ref)
    assert drop_rates(model) == drop_rates(ref)
    x = image(2, ref.patch_embed.img_size)
    with torch.no_grad():
        feats, ref_feats = model.forward_features(x), ref.forward_features(x)
        assert_close(feats, ref_feats, "forward_features")
        assert_close(model.forward_head(feats, pre_logits=True), ref.forward_head(ref_feats, pre_logits=True), "pre_logits")
        assert_close(model(x), ref(x), "logits")


def test_qk_norm_and_no_proj_bias_on_triton_match_timm():
    """qk_norm (a LayerNorm over each head's q and k, then ops.attention) and proj_bias=False (no bias
    on attn.proj, mlp.fc1, mlp.fc2) on the Triton backend, against timm."""
    model = triton_matches_timm("vit_tiny_patch16_224", dict(img_size=32, depth=2, qk_norm=True, proj_bias=False))
    assert "blocks.0.attn.q_norm.weight" in model.state_dict() and "blocks.0.mlp.fc1.bias" not in model.state_dict()


def triton_matches_timm(name: str, kwargs: dict) -> torch.nn.Module:
    """fastvit's ``name`` on the Triton backend against timm's with the same (perturbed) weights: logits
    and every parameter's gradient. Returns fastvit's model."""
    ref = randomize(timm.create_model(name, **kwargs)).eval()
    model = create_model(name, **kwargs).eval()
    model.load_state_dict(ref.state_dict())
    x = image(2, kwargs["img_size"])
    with fastvit.use_backend("triton"):
        out = model(x)
        out.square().sum().backward()
    expected = ref(x)
    expected.square().sum().backward()
    assert_close(out, expected, "logits on triton")
    ref_grads = dict(ref.named_parameters())
    largest = max(g.grad.abs().max().item() for g in ref_grads.values())
    for n, p in model.named_parameters():
        if n.endswith("k_norm.bias"):
            # A bias on every key shifts each query's scores by one constant, which softmax ignores: its
            # gradient is exactly 0, and both sides hold rounding noise. Judge it against the other grads.
            assert p.grad.abs().max().item() <= RTOL * largest, n
            continue
        assert_close(p.grad, ref_grads[n].grad, f"grad of {n} on triton")
    return model


FAMILY_CASES = [
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, embed_dim=64, num_heads=2)),
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, embed_dim=96, num_heads=2)),  # head dim 48
    ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32, embed_dim=64, num_heads=4)),
    ("vit_base_patch32_siglip_256", dict(img_size=64, embed_dim=64, num_heads=2)),  # map head, tanh GELU
    ("vit_so400m_patch14_siglip_224", dict(img_size=28, embed_dim=144, num_heads=2, mlp_ratio=2.0)),  # head dim 72
]


@pytest.mark.parametrize("name,kwargs", FAMILY_CASES, ids=[n for n, _ in FAMILY_CASES])
def test_families_on_triton_match_timm(name, kwargs):
    """Each family's fastvit model on the Triton backend (the interpreter here): logits and every
    parameter's gradient against timm's model with the same weights."""
    triton_matches_timm(name, dict(kwargs, depth=2))


INTERMEDIATE_CASES = [
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=4)),
    ("deit_tiny_distilled_patch16_224", dict(img_size=(32, 48), depth=3)),
    ("vit_base_patch16_siglip_224", dict(img_size=32, depth=3, embed_dim=64, num_heads=2)),
    ("vit_tiny_patch16_224", dict(img_size=40, depth=3, dynamic_img_size=True, dynamic_img_pad=True)),
]


@pytest.mark.parametrize("name,kwargs", INTERMEDIATE_CASES, ids=[n for n, _ in INTERMEDIATE_CASES])
def test_forward_intermediates_match_timm(name, kwargs):
    ref = randomize(timm.create_model(name, **kwargs)).eval()
    model = create_model(name, **kwargs).eval()
    model.load_state_dict(ref.state_dict())
    x = image(2, (40, 56) if kwargs.get("dynamic_img_pad") else kwargs["img_size"])
    options = [
        dict(), dict(indices=2, norm=True), dict(indices=[0, -1], output_fmt="NLC", return_prefix_tokens=True),
        dict(indices=[1], stop_early=True, intermediates_only=True), dict(indices=[0, 1], output_dict=True),
        dict(indices=1, output_dict=True, return_prefix_tokens=True, intermediates_only=True, output_fmt="NLC"),
    ]
    with torch.no_grad():
        for opts in options:
            out, expected = model.forward_intermediates(x, **opts), ref.forward_intermediates(x, **opts)
            flat, flat_ref = torch.utils._pytree.tree_flatten(out), torch.utils._pytree.tree_flatten(expected)
            assert flat[1] == flat_ref[1], f"{opts}: structure {flat[1]} vs {flat_ref[1]}"
            for i, (a, b) in enumerate(zip(flat[0], flat_ref[0])):
                assert_close(a, b, f"forward_intermediates({opts}) leaf {i}")
        for a, b in zip(model.get_intermediate_layers(x, 2, reshape=True), ref.get_intermediate_layers(x, 2, reshape=True)):
            assert_close(a, b, "get_intermediate_layers")


@pytest.mark.parametrize("out_indices", [(1, 3), 2, None])
def test_features_only_matches_timm(out_indices):
    name, kwargs = "vit_small_patch14_dinov2", dict(img_size=28, depth=4)
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    ref = randomize(timm.create_model(name, features_only=True, **kwargs)).eval()
    model = create_model(name, features_only=True, **kwargs).eval()
    model.load_state_dict(ref.state_dict())  # same keys (model.*): the same blocks pruned
    assert model.feature_info.channels() == ref.feature_info.channels()
    assert model.feature_info.reduction() == ref.feature_info.reduction()
    assert model.feature_info.module_name() == ref.feature_info.module_name()
    assert model.pretrained_cfg["architecture"] == name
    x = image(2, 28)
    with torch.no_grad():
        out, expected = model(x), ref(x)
    assert len(out) == len(expected)
    for a, b in zip(out, expected):
        assert_close(a, b, "features")


def test_feature_getter_options_match_timm():
    from timm.models._features import FeatureGetterNet as TimmGetter

    from fastvit.models.features import FeatureGetterNet

    ref = randomize(timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=4)).eval()
    model = create_model("vit_small_patch14_reg4_dinov2", img_size=28, depth=4).eval()
    model.load_state_dict(ref.state_dict())
    ref, model = TimmGetter(ref, [0, 2], output_fmt="NLC", norm=True), FeatureGetterNet(model, [0, 2], "NLC", norm=True)
    assert list(model.state_dict()) == list(ref.state_dict())
    x = image(2, 28)
    with torch.no_grad():
        for a, b in zip(model(x), ref(x)):
            assert_close(a, b, "normed NLC features")


def test_prune_intermediate_layers_like_timm():
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4)
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=4)
    assert model.prune_intermediate_layers([0, -2]) == ref.prune_intermediate_layers([0, -2]) == [0, 2]
    assert list(model.state_dict()) == list(ref.state_dict())
    tokens = torch.randn(1, 5, 192)
    assert model.num_classes == 0 and model.global_pool == ref.global_pool == ""
    assert torch.equal(model.forward_head(tokens), ref.forward_head(tokens))  # no head, no pooling: the tokens


@pytest.mark.parametrize("backend", ["eager", "triton"])
def test_grad_checkpointing_same_gradients(backend):
    """set_grad_checkpointing recomputes each block in the backward: the same logits and gradients,
    with dropout and drop-path masks replayed from the saved RNG state."""
    kwargs = dict(img_size=32, depth=3, num_classes=5, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
    plain = create_model("vit_tiny_patch16_224", **kwargs).train()
    ckpt = create_model("vit_tiny_patch16_224", **kwargs).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing()
    x = image(2, 32)
    with fastvit.use_backend(backend):
        torch.manual_seed(3)
        expected = plain(x)
        torch.manual_seed(3)
        out = ckpt(x)
        assert torch.equal(out, expected)
        expected.square().sum().backward()
        out.square().sum().backward()
    grads = dict(plain.named_parameters())
    for n, p in ckpt.named_parameters():
        assert torch.allclose(p.grad, grads[n].grad, rtol=1e-5, atol=1e-7), n


def test_distilled_training_returns_both_heads():
    kwargs = dict(img_size=32, depth=2, num_classes=6)
    ref = randomize(timm.create_model("deit_tiny_distilled_patch16_224", **kwargs))
    model = create_model("deit_tiny_distilled_patch16_224", **kwargs)
    model.load_state_dict(ref.state_dict())
    x = image(2, 32)
    for m in (ref, model):
        m.set_distilled_training(True)
        m.train()
    out, expected = model(x), ref(x)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, expected):
        assert_close(a, b, "distilled training heads")
    model.eval()
    assert model(x).shape == (2, 6)  # eval: the mean of both heads
    assert model.get_classifier() == (model.head, model.head_dist)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.head_dist.out_features == 3
    with pytest.raises(ValueError, match="distillation"):
        model.reset_classifier(3, "avg")


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2", "deit_tiny_distilled_patch16_224"])
def test_checkpoint_position_table_resampled_like_timm(tmp_path, name):
    """A checkpoint trained at one size (DINOv2's 518 px, here 56) loaded at another: the position table
    is resampled as timm's own pretrained loading does (registers and distillation token kept apart)."""
    kwargs = dict(depth=2, num_classes=0)
    big = 56 if "dinov2" in name else 64
    path = tmp_path / "w.pth"
    torch.save(randomize(timm.create_model(name, img_size=big, **kwargs)).state_dict(), path)
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), img_size=28 if big == 56 else 32,
                            **kwargs).eval()
    model = create_model(name, pretrained=True, checkpoint_path=path, img_size=ref.patch_embed.img_size, **kwargs).eval()
    assert_close(model.pos_embed, ref.pos_embed, "resampled pos_embed")
    x = image(2, ref.patch_embed.img_size)
    with torch.no_grad():
        assert_close(model(x), ref(x), "features at the new size")


def test_review_findings_against_timm():
    """Cases a review found: CLIP's norm_pre keeps the residual stream fp32 under autocast (as timm), the
    distilled DeiT keeps fix_init, a fixed-size model with dynamic_img_pad still checks the size, errors
    name out_indices, is_causal=True is refused, a pruned T2T-ViT returns tokens."""
    kwargs = dict(img_size=32, depth=2)
    ref = randomize(timm.create_model("vit_base_patch16_clip_224", **kwargs)).eval()
    model = create_model("vit_base_patch16_clip_224", **kwargs).eval()
    model.load_state_dict(ref.state_dict())
    x = image(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ours = model.forward_intermediates(x, intermediates_only=True)
        theirs = ref.forward_intermediates(x, intermediates_only=True)
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [torch.float32] * 2

    distilled = create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=4, fix_init=True)
    stds = [blk.attn.proj.weight.std().item() for blk in distilled.blocks]
    assert 1.6 < stds[0] / stds[3] < 2.5  # fix_init divides block i by sqrt(2 (i + 1)): 2x between 0 and 3

    padded = create_model("vit_tiny_patch16_224", img_size=32, depth=1, dynamic_img_pad=True)
    with pytest.raises(ValueError, match=r"image size \(27, 30\)"):
        padded(image(1, (27, 30)))
    with pytest.raises(ValueError, match="out_indices must be block indices"):
        create_model("vit_tiny_patch16_224", img_size=32, depth=2, features_only=True, out_indices=(5,))
    with pytest.raises(ValueError, match="is_causal"):
        padded.forward_features(image(1, 32), is_causal=True)
    t2t = create_model("t2t_vit_7", img_size=32, depth=3)
    t2t.prune_intermediate_layers(2)
    assert t2t.forward_head(torch.randn(1, 5, 256)).shape == (1, 5, 256)


def test_t2t_vit_feature_api():
    """T2T-ViT has the same feature API: the last block's normed output is forward_features' patch tokens."""
    model = create_model("t2t_vit_7", img_size=32, num_classes=0).eval()
    assert model.pretrained_cfg["input_size"] == (3, 224, 224) and model.pretrained_cfg["mean"][0] == 0.485
    x = image(2, 32)
    with torch.no_grad():
        final, (last,) = model.forward_intermediates(x, indices=1, norm=True)
        assert_close(final, model.forward_features(x), "final tokens")
        assert last.shape == (2, 256, 2, 2)
        assert_close(last.flatten(2).transpose(1, 2), final[:, 1:], "last block, NCHW")
    features = create_model("t2t_vit_7", img_size=32, features_only=True, out_indices=(1, 3))
    assert len(features.model.blocks) == 4 and features.feature_info.reduction() == [16, 16]
    assert [tuple(f.shape) for f in features(x)] == [(2, 256, 2, 2)] * 2


def test_timm_training_mode_same_seed_same_logits_and_grads():
    """Dropout, drop path and head dropout draw from torch's RNG in timm's order (eager backend)."""
    kwargs = dict(img_size=32, depth=2, num_classes=7, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", **kwargs)).train()
    model = create_model("vit_tiny_patch16_224", **kwargs).train()
    model.load_state_dict(ref.state_dict())
    x = image(4, 32)
    with fastvit.use_backend("eager"):
        torch.manual_seed(1)
        expected = ref(x)
        torch.manual_seed(1)
        out = model(x)
        assert_close(out, expected, "training-mode logits")
        assert not torch.equal(out, model.eval()(x)), "dropout must be active in training mode"
        expected.square().sum().backward()
        out.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n].grad, f"grad of {n}")


def test_timm_dynamic_img_size_resamples_like_timm():
    kwargs = dict(img_size=32, depth=2, dynamic_img_size=True)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", **kwargs)).eval()
    model = create_model("vit_tiny_patch16_224", **kwargs).eval()
    model.load_state_dict(ref.state_dict())
    x = image(2, (48, 64))
    with torch.no_grad():
        assert_close(model(x), ref(x), "logits at 48x64")
    fixed = create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    with pytest.raises(ValueError, match="dynamic_img_size"):
        fixed(x)


def test_reset_classifier_and_global_pool():
    ref = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1)).eval()
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=1).eval()
    model.load_state_dict(ref.state_dict())
    for m in (ref, model):
        m.reset_classifier(5, global_pool="avg")
    model.head.load_state_dict(ref.head.state_dict())
    x = image(3, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 5)
        assert_close(out, ref(x), "logits after reset_classifier(5, 'avg')")
        model.reset_classifier(0)
        assert model(x).shape == (3, 192)
    with pytest.raises(ValueError, match="global_pool"):
        create_model("vit_tiny_patch16_224", img_size=32, depth=1, class_token=False, global_pool="token")


def test_sincos_position_embedding(vit_pytorch):
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=1, pos_embed="sincos")
    assert "pos_embed" not in model.state_dict()
    table = model.pos_embed[0]
    assert table.shape == (5, 192)
    assert torch.equal(table[0], torch.zeros(192))
    assert torch.allclose(table[1:], vit_pytorch.simple_vit.posemb_sincos_2d(2, 2, 192))
    assert model(image(1, 32)).shape == (1, 1000)


def test_param_counts():
    with torch.device("meta"):
        assert sum(p.numel() for p in create_model("vit_base_patch16_224").parameters()) == 86_567_656
    assert {"vit_base_patch16_224", "deit3_small_patch16_224", "t2t_vit_14", "t2t_vit_24"} <= set(list_models())


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("t2t_")])
def test_registry_matches_timm(name):
    """Every timm name: same defaults (num_classes, img_size, pooling), state_dict keys and shapes."""
    ref = timm.create_model(name, device="meta", weight_init="skip")
    with torch.device("meta"):
        model = create_model(name, weight_init="skip")
    ref_sd, sd = ref.state_dict(), model.state_dict()
    assert list(sd) == list(ref_sd)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in ref_sd.items()}
    assert (model.num_classes, model.patch_embed.img_size, model.global_pool, model.no_embed_class) == (
        ref.num_classes, ref.patch_embed.img_size, ref.global_pool, ref.no_embed_class)
    assert norm_eps(model) == norm_eps(ref)
    assert activations(model) == activations(ref)
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std", "num_classes", "first_conv", "classifier")
    assert {k: model.pretrained_cfg[k] for k in keys} == {k: ref.pretrained_cfg[k] for k in keys}
    assert timm.data.resolve_data_config(model=model) == timm.data.resolve_data_config(model=ref)


# --------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module", "safetensors"])
def test_create_model_loads_timm_checkpoint(tmp_path, wrap):
    kwargs = dict(img_size=32, depth=2, num_classes=10)
    ref = randomize(timm.create_model("vit_tiny_patch16_224", **kwargs)).eval()
    sd = ref.state_dict()
    path = tmp_path / ("w.safetensors" if wrap == "safetensors" else "w.pth")
    if wrap == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        obj = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd, "arch": "vit"}}.get(wrap)
        torch.save(obj if obj is not None else {f"module.{k}": v for k, v in sd.items()}, path)
    model = create_model("vit_tiny_patch16_224", pretrained=True, checkpoint_path=path, img_size=32, depth=2).eval()
    assert model.num_classes == 10
    x = image(2, 32)
    with torch.no_grad():
        assert_close(model(x), ref(x), "logits")


def test_checkpoint_resampled_to_another_img_size(tmp_path):
    ref32 = randomize(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2)).eval()
    torch.save(ref32.state_dict(), tmp_path / "w.pth")
    ref48 = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2).eval()
    ref48.load_state_dict(checkpoint_filter_fn(ref32.state_dict(), ref48))
    model = create_model("vit_tiny_patch16_224", pretrained=True, checkpoint_path=tmp_path / "w.pth", img_size=48, depth=2).eval()
    x = image(2, 48)
    with torch.no_grad():
        assert_close(model(x), ref48(x), "logits at 48 from a 32 checkpoint")
    timm48 = timm.create_model("vit_tiny_patch16_224", img_size=48, depth=2).eval()
    load_checkpoint(timm48, {"model": model.state_dict()})
    assert torch.equal(timm48.pos_embed, ref48.pos_embed), "convert serves timm's own models too (optimize / load_checkpoint)"


def test_pretrained_with_another_num_classes_keeps_fresh_head(tmp_path):
    src = randomize(create_model("vit_tiny_patch16_224", img_size=32, depth=1))
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model(
        "vit_tiny_patch16_224", pretrained=True, checkpoint_path=tmp_path / "w.pth", img_size=32, depth=1, num_classes=3
    )
    assert model.head.weight.shape == (3, 192)
    assert torch.equal(model.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="head.weight"):
        create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "w.pth", img_size=32, depth=1, num_classes=3)


def test_resample_pos_embed_matches_timm():
    pe = torch.randn(1, 1 + 4 * 6, 16)
    for new in ((4, 6), (8, 3), (2, 2)):
        ours = resample_pos_embed(pe, new, old_size=(4, 6), num_prefix_tokens=1)
        assert torch.equal(ours, resample_abs_pos_embed(pe, list(new), old_size=[4, 6], num_prefix_tokens=1))
    assert resample_pos_embed(pe[0], (8, 3), (4, 6)).shape == (25, 16)


def test_checkpoint_errors_list_keys(tmp_path):
    model = create_model("vit_tiny_patch16_224", img_size=32, depth=1)
    sd = model.state_dict()
    sd.pop("blocks.0.attn.qkv.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["head.weight"] = torch.zeros(7, 192)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(model, sd)
    msg = str(e.value)
    assert "missing keys (1): blocks.0.attn.qkv.bias" in msg
    assert "unexpected keys (1): blocks.0.extra.weight" in msg
    assert "head.weight (7, 192) vs model (1000, 192)" in msg
    vp = ViT(image_size=32, patch_size=16, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64)
    with pytest.raises(CheckpointError, match="vit_pytorch"):
        load_checkpoint(model, vp.state_dict())
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        create_model("vit_tiny_patch16_224", checkpoint_path=tmp_path / "missing.pth")


def test_clear_argument_errors():
    with pytest.raises(ValueError, match="checkpoint_path.*network|network.*checkpoint_path"):
        create_model("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(ValueError, match="img_size .* multiple of 16"):
        create_model("t2t_vit_7", img_size=40)
    with pytest.raises(ValueError, match="image_size"):
        ViT(image_size=30, patch_size=8, num_classes=2, dim=32, depth=1, heads=2, mlp_dim=64)
    with pytest.raises(ValueError, match="unknown model name"):
        create_model("vit_nonexistent_patch3")
    with pytest.raises(ValueError, match="act_layer"):
        create_model("vit_tiny_patch16_224", img_size=32, act_layer="silu")
    with pytest.raises(ValueError, match="global_pool='map'"):
        create_model("vit_tiny_patch16_224", img_size=32).reset_classifier(10, "map")
    with pytest.raises(ValueError, match="indices"):
        create_model("vit_tiny_patch16_224", img_size=32, depth=2).forward_intermediates(image(1, 32), indices=[2])
    with pytest.raises(ValueError, match="output_fmt"):
        create_model("vit_tiny_patch16_224", img_size=32, depth=2).forward_intermediates(image(1, 32), output_fmt="NHWC")
    with pytest.raises(ValueError, match="img_size"):
        create_model("vit_tiny_patch16_224", img_size=32, depth=1)(image(1, 48))


# ---------------------------------------------------------------------------------------- vit-pytorch


VIT_CASES = [
    dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16),
    dict(image_size=(32, 48), patch_size=(8, 16), num_classes=10, dim=64, depth=2, heads=3, mlp_dim=96, pool="mean",
         channels=2, dim_head=24, dropout=0.1, emb_dropout=0.1),
    dict(image_size=32, patch_size=8, num_classes=0, dim=32, depth=2, heads=1, mlp_dim=64, dim_head=32),
]


def _roundtrip(ref_cls, our_cls, kwargs):
    ref, ours = ref_cls(**kwargs).eval(), our_cls(**kwargs).eval()
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert all(our_sd[k].shape == ref_sd[k].shape for k in ref_sd)
    assert norm_eps(ours) == norm_eps(ref)
    assert dropouts(ours) == dropouts(ref)
    x = image(2, kwargs["image_size"], kwargs.get("channels", 3))
    with torch.no_grad():
        randomize(ref)
        ours.load_state_dict(ref.state_dict(), strict=True)
        assert_close(ours(x), ref(x), "vit-pytorch -> fastvit")
        randomize(ours)
        ref.load_state_dict(ours.state_dict(), strict=True)
        assert_close(ours(x), ref(x), "fastvit -> vit-pytorch")


def dropouts(model: torch.nn.Module) -> dict[str, float]:
    return {n: m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}


@pytest.mark.parametrize("kwargs", VIT_CASES, ids=["cls", "mean-rect-dropout", "features-identity-out"])
def test_vit_pytorch_vit_both_ways(vit_pytorch, kwargs):
    _roundtrip(vit_pytorch.ViT, ViT, kwargs)


def test_vit_pytorch_training_mode_same_seed_same_logits_and_grads(vit_pytorch):
    kwargs = dict(
        image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16, dropout=0.1, emb_dropout=0.1
    )
    ref = randomize(vit_pytorch.ViT(**kwargs)).train()
    model = ViT(**kwargs).train()
    model.load_state_dict(ref.state_dict())
    x = image(4, 32)
    with fastvit.use_backend("eager"):
        torch.manual_seed(1)
        expected = ref(x)
        torch.manual_seed(1)
        out = model(x)
        assert_close(out, expected, "training-mode logits")
        expected.square().sum().backward()
        out.square().sum().backward()
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, ref_grads[n].grad, f"grad of {n}")


def test_vit_pytorch_simple_vit_both_ways(vit_pytorch):
    kwargs = dict(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16)
    _roundtrip(vit_pytorch.SimpleViT, SimpleViT, kwargs)
    model = SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=4, mlp_dim=128)
    assert "pos_embedding" not in model.state_dict()


def test_vit_pytorch_old_3d_checkpoint_and_resampling():
    kwargs = dict(patch_size=8, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64, dim_head=16)
    src = randomize(ViT(image_size=32, **kwargs)).eval()
    old = {k: (v[None] if k in ("cls_token", "pos_embedding") else v) for k, v in src.state_dict().items()}
    model = ViT(image_size=32, **kwargs).eval()
    load_checkpoint(model, {"state_dict": old})
    x = image(2, 32)
    with torch.no_grad():
        assert_close(model(x), src(x), "logits from a 3-D cls/pos checkpoint")
    big = ViT(image_size=48, **kwargs)
    load_checkpoint(big, src.state_dict())
    expected = resample_pos_embed(src.pos_embedding.detach(), (6, 6), (4, 4), num_prefix_tokens=1)
    assert torch.equal(big.pos_embedding.detach(), expected)


# ------------------------------------------------------------------------------------------ T2T-ViT


@pytest.fixture(scope="module")
def t2t_vit_14():
    torch.manual_seed(0)
    return create_model("t2t_vit_14").eval()


def test_t2t_vit_14_params_and_official_keys(t2t_vit_14):
    params = list(t2t_vit_14.parameters())
    assert sum(p.numel() for p in params) == 21_545_550
    assert abs(sum(p.numel() for p in params if p.requires_grad) - 21.5e6) < 0.05e6
    sd = t2t_vit_14.state_dict()
    expected = {
        "cls_token": (1, 1, 384), "pos_embed": (1, 197, 384),
        "tokens_to_token.attention1.w": (32, 64), "tokens_to_token.attention1.kqv.weight": (192, 147),
        "tokens_to_token.attention1.kqv.bias": (192,), "tokens_to_token.attention1.proj.weight": (64, 64),
        "tokens_to_token.attention1.norm1.weight": (147,), "tokens_to_token.attention1.norm2.weight": (64,),
        "tokens_to_token.attention1.mlp.0.weight": (64, 64), "tokens_to_token.attention1.mlp.2.weight": (64, 64),
        "tokens_to_token.attention2.kqv.weight": (192, 576), "tokens_to_token.attention2.norm1.bias": (576,),
        "tokens_to_token.project.weight": (384, 576), "tokens_to_token.project.bias": (384,),
        "blocks.0.norm1.weight": (384,), "blocks.0.attn.qkv.weight": (1152, 384), "blocks.0.attn.proj.weight": (384, 384),
        "blocks.0.attn.proj.bias": (384,), "blocks.0.norm2.bias": (384,), "blocks.0.mlp.fc1.weight": (1152, 384),
        "blocks.0.mlp.fc1.bias": (1152,), "blocks.13.mlp.fc2.weight": (384, 1152), "norm.weight": (384,),
        "head.weight": (1000, 384), "head.bias": (1000,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    per_performer = ["w", "kqv.weight", "kqv.bias", "proj.weight", "proj.bias", "norm1.weight", "norm1.bias",
                     "norm2.weight", "norm2.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"]
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.proj.weight", "attn.proj.bias", "norm2.weight",
                 "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    official = (
        ["cls_token", "pos_embed"]
        + [f"tokens_to_token.attention{i}.{k}" for i in (1, 2) for k in per_performer]
        + ["tokens_to_token.project.weight", "tokens_to_token.project.bias"]
        + [f"blocks.{i}.{k}" for i in range(14) for k in per_block]
        + ["norm.weight", "norm.bias", "head.weight", "head.bias"]
    )
    assert list(sd) == official
    assert not t2t_vit_14.pos_embed.requires_grad
    assert not t2t_vit_14.tokens_to_token.attention1.w.requires_grad
    assert torch.equal(t2t_vit_14.pos_embed, get_sinusoid_encoding(197, 384))
    assert set(norm_eps(t2t_vit_14).values()) == {1e-5}
    performer = t2t_vit_14.tokens_to_token.attention1
    assert (performer.dp.p, performer.mlp[3].p, performer.m, performer.epsilon) == (0.1, 0.1, 32, 1e-8)
    assert t2t_vit_14.blocks[0].attn.scale == 64**-0.5


def test_t2t_token_counts(t2t_vit_14):
    """3136 and 784 tokens through the two Token_performers (soft split + norm1 fused), 196 after soft_split2."""
    shapes = {}
    t2t = t2t_vit_14.tokens_to_token
    mods = {"attention1": t2t.attention1, "attention2": t2t.attention2, "soft_split2": t2t.soft_split2}
    hooks = [m.register_forward_hook(lambda m, a, out, k=k: shapes.__setitem__(k, out.shape)) for k, m in mods.items()]
    try:
        with torch.no_grad():
            feats = t2t_vit_14.forward_features(image(1, 224))
    finally:
        for h in hooks:
            h.remove()
    assert shapes == {"attention1": (1, 3136, 64), "attention2": (1, 784, 64), "soft_split2": (1, 196, 576)}
    assert feats.shape == (1, 197, 384)


def test_sinusoid_table_formula():
    table = get_sinusoid_encoding(50, 16)[0].double()
    p, i = torch.arange(50.0)[:, None].double(), torch.arange(8.0).double()
    angle = p / 10000 ** (2 * i / 16)
    assert torch.allclose(table[:, 0::2], angle.sin(), atol=1e-6)
    assert torch.allclose(table[:, 1::2], angle.cos(), atol=1e-6)


def official_t2t_forward(sd: dict, x: torch.Tensor, num_heads: int, qk_scale: float | None = None) -> torch.Tensor:
    """T2T-ViT's forward written from the paper / official structure over the official keys, in plain torch."""

    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def lin(t, name):
        return F.linear(t, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    def performer(t, name):
        t = ln(t, f"{name}.norm1")
        w = sd[f"{name}.w"]
        k, q, v = lin(t, f"{name}.kqv").split(w.shape[1], dim=-1)

        def phi(u):
            return torch.exp(u @ w.T - (u * u).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

        kp, qp = phi(k), phi(q)
        y = (qp @ (kp.transpose(1, 2) @ v)) / (qp @ kp.sum(1).unsqueeze(-1) + 1e-8)
        t = v + lin(y, f"{name}.proj")
        return t + lin(F.gelu(lin(ln(t, f"{name}.norm2"), f"{name}.mlp.0")), f"{name}.mlp.2")

    def fold(t):
        side = math.isqrt(t.shape[1])
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)

    B = x.shape[0]
    t = performer(F.unfold(x, 7, stride=4, padding=2).transpose(1, 2), "tokens_to_token.attention1")
    t = performer(F.unfold(fold(t), 3, stride=2, padding=1).transpose(1, 2), "tokens_to_token.attention2")
    t = lin(F.unfold(fold(t), 3, stride=2, padding=1).transpose(1, 2), "tokens_to_token.project")
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1) + sd["pos_embed"]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        N, C = t.shape[1:]
        qkv = lin(ln(t, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv").reshape(B, N, 3, num_heads, C // num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scale = qk_scale or (C // num_heads) ** -0.5
        a = ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
        t = t + lin(a.transpose(1, 2).reshape(B, N, C), f"blocks.{i}.attn.proj")
        t = t + lin(F.gelu(lin(ln(t, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")
    return lin(ln(t, "norm")[:, 0], "head")


@pytest.mark.parametrize("qk_scale", [None, 64**-0.5])
def test_t2t_matches_official_structure(qk_scale):
    model = T2TViT(img_size=32, num_classes=10, embed_dim=64, depth=2, num_heads=2, mlp_ratio=3.0, token_dim=16, qk_scale=qk_scale)
    randomize(model).eval()
    x = image(2, 32)
    with torch.no_grad():
        expected = official_t2t_forward({k: v.clone() for k, v in model.state_dict().items()}, x, num_heads=2, qk_scale=qk_scale)
        assert_close(model(x), expected, "T2T-ViT logits")


def test_t2t_dropout_rates_as_official():
    model = T2TViT(
        img_size=32, num_classes=4, embed_dim=64, depth=3, num_heads=4, token_dim=16, drop_rate=0.1, attn_drop_rate=0.2,
        drop_path_rate=0.3,
    )
    rates = drop_rates(model)
    assert rates["pos_drop"] == 0.1
    for i, dp in enumerate((0.0, 0.15, 0.3)):
        block = f"blocks.{i}"
        assert (rates[f"{block}.attn.attn_drop"], rates[f"{block}.attn.proj_drop"], rates[f"{block}.mlp.drop"]) == (0.2, 0.1, 0.1)
        assert rates[f"blocks.{i}.drop_path1"] == rates[f"blocks.{i}.drop_path2"] == pytest.approx(dp)
    for name in ("attention1", "attention2"):
        assert (rates[f"tokens_to_token.{name}.dp"], rates[f"tokens_to_token.{name}.mlp.3"]) == (0.1, 0.1)


def test_t2t_pretrained_checkpoint(tmp_path):
    src = create_model("t2t_vit_7", img_size=64, num_classes=10)
    ddp = {f"module.{k}": v for k, v in src.state_dict().items()}
    torch.save({"state_dict": ddp, "epoch": 309, "args": argparse.Namespace(model="t2t_vit_7")}, tmp_path / "t2t.pth.tar")
    model = create_model("t2t_vit_7", pretrained=True, checkpoint_path=tmp_path / "t2t.pth.tar", img_size=32)
    assert model.num_classes == 10
    assert model.blocks[0].attn.scale == 256**-0.5
    pe = src.pos_embed.detach()
    grid = pe[:, 1:].reshape(1, 4, 4, 256).permute(0, 3, 1, 2)
    official = F.interpolate(grid, size=(2, 2), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 4, 256)
    assert torch.equal(model.pos_embed.detach(), torch.cat([pe[:, :1], official], dim=1))
    assert torch.equal(model.tokens_to_token.attention1.w, src.tokens_to_token.attention1.w)


@pytest.mark.parametrize("which", ["vision_transformer", "vit", "simple_vit", "t2t"])
def test_runs_under_bf16_autocast(which):
    """Smoke check: every model runs forward and backward under CPU bf16 autocast, logits within
    8 bf16 ulps (relative to max |logit|) of float32. bf16 parity proper is a GPU test."""
    if which == "vision_transformer":
        model = create_model("vit_tiny_patch16_224", img_size=32, depth=2, reg_tokens=1)
    elif which == "vit":
        model = ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16)
    elif which == "simple_vit":
        model = SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16)
    else:
        model = T2TViT(img_size=32, num_classes=10, embed_dim=64, depth=2, num_heads=2, token_dim=16)
    randomize(model).eval()
    x = image(2, 32)
    with torch.no_grad():
        expected = model(x)
        with torch.autocast("cpu", torch.bfloat16):
            out = model(x)
    assert out.dtype == torch.bfloat16
    err = (out.float() - expected).abs().max().item()
    assert err <= 8 * torch.finfo(torch.bfloat16).eps * expected.abs().max().item(), err
    with torch.autocast("cpu", torch.bfloat16):
        model.train()(x).float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- training


def _train(model: torch.nn.Module, x: torch.Tensor, steps: int = 12) -> list[float]:
    y = torch.arange(x.shape[0]) % 4
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("which", ["vision_transformer", "vit", "t2t"])
def test_trains_with_dropout(which):
    torch.manual_seed(0)
    if which == "vision_transformer":
        model = VisionTransformer(
            img_size=32, patch_size=8, num_classes=4, embed_dim=64, depth=2, num_heads=4, drop_rate=0.1,
            pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1,
        )
    elif which == "vit":
        model = ViT(
            image_size=32, patch_size=8, num_classes=4, dim=64, depth=2, heads=4, mlp_dim=128, dim_head=16, dropout=0.1,
            emb_dropout=0.1,
        )
    else:
        model = T2TViT(
            img_size=32, num_classes=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, token_dim=16, drop_rate=0.1,
            attn_drop_rate=0.1, drop_path_rate=0.1,
        )
    x = image(16, 32)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x)), "dropout should make two training-mode passes differ"
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, x)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} must stay frozen"


def test_public_names():
    assert fastvit.create_model is create_model
    assert {"ViT", "SimpleViT", "T2TViT", "VisionTransformer", "create_model"} <= set(fastvit.__all__)


@pytest.mark.parametrize("cls", ["ViT", "SimpleViT"])
def test_vit_pytorch_patch_embedding_runs_as_one_fused_op(cls):
    """vit-pytorch's patches -> LayerNorm -> Linear -> LayerNorm (+ cls, + pos) is one patch_embed call."""
    import copy

    import fastvit
    from numerics import assert_numerics

    model = getattr(fastvit, cls)(image_size=32, patch_size=8, num_classes=5, dim=64, depth=1, heads=2,
                                  mlp_dim=96, dim_head=32).eval()
    x = torch.randn(2, 3, 32, 32)
    ref64 = copy.deepcopy(model).double()(x.double())
    eager = model(x)
    with fastvit.use_backend({"embed": "triton"}):
        fused = model(x)
    assert_numerics(f"{cls} logits", fused, ref64, eager, torch.float32)
