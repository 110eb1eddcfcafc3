"""The numerics rule itself: it passes a faithful computation and fails a sloppy one, NaN, and a wrong shape."""

import pytest
import torch

from fastvit import reference
from numerics import assert_numerics, check_against_reference, expanded_grad, noncontiguous, randn


def sloppy_layer_norm(x, weight=None, bias=None, eps=1e-5):
    """One-pass variance in the input dtype: loses offset data."""
    mean = x.mean(-1, keepdim=True)
    var = (x * x).mean(-1, keepdim=True) - mean * mean
    return (x - mean) * torch.rsqrt(var.clamp_min(0) + eps) * weight + bias


def faithful_layer_norm(x, weight=None, bias=None, eps=1e-5):
    """All arithmetic in fp32 whatever the input dtype, output in x's dtype, as a kernel computes."""
    return reference.layer_norm(x.float(), weight.float(), bias.float(), eps).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_rule_passes_faithful_and_fails_sloppy(dtype):
    inputs = {
        "x": randn(3, 197, 96, dtype=dtype, offset=100.0, outliers=4).requires_grad_(),
        "weight": randn(96, dtype=dtype).requires_grad_(),
        "bias": randn(96, dtype=dtype).requires_grad_(),
    }
    check_against_reference(faithful_layer_norm, reference.layer_norm, inputs, dtype)
    with pytest.raises(AssertionError, match="elements exceed the budget"):
        check_against_reference(sloppy_layer_norm, reference.layer_norm, inputs, dtype)


def test_rule_fails_nan_and_shape():
    ref = torch.randn(4, 5, dtype=torch.float64)
    out = ref.float().clone()
    assert_numerics("ok", out, ref, ref.float(), torch.float32)
    out[2, 3] = float("nan")  # an element a kernel never wrote (outputs are NaN-poisoned)
    with pytest.raises(AssertionError, match=r"1 of 20 elements are NaN \(first at \(2, 3\)\)"):
        assert_numerics("out", out, ref, ref.float(), torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        assert_numerics("out", ref.float()[:3], ref, ref.float(), torch.float32)
    off = ref.float().clone()
    off[1, 1] += 1e-3
    with pytest.raises(AssertionError, match=r"worst at \(1, 1\)"):
        assert_numerics("out", off, ref, ref.float(), torch.float32)


def test_input_helpers():
    x = randn(4, 6)
    nc = noncontiguous(x)
    assert not nc.is_contiguous() and torch.equal(nc, x)
    g = expanded_grad((3, 4), torch.float32)
    assert g.stride() == (0, 0)
    assert randn(1000, offset=100.0).mean().item() == pytest.approx(100.0, abs=0.2)
    assert randn(1000, outliers=5).abs().max().item() == pytest.approx(20.0)


def test_expanded_gradient_through_the_harness():
    inputs = {"x": randn(2, 7, 24).requires_grad_(), "weight": randn(24), "bias": randn(24)}
    check_against_reference(faithful_layer_norm, reference.layer_norm, inputs, torch.float32, grad_out=expanded_grad((2, 7, 24), torch.float32))
