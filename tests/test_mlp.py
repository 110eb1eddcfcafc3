"""LayerNorm and LayerNorm-MLP: the reference against torch.nn modules, gradients, autocast, bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastvit import ops, reference


def torch_mlp(C, hidden, C_out, dtype=torch.float64, eps=1e-6):
    norm = nn.LayerNorm(C, eps=eps, dtype=dtype)
    fc1, fc2 = nn.Linear(C, hidden, dtype=dtype), nn.Linear(hidden, C_out, dtype=dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.1)
        norm.bias.normal_(0, 0.1)
    return norm, fc1, fc2


def mlp_args(norm, fc1, fc2):
    return (norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)


@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 7, 147), (2, 197, 64)])
@pytest.mark.parametrize("offset", [0.0, 100.0])
def test_layer_norm_matches_torch(shape, offset):
    x = torch.randn(*shape, dtype=torch.float64) + offset
    w, b = torch.randn(shape[-1], dtype=torch.float64), torch.randn(shape[-1], dtype=torch.float64)
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5), F.layer_norm(x, shape[-1:], w, b, 1e-5))
    torch.testing.assert_close(ops.layer_norm(x), F.layer_norm(x, shape[-1:]))


def test_layer_norm_offset_data_keeps_precision_in_fp32():
    x = torch.randn(4, 384) + 1000.0
    ref = F.layer_norm(x.double(), (384,))
    assert float((ops.layer_norm(x).double() - ref).abs().max()) < 1e-3
    # The test can fail: a one-pass E[x^2] - E[x]^2 variance in fp32 misses this bound.
    one_pass = (x - x.mean(-1, keepdim=True)) * torch.rsqrt((x * x).mean(-1, keepdim=True) - x.mean(-1, keepdim=True) ** 2 + 1e-5)
    assert float((one_pass.double() - ref).abs().max()) > 1e-3


@pytest.mark.parametrize("rows, C, hidden, C_out", [(1, 24, 96, 24), (7, 147, 64, 147), (197, 64, 192, 32)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_layernorm_mlp_matches_torch(rows, C, hidden, C_out, with_residual):
    norm, fc1, fc2 = torch_mlp(C, hidden, C_out)
    x = torch.randn(2, rows, C, dtype=torch.float64)
    residual = torch.randn(2, rows, C_out, dtype=torch.float64) if with_residual else None
    expected = fc2(F.gelu(fc1(norm(x)))) + (0 if residual is None else residual)
    torch.testing.assert_close(ops.layernorm_mlp(x, *mlp_args(norm, fc1, fc2), eps=1e-6, residual=residual), expected)


def test_gradcheck():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    norm, fc1, fc2 = torch_mlp(6, 10, 6)
    params = mlp_args(norm, fc1, fc2)
    res = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: reference.layernorm_mlp(x, *p[:6], residual=p[6]), (x, *params, res))
    assert torch.autograd.gradcheck(lambda x, w, b: reference.layer_norm(x, w, b), (x, params[0], params[1]))


def test_autocast_rule():
    x = torch.randn(2, 5, 16)
    norm, fc1, fc2 = torch_mlp(16, 32, 16, dtype=torch.float32)
    params = mlp_args(norm, fc1, fc2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ln = ops.layer_norm(x, norm.weight, norm.bias)
        out = ops.layernorm_mlp(x, *params)
        out_res = ops.layernorm_mlp(x, *params, residual=x)
        assert reference.layernorm_mlp(x, *params).dtype == torch.bfloat16
    assert ln.dtype == torch.bfloat16  # statistics in fp32, output in the autocast dtype
    assert torch.equal(ln, F.layer_norm(x, (16,), norm.weight, norm.bias).bfloat16())
    assert out.dtype == torch.bfloat16 and out_res.dtype == torch.float32  # the residual's dtype
    bf = [p.bfloat16() for p in params[2:]]
    assert torch.equal(out, reference.layernorm_mlp(x, *params[:2], *bf))
    assert torch.equal(out_res, x + out.float())


def test_pure_half_precision_and_dropout():
    x = torch.randn(2, 5, 16, dtype=torch.float16)
    norm, fc1, fc2 = torch_mlp(16, 32, 16, dtype=torch.float16)
    assert ops.layernorm_mlp(x, *mlp_args(norm, fc1, fc2)).dtype == torch.float16
    x = torch.randn(4, 64, 16)
    params = mlp_args(*torch_mlp(16, 32, 16, dtype=torch.float32))
    torch.manual_seed(3)
    a = ops.layernorm_mlp(x, *params, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(a, ops.layernorm_mlp(x, *params, dropout_p=0.3))
    assert not torch.equal(a, ops.layernorm_mlp(x, *params))
    assert torch.equal(ops.layernorm_mlp(x, *params, residual=x, dropout_p=1.0), x)


def _args():
    norm, fc1, fc2 = torch_mlp(16, 32, 8, dtype=torch.float32)
    names = ["ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"]
    return {"x": torch.randn(2, 5, 16), **dict(zip(names, mlp_args(norm, fc1, fc2)))}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: {**a, "x": torch.randn(2, 5, 15)}, ValueError, r"ln_weight must have shape \(15\)"),
        (lambda a: {**a, "fc1_weight": a["fc1_weight"][:, :8]}, ValueError, "fc1_weight must have shape"),
        (lambda a: {**a, "fc2_weight": a["fc2_weight"][:, :8]}, ValueError, "fc2_weight must have shape"),
        (lambda a: {**a, "fc1_bias": a["fc1_bias"][:3]}, ValueError, "fc1_bias must have shape"),
        (lambda a: {**a, "residual": torch.randn(2, 5, 16)}, ValueError, "residual must have shape"),
        (lambda a: {**a, "fc2_weight": a["fc2_weight"].half()}, TypeError, "fc2_weight has dtype"),
        (lambda a: {**a, "x": a["x"].long()}, TypeError, "x must be a floating-point"),
        (lambda a: {**a, "eps": -1.0}, ValueError, "eps must be a positive float"),
        (lambda a: {**a, "dropout_p": "0.1"}, ValueError, "dropout_p must be"),
        (lambda a: {**a, "fc1_bias": a["fc1_bias"].to("meta")}, ValueError, "fc1_bias is on meta"),
        (lambda a: {**a, "ln_weight": a["ln_weight"][None]}, ValueError, "ln_weight must be a 1-D"),
    ],
)
def test_layernorm_mlp_bad_inputs(change, error, match):
    with pytest.raises(error, match=match):
        ops.layernorm_mlp(**change(_args()))


def test_layer_norm_bad_inputs():
    with pytest.raises(ValueError, match=r"weight must have shape \(16\)"):
        ops.layer_norm(torch.randn(3, 16), torch.ones(15))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.layer_norm([1.0, 2.0])
    with pytest.raises(ValueError, match="x must be a tensor"):
        ops.layer_norm(torch.tensor(1.0))
