"""The torch.library scheme (fastvit._library) on a toy op: names, _fwd/_infer/_bwd wiring, fakes, opcheck."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fastvit import _library
from fastvit._library import FusedOp, get_op, new_output, op_name, wire_autograd

calls = []
saved_seen = []


# A toy "kernel" family: y = x * w (rows scaled by w), with the row sums of x saved for no reason but to
# exercise a saved extra output, exactly as a real kernel's _fwd returns its log-sum-exp.
@torch.library.custom_op(op_name("scale_rows", "test", "fwd"), mutates_args=())
def _fwd(x: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    calls.append("fwd")
    return x * w * alpha, x.sum(-1)


@torch.library.custom_op(op_name("scale_rows", "test", "infer"), mutates_args=())
def _infer(x: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    calls.append("infer")
    return x * w * alpha


@torch.library.custom_op(op_name("scale_rows", "test", "bwd"), mutates_args=())
def _bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return dy * w * alpha, (dy * x).sum(0) * alpha


@_fwd.register_fake
def _(x, w, alpha):
    return torch.empty_like(x), x.new_empty(x.shape[:-1])


@_infer.register_fake
def _(x, w, alpha):
    return torch.empty_like(x)


@_bwd.register_fake
def _(dy, x, w, alpha):
    return torch.empty_like(x), torch.empty_like(w)


def _backward(saved, grads):
    x, w, alpha = saved.inputs
    y, rowsum = saved.outputs
    assert y is None  # public outputs are not saved unless asked (callers may modify them in place)
    saved_seen.append(rowsum)
    dx, dw = get_op("scale_rows", "test", "bwd")(grads[0], x, w, alpha)
    return dx, dw, None


wire_autograd("scale_rows", "test", num_outputs=1, backward=_backward)
scale_rows = FusedOp("scale_rows", "test", num_outputs=1)


def test_names():
    assert op_name("attention", "triton", "fwd") == "fastvit::attention_triton_fwd"
    assert op_name("layernorm_mlp", "cuda") == "fastvit::layernorm_mlp_cuda"
    with pytest.raises(ValueError, match="stage must be one of"):
        op_name("attention", "triton", "backward")
    with pytest.raises(ValueError, match="identifiers"):
        op_name("atten-tion", "triton")


def test_fwd_when_grad_is_needed_and_infer_otherwise():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    calls.clear()
    scale_rows(x, w, 2.0)
    with torch.no_grad():
        scale_rows(x, w, 2.0)
    with torch.inference_mode():
        scale_rows(x.detach(), w.detach(), 2.0)
    scale_rows(x.detach(), w.detach(), 2.0)
    assert calls == ["fwd", "infer", "infer", "infer"]


def test_gradients_and_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: scale_rows(x, w, 0.5), (x, w))
    saved_seen.clear()
    dx, dw = torch.autograd.grad(scale_rows(x, w, 0.5).sum(), (x, w))
    assert len(saved_seen) == 1 and torch.equal(saved_seen[0], x.detach().sum(-1))  # the extra output arrives
    torch.testing.assert_close(dx, (0.5 * w).expand(4, 3))
    torch.testing.assert_close(dw, 0.5 * x.sum(0))


def test_double_backward_says_so():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(scale_rows(x, w, 1.0).sum(), (x,), create_graph=True)


def test_fake_tensors_and_make_fx_trace_forward_and_backward():
    def train_step(x, w):
        y = scale_rows(x, w, 3.0)
        return torch.autograd.grad(y.sum(), (x, w))

    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    gm = make_fx(train_step, tracing_mode="fake")(x, w)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert "fastvit.scale_rows_test_fwd.default" in targets and "fastvit.scale_rows_test_bwd.default" in targets


def test_opcheck():
    x = torch.randn(4, 3, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    torch.library.opcheck(get_op("scale_rows", "test", "fwd"), (x, w, 1.5))
    torch.library.opcheck(get_op("scale_rows", "test", "infer"), (x.detach(), w.detach(), 1.5))


def test_new_output_is_poisoned_in_tests():
    assert torch.isnan(new_output((3, 2), dtype=torch.float32, device=torch.device("cpu"))).all()
    _library.poison_outputs(False)
    assert new_output((3, 2), dtype=torch.float32, device=torch.device("cpu")).shape == (3, 2)


def test_outputs_may_be_modified_in_place():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = scale_rows(x, w, 2.0)
    y += 1.0  # e.g. SimpleViT's `x += pos_embedding` on a fused patch embedding
    (dx,) = torch.autograd.grad(y.sum(), (x,))
    torch.testing.assert_close(dx, (2.0 * w).expand(4, 3))
