"""Every bad input is a TypeError/ValueError that names the argument and the value."""

import pytest
import torch

import natkit


def qkv(*shape, dtype=torch.float32):
    return tuple(torch.randn(*shape).to(dtype) for _ in range(3))


Q, K, V = qkv(1, 10, 12, 4, 8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=1), ValueError, r"kernel_size must be >= 2.*1"),
    (dict(kernel_size=(3, 3, 3)), ValueError, r"kernel_size must have 2 entries.*\(3, 3, 3\)"),
    (dict(kernel_size=3.0), TypeError, r"kernel_size.*3\.0"),
    (dict(kernel_size=(3, "a")), TypeError, r"kernel_size entries must be ints"),
    (dict(kernel_size=True), TypeError, r"kernel_size"),
    (dict(kernel_size=3, stride=4), ValueError, r"stride must satisfy.*stride 4"),
    (dict(kernel_size=3, stride=0), ValueError, r"stride must satisfy"),
    (dict(kernel_size=3, dilation=0), ValueError, r"dilation must be >= 1.*0"),
    (dict(kernel_size=(3, 5), dilation=(4, 1)), ValueError,
     r"kernel_size \* dilation \(3 \* 4 = 12\) exceeds the input size 10 in spatial dimension 0"),
    (dict(kernel_size=11), ValueError, r"exceeds the input size 10"),
    (dict(kernel_size=3, is_causal=1), TypeError, r"is_causal"),
    (dict(kernel_size=3, is_causal=(True,) * 3), ValueError, r"is_causal must have 2 entries"),
    (dict(kernel_size=4, rpb=torch.zeros(4, 7, 7)), ValueError, r"rpb requires an odd kernel"),
    (dict(kernel_size=3, is_causal=True, rpb=torch.zeros(4, 5, 5)), ValueError,
     r"rpb is not supported with causal"),
    (dict(kernel_size=3, rpb=torch.zeros(4, 3, 3)), ValueError,
     r"rpb must have shape .*\(4, 5, 5\), got \(4, 3, 3\)"),
    (dict(kernel_size=3, rpb=torch.zeros(4, 5, 5, dtype=torch.long)), TypeError, r"rpb must be a floating"),
    (dict(kernel_size=3, rpb=[1.0]), TypeError, r"rpb must be a torch.Tensor"),
    (dict(kernel_size=3, scale="1"), TypeError, r"scale must be a finite real number.*'1'"),
    (dict(kernel_size=3, scale=float("nan")), TypeError, r"scale.*nan"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 4, 8)), ValueError,
     r"additional_keys and additional_values must be given together"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 3, 8),
          additional_values=torch.zeros(1, 2, 3, 8)), ValueError,
     r"additional_keys must have shape \[batch=1, n_extra, kv_heads=4, head_dim=8\]"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 4, 8),
          additional_values=torch.zeros(1, 3, 4, 8)), ValueError,
     r"additional_keys and additional_values shapes differ"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 4, 8, dtype=torch.float64),
          additional_values=torch.zeros(1, 2, 4, 8, dtype=torch.float64)), TypeError,
     r"additional_keys dtype torch.float64 differs"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 0, 4, 8),
          additional_values=torch.zeros(1, 0, 4, 8)), ValueError, r"additional_keys is empty"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        natkit.na2d(Q, K, V, **kwargs)


@pytest.mark.parametrize("args, error, match", [
    (qkv(1, 10, 4, 8), ValueError, r"query must have 5 dims .*got shape \(1, 10, 4, 8\)"),
    ((Q, K[..., :4], V[..., :4]), ValueError, r"key head_dim 4 differs from query head_dim 8"),
    ((Q, K, V[:, :9]), ValueError, r"key and value shapes differ"),
    ((Q, K[:, :9], V[:, :9]), ValueError, r"key batch/spatial dims \(1, 9, 12\) differ"),
    ((Q, K[..., :3, :], V[..., :3, :]), ValueError,
     r"query heads \(4\) must be a multiple of key/value heads \(3\)"),
    ((Q, K.double(), V.double()), TypeError, r"key dtype torch.float64 differs"),
    ((Q.long(), K.long(), V.long()), TypeError, r"query must be a floating tensor.*torch.int64"),
    ((Q.numpy(), K, V), TypeError, r"query must be a torch.Tensor, got ndarray"),
    ((Q, None, V), TypeError, r"key must be a torch.Tensor, got NoneType"),
    ((Q[:, :0], K[:, :0], V[:, :0]), ValueError, r"query is empty"),
    ((Q, K.to("meta"), V.to("meta")), ValueError, r"key is on meta but query is on cpu"),
])
def test_bad_tensors(args, error, match):
    with pytest.raises(error, match=match):
        natkit.na2d(*args, kernel_size=3)


def test_generic_entry_rejects_bad_rank():
    with pytest.raises(ValueError, match="1 to 3 spatial dims"):
        natkit.neighborhood_attention(*qkv(1, 2, 3, 4, 5, 6, 7), kernel_size=2)
    with pytest.raises(TypeError, match="query must be a torch.Tensor"):
        natkit.neighborhood_attention("q", K, V, kernel_size=3)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="num_heads must be a positive int dividing dim=32"):
        natkit.NeighborhoodAttention2D(32, 5, 3)
    with pytest.raises(ValueError, match="rel_pos_bias needs odd kernel"):
        natkit.NeighborhoodAttention2D(32, 4, 4, rel_pos_bias=True)
    with pytest.raises(ValueError, match="stride must satisfy"):
        natkit.NeighborhoodAttention1D(32, 4, 3, stride=5)
    with pytest.raises(ValueError, match="kernel_size must be >= 2"):
        natkit.NeighborhoodAttention3D(32, 4, 1)
    m = natkit.NeighborhoodAttention2D(32, 4, 3)
    with pytest.raises(ValueError, match=r"input must be \[batch, \*spatial\(2 dims\), dim=32\]"):
        m(torch.randn(1, 5, 5, 16))
