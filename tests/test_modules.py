"""NeighborhoodAttention modules: official parameter names, projections, padding path, compile."""

import pytest
import torch

import natkit
from natkit._checks import check_inputs
from natkit.backends.reference import na_reference
from natkit.modules import _pad_spatial


def module_reference(m, x):
    """The module's definition: qkv -> pad to kernel*dilation, padded keys excluded -> crop."""
    nd = m.ndim
    b, *spatial, c = x.shape
    qkv = m.qkv(x).unflatten(-1, (3, m.num_heads, m.head_dim)).double()
    q, k, v = qkv.unbind(-3)
    pads = tuple(max(kk * d - s, 0) for kk, d, s in zip(m.kernel_size, m.dilation, spatial))
    q, k, v = (_pad_spatial(t, pads) for t in (q, k, v))
    real = _pad_spatial(torch.ones(1, *spatial, 1, 1, dtype=torch.float64), pads) > 0
    p = check_inputs(nd, q, k, v, m.kernel_size, m.dilation, m.stride, m.is_causal,
                     None if m.rpb is None else m.rpb.double(), m.scale, None, None)
    out, _ = na_reference(q, k, v, p, None if m.rpb is None else m.rpb.double(),
                          key_mask=real.flatten())
    out = out[(slice(None), *(slice(0, s) for s in spatial))].reshape(b, *spatial, c)
    return m.proj(out.to(x.dtype))


@pytest.mark.parametrize("cls, size, kwargs", [
    (natkit.NeighborhoodAttention1D, (13,), dict(kernel_size=5, dilation=2)),
    (natkit.NeighborhoodAttention2D, (9, 11), dict(kernel_size=3, rel_pos_bias=True)),
    (natkit.NeighborhoodAttention2D, (8, 9), dict(kernel_size=(4, 3), stride=(2, 1),
                                                  is_causal=(True, False))),
    (natkit.NeighborhoodAttention3D, (5, 6, 7), dict(kernel_size=3, dilation=(1, 2, 1))),
    # padding path: inputs smaller than kernel * dilation
    (natkit.NeighborhoodAttention2D, (3, 5), dict(kernel_size=7, rel_pos_bias=True)),
    (natkit.NeighborhoodAttention2D, (4, 13), dict(kernel_size=3, dilation=(2, 3))),
    (natkit.NeighborhoodAttention1D, (5,), dict(kernel_size=7, is_causal=True)),
    (natkit.NeighborhoodAttention3D, (2, 3, 6), dict(kernel_size=3, rel_pos_bias=True)),
])
def test_module_matches_definition(cls, size, kwargs):
    m = cls(32, 4, **kwargs).double()
    x = torch.randn(2, *size, 32, dtype=torch.float64)
    out = m(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, module_reference(m, x), atol=1e-10, rtol=0)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padding_mask_is_exact_in_low_precision(dtype):
    m = natkit.NeighborhoodAttention2D(16, 2, kernel_size=7, rel_pos_bias=True)
    x = torch.randn(1, 4, 5, 16)
    ref = module_reference(m.double(), x.double())
    out = m.to(dtype)(x.to(dtype))
    assert torch.isfinite(out).all()
    tol = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 1e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("qk_scale", [0.0, -1.0, 1e-31, 40.0])
def test_padding_mask_is_exact_for_any_scale(qk_scale):
    """Padded keys get no weight whatever the sign or size of the logit scale."""
    m = natkit.NeighborhoodAttention2D(16, 2, kernel_size=5, qk_scale=qk_scale,
                                       rel_pos_bias=True).double()
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), module_reference(m, x), atol=1e-10, rtol=0)


def test_padding_mask_holds_for_large_negative_half_logits():
    """float16 logits far below zero (about -2e4 here) still leave padded keys at 0."""
    m = natkit.NeighborhoodAttention1D(2, 1, kernel_size=4)
    with torch.no_grad():
        m.qkv.weight.copy_(torch.cat([-60 * torch.eye(2), 60 * torch.eye(2), torch.eye(2)]))
        m.qkv.bias.zero_()
        m.proj.weight.copy_(torch.eye(2))
        m.proj.bias.zero_()
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    ref = module_reference(m.double(), x.double())
    torch.testing.assert_close(m.half()(x.half()).double(), ref, atol=1e-2, rtol=0)


