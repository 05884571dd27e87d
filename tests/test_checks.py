"""Every bad input is a TypeError/ValueError that names the argument and the value."""

import warnings

import numpy as np
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
    (dict(kernel_size=3, scale=float("nan")), ValueError, r"scale must be finite.*nan"),
    (dict(kernel_size=3, scale=1e39), ValueError, r"scale must be finite and at most 3.403e\+38 "
     r"in magnitude for torch.float32 inputs, got 1e\+39"),
    (dict(kernel_size=3, scale=10 ** 400), ValueError, r"scale must be finite"),
    (dict(kernel_size=b"\x03"), TypeError, r"kernel_size must be int or a tuple"),
    (dict(kernel_size={3, 5}), TypeError, r"kernel_size must be int or a tuple"),
    (dict(kernel_size=3, return_lse="False"), TypeError, r"return_lse must be a bool, got 'False'"),
    (dict(kernel_size=3, rpb=torch.zeros(4, 5, 5).to_sparse()), TypeError,
     r"rpb must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
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
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 4, 0),
          additional_values=torch.zeros(1, 2, 4, 0)), ValueError,
     r"additional_keys is empty: size 0 in head_dim \(shape \(1, 2, 4, 0\)\); only batch and "
     r"n_extra may be 0"),
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
    ((Q[:, :0], K[:, :0], V[:, :0]), ValueError,
     r"query is empty: size 0 in size0 \(shape \(1, 0, 12, 4, 8\)\); only batch may be 0"),
    ((Q[..., :0, :], K[..., :0, :], V[..., :0, :]), ValueError, r"query is empty: size 0 in heads "),
    ((Q[..., :0], K[..., :0], V[..., :0]), ValueError,
     r"query is empty: size 0 in head_dim"),
    ((Q, K[..., :0, :], V[..., :0, :]), ValueError, r"key is empty: size 0 in heads"),
    ((Q, K.to("meta"), V.to("meta")), ValueError, r"key is on meta but query is on cpu"),
    ((Q.to_sparse(), K, V), TypeError, r"query must be a dense \(strided\) tensor"),
    ((torch.nested.nested_tensor([Q[0], Q[0, :5]]), K, V), TypeError,
     r"query must be a dense \(strided\) tensor, got a nested tensor"),
])
def test_bad_tensors(args, error, match):
    with pytest.raises(error, match=match):
        natkit.na2d(*args, kernel_size=3)


def test_numpy_integers_are_accepted_as_ints():
    """Sizes read from configs or arrays are often numpy integers; they normalize to int."""
    out = natkit.na2d(Q, K, V, kernel_size=np.int64(3), dilation=(np.int32(2), 1))
    torch.testing.assert_close(out, natkit.na2d(Q, K, V, kernel_size=3, dilation=(2, 1)))
    m = natkit.NeighborhoodAttention2D(np.int64(32), np.int64(4), (np.int64(3), 5))
    assert m.kernel_size == (3, 5) and all(type(k) is int for k in m.kernel_size)


