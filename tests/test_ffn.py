"""Dense feed-forward networks equal their hand-written formulas."""
import math

import pytest
import torch

from model.ffn import FeedForward, gelu_tanh


def _gelu_tanh_by_hand(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _silu_by_hand(x: torch.Tensor) -> torch.Tensor:
    return x / (1.0 + torch.exp(-x))


def test_gelu_tanh_matches_formula():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    torch.testing.assert_close(gelu_tanh(x), _gelu_tanh_by_hand(x))


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("ffn_type", ["swiglu", "geglu", "gelu"])
def test_feedforward_matches_formula(ffn_type, bias):
    torch.manual_seed(0)
    ffn = FeedForward(6, 10, ffn_type, bias=bias).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)

    def lin(layer, t):
        out = t @ layer.weight.T
        return out + layer.bias if bias else out

    if ffn_type == "swiglu":
        h = _silu_by_hand(lin(ffn.gate_proj, x)) * lin(ffn.up_proj, x)
    elif ffn_type == "geglu":
        h = _gelu_tanh_by_hand(lin(ffn.gate_proj, x)) * lin(ffn.up_proj, x)
    else:
        h = _gelu_tanh_by_hand(lin(ffn.up_proj, x))
    torch.testing.assert_close(ffn(x), lin(ffn.down_proj, h))


def test_parameter_names():
    names = lambda t: sorted(n for n, _ in FeedForward(4, 8, t).named_parameters())  # noqa: E731
    assert names("swiglu") == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert names("geglu") == ["down_proj.weight", "gate_proj.weight", "up_proj.weight"]
    assert names("gelu") == ["down_proj.weight", "up_proj.weight"]
    ffn = FeedForward(4, 8, "swiglu")
    assert ffn.gate_proj.weight.shape == (8, 4) and ffn.down_proj.weight.shape == (4, 8)


def test_unknown_type_rejected():
    with pytest.raises(ValueError, match="ffn_type"):
        FeedForward(4, 8, "relu")