def test_parameter_names_match_official_checkpoints():
    m = natkit.NeighborhoodAttention2D(64, 2, 7, rel_pos_bias=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"qkv.weight": (192, 64), "qkv.bias": (192,), "rpb": (2, 13, 13),
                      "proj.weight": (64, 64), "proj.bias": (64,)}
    assert "rpb" not in natkit.NeighborhoodAttention2D(64, 2, 7).state_dict()
    assert "qkv.bias" not in natkit.NeighborhoodAttention1D(64, 2, 7, qkv_bias=False).state_dict()


@pytest.mark.parametrize("attn_drop", [0.0, 0.2])  # dropout: the portable path, training
@pytest.mark.parametrize("shape", [(0, 5, 6, 8), (0, 2, 2, 8), (2, 0, 6, 8)])  # padded; no tokens
def test_empty_batch_gives_every_parameter_a_zero_gradient(shape, attn_drop):
    """As with a real batch (what DistributedDataParallel expects of a rank's empty batch)."""
    m = natkit.NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, attn_drop=attn_drop)
    x = torch.randn(*shape, requires_grad=True)
    out = m(x)
    assert out.shape == shape
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and not p.grad.any(), name
    assert x.grad.shape == shape


def test_empty_spatial_size_gives_an_empty_output():
    m = natkit.NeighborhoodAttention2D(8, 2, 3)
    assert m(torch.randn(2, 0, 5, 8)).shape == (2, 0, 5, 8)


def test_attention_dropout_only_in_training():
    m = natkit.NeighborhoodAttention2D(16, 2, 3, attn_drop=0.5)
    x = torch.randn(1, 6, 6, 16)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


def test_attention_dropout_is_unbiased_and_steered_by_use_backend():
    """Dropped probabilities are rescaled by 1 / (1 - p): the mean of many training outputs
    approaches the eval output. It runs on the portable backend, the only one that forms
    the probabilities; a block forcing another backend raises, as that backend would."""
    torch.manual_seed(0)
    m = natkit.NeighborhoodAttention2D(16, 2, 3, attn_drop=0.3, rel_pos_bias=True)
    x = torch.randn(1, 6, 7, 16)
    expected = m.eval()(x)
    m.train()
    with torch.no_grad(), natkit.use_backend("torch"):
        mean = torch.stack([m(x) for _ in range(2000)]).mean(0)
    torch.testing.assert_close(mean, expected, atol=0.02, rtol=0)
    with natkit.use_backend("reference"), pytest.raises(
            ValueError, match=r"backend='reference' \(set by natkit.use_backend\) cannot run "
                              r"this call: attention dropout"):
        m(x)


def test_module_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = natkit.NeighborhoodAttention2D(16, 2, 3, rel_pos_bias=True)
    x = torch.randn(2, 7, 9, 16)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), m(x), atol=1e-6, rtol=0)


def test_padding_mask_holds_for_huge_negative_logits():
    """float64 logits far below -1e6 (every real key) still leave padded keys at 0."""
    from test_modules import module_reference
    m = natkit.NeighborhoodAttention1D(2, 1, kernel_size=4, qk_scale=1e5).double()
    with torch.no_grad():
        m.qkv.weight.copy_(torch.cat([-60 * torch.eye(2), 60 * torch.eye(2), torch.eye(2)]))
        m.qkv.bias.zero_()
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    torch.testing.assert_close(m(x), module_reference(m, x), atol=1e-8, rtol=0)


def test_proj_drop_applies_in_training_only():
    torch.manual_seed(0)
    m = natkit.NeighborhoodAttention2D(16, 2, 3, proj_drop=0.5)
    x = torch.randn(1, 6, 6, 16)
    ev = m.eval()(x)
    out = m.train()(x)
    zero = out == 0
    assert 0.3 < zero.float().mean() < 0.7
    torch.testing.assert_close(out[~zero], 2 * ev[~zero])


def test_module_refuses_rpb_with_causal_at_construction():
    with pytest.raises(ValueError, match="rel_pos_bias needs odd kernel sizes and no causal"):
        natkit.NeighborhoodAttention2D(32, 4, 3, rel_pos_bias=True, is_causal=(True, False))