def test_numpy_scales_are_checked_in_float64():
    """A numpy float16/float32 scale is compared with the limit in float64: inf is rejected
    (in its own width the limit overflowed to inf and let it through), valid values pass
    without numpy's overflow warning and give the Python float's result."""
    for scale in (np.float16(np.inf), np.float32(-np.inf), np.float32(np.nan)):
        for dtype in (torch.float32, torch.float64):
            q = Q.to(dtype)
            with pytest.raises(ValueError, match=f"scale must be finite.*got {float(scale)}"):
                natkit.na2d(q, q, q, 3, scale=scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for scale in (np.float16(0.5), np.float32(0.3), np.float64(-2.0)):
            torch.testing.assert_close(natkit.na2d(Q, K, V, 3, scale=scale),
                                       natkit.na2d(Q, K, V, 3, scale=float(scale)))


def test_module_padding_path_checks_the_scale():
    """Inputs smaller than the kernel run with q pre-scaled: the scale is checked there too,
    as the op checks it on inputs large enough."""
    m = natkit.NeighborhoodAttention2D(16, 2, 3, qk_scale=1e39).eval()
    for shape in ((1, 4, 4, 16), (1, 2, 2, 16)):
        with pytest.raises(ValueError, match=r"scale must be finite and at most 3.403e\+38 .*"
                                             r"torch.float32 inputs, got 1e\+39"):
            m(torch.randn(shape))
    assert m.double()(torch.randn(1, 2, 2, 16, dtype=torch.float64)).isfinite().all()


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


def test_module_argument_types():
    for kwargs, error, match in [
            (dict(attn_drop=-0.5), ValueError, r"attn_drop must be a probability in \[0, 1\), got -0.5"),
            (dict(attn_drop=float("nan")), ValueError, r"attn_drop must be a probability"),
            (dict(proj_drop="x"), ValueError, r"proj_drop must be a probability.*'x'"),
            (dict(qk_scale="x"), ValueError, r"qk_scale must be a finite real number or None, got 'x'"),
            (dict(qkv_bias="no"), TypeError, r"qkv_bias must be a bool, got 'no'"),
            (dict(rel_pos_bias="yes"), TypeError, r"rel_pos_bias must be a bool"),
            (dict(num_heads=True), ValueError, r"num_heads must be a positive int"),
            (dict(dim=True), ValueError, r"dim must be a positive int, got True")]:
        args = dict(dim=32, num_heads=4, kernel_size=3) | kwargs
        with pytest.raises(error, match=match):
            natkit.NeighborhoodAttention2D(**args)
    m = natkit.NeighborhoodAttention2D(32, 4, 3)
    with pytest.raises(TypeError, match="input must be a torch.Tensor, got list"):
        m([[0.0]])
    with pytest.raises(TypeError, match="input dtype torch.float64 differs from the module's "
                                        "torch.float32"):
        m(torch.randn(1, 5, 5, 32, dtype=torch.float64))
    assert m(torch.randn(0, 5, 5, 32)).shape == (0, 5, 5, 32)  # empty batch, like nn.Linear


def test_merge_attentions_argument_errors():
    o, lse = natkit.na2d(Q, K, V, 3, return_lse=True)
    with pytest.raises(TypeError, match="outputs must be a list or tuple of tensors, got Tensor"):
        natkit.merge_attentions(o, lse)  # would otherwise merge along the batch dimension
    with pytest.raises(TypeError, match=r"outputs\[0\] must be a floating-point tensor"):
        natkit.merge_attentions([o.long()], [lse])
    with pytest.raises(ValueError, match=r"lses\[1\] is on meta, outputs\[0\] on cpu"):
        natkit.merge_attentions([o, o], [lse, lse.to("meta")])


Q = torch.zeros(1, 10, 12, 4, 8)  # no draw from the global generator at import


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=(3, 4), rpb=torch.zeros(4, 5, 7)), ValueError, r"rpb requires an odd"),
    (dict(kernel_size=3, is_causal=(False, True), rpb=torch.zeros(4, 5, 5)), ValueError,
     r"rpb is not supported with causal"),
    (dict(kernel_size=3, rpb=torch.zeros(4, 5, 5, device="meta")), ValueError,
     r"rpb is on meta but query is on cpu"),
    (dict(kernel_size=3, additional_keys=torch.zeros(1, 2, 4, 8, device="meta"),
          additional_values=torch.zeros(1, 2, 4, 8, device="meta")), ValueError,
     r"additional_keys is on meta but query is on cpu"),
])
def test_more_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        natkit.na2d(Q, Q, Q, **kwargs)


def test_value_dtype_is_checked():
    with pytest.raises(TypeError, match="value dtype torch.float64 differs"):
        natkit.na2d(Q, Q, Q.double(), 3)
