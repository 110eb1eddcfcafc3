"""An optimized model, and fastvit's own, stay ordinary models: FX symbolic tracing (torch.fx,
torchvision's and timm's feature extraction), fake tensors, torch.export and ONNX export.

fastvit's ops are FX leaves (fastvit/_fx.py): a traced graph holds one node per op call and runs the
op, with its checks, on real tensors. Exports record each op's eager meaning (fastvit/backend.py).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

import fastvit
from fastvit import models, ops

# Triton runs on CPU through the interpreter here; on a GPU the same tests run on CUDA tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = {getattr(ops, n) for n in ops.__all__}


def fastvit_model(which: str):
    if which == "vit":
        return models.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10), 32
    if which == "vit_reg_dynamic":  # register tokens, avg pool, position table resampled for other sizes
        return models.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10,
                                   reg_tokens=2, global_pool="avg", dynamic_img_size=True), 48
    if which == "ViT":
        return fastvit.ViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128,
                           dim_head=32), 32
    if which == "SimpleViT":
        return fastvit.SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=1, heads=2,
                                 mlp_dim=128, dim_head=32), 32
    if which == "T2TViT":
        return models.create_model("t2t_vit_7", img_size=64, num_classes=10, depth=1), 64
    raise ValueError(which)


def optimized_model(which: str):
    if which == "timm_vit":
        m = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
        size = 32
    elif which == "timm_deit_distilled":
        m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10)
        size = 32
    elif which == "vitp_SimpleViT":
        from vit_pytorch import SimpleViT

        m = SimpleViT(image_size=32, patch_size=8, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, dim_head=32)
        size = 32
    else:
        raise ValueError(which)
    report = fastvit.optimize(m, backend="triton")
    assert report.changed
    return m, size


FASTVIT = ["vit", "vit_reg_dynamic", "ViT", "SimpleViT", "T2TViT"]
OPTIMIZED = ["timm_vit", "timm_deit_distilled", "vitp_SimpleViT"]
ALL = FASTVIT + OPTIMIZED


def build(which: str):
    return fastvit_model(which) if which in FASTVIT else optimized_model(which)


def op_targets(gm: torch.fx.GraphModule) -> list:
    """The graph's calls of fastvit's public ops (leaf nodes whose target is the op itself)."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in OPS]


@pytest.mark.parametrize("which", ALL)
def test_fx_symbolic_trace_computes_what_the_model_computes(which):
    model, size = build(which)
    model = model.to(DEV).train(False)
    x = torch.randn(2, 3, size, size, device=DEV, requires_grad=True)
    with fastvit.use_backend("triton"):
        gm = torch.fx.symbolic_trace(model)
        assert op_targets(gm), "the traced graph holds fastvit's ops as leaf calls"
        ref = model(x)
        (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
        out = gm(x)
        (gx,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=0)


def test_fx_graph_keeps_the_input_checks():
    model, _ = fastvit_model("vit")
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(ValueError, match=r"x's image size \(40, 40\) differs from img_size \(32, 32\)"):
        gm(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="must be a multiple of patch_size"):
        gm(torch.randn(1, 3, 36, 36))


def test_torchvision_and_timm_feature_extraction_after_optimize():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    from timm.models import create_feature_extractor as timm_feature_extractor

    model, size = optimized_model("timm_vit")
    x = torch.randn(2, 3, size, size)
    _, eval_nodes = get_graph_node_names(model)
    assert "blocks.1.attn.proj" in eval_nodes and any("attention_qkvpacked" in n for n in eval_nodes)
    with fastvit.use_backend("triton"):
        feats = create_feature_extractor(model, return_nodes={"blocks.0.attn.proj": "attn0", "norm": "out"})(x)
        timm_feats = timm_feature_extractor(model, return_nodes={"blocks.1": "block1"})(x)
        full = model.forward_features(x)
    assert feats["attn0"].shape == (2, 17, 192) and torch.equal(feats["out"], full)
    assert timm_feats["block1"].shape == (2, 17, 192)


@pytest.mark.parametrize("which", ["vit", "T2TViT", "timm_vit"])
def test_fake_tensors_run_under_a_named_backend(which):
    model, size = build(which)
    with fastvit.use_backend("triton"), FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.randn(2, 3, size, size)
        y = model(x)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and y.shape == (2, 10)


@pytest.mark.parametrize("which", ["vit", "T2TViT", "timm_vit"])
def test_torch_export_records_the_ops_eager_meaning(which):
    model, size = build(which)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with fastvit.use_backend("triton"):
        ep = torch.export.export(model, (x,))
        ref = model(x)
    names = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("fastvit" in n for n in names), names
    torch.testing.assert_close(ep.module()(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["vit", "T2TViT", "timm_vit"])
def test_onnx_export_runs_in_onnxruntime(which, tmp_path):
    import onnxruntime

    model, size = build(which)
    model.eval()
    x = torch.randn(2, 3, size, size)
    with fastvit.use_backend("triton"):
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        ref = model(x)
    path = tmp_path / f"{which}.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), ref, rtol=1e-4, atol=1e-5)
