"""natkit's NAT/DiNAT against the Hugging Face ``transformers`` implementation.

transformers' models run NATTEN's unfused ops (``natten2dqkrpb``, ``natten2dav``); NATTEN is
not installed, so this file writes them from NATTEN's own window and bias-start formulas
(``get_window_start``, ``get_pb_start``), independently of natkit's SPEC code. Random
weights (layer norms, biases, RPB and layer scale included) are converted with
``from_hf_state_dict`` and must give the same logits and backbone features, and convert
back exactly. transformers is pinned (4.44.2): later releases broke DiNAT's forward.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.deprecated.nat import modeling_nat
from transformers.models.dinat import modeling_dinat

import natkit.models as M


def natten_window_start(i: int, n: int, k: int, d: int) -> int:
    half = k // 2
    group, ig = i % d, i // d
    length = (n + d - 1) // d
    if group >= d - (length * d - n):   # a shorter dilation group
        length -= 1
    start = max(ig - half, 0) + (ig + half >= length) * (length - ig - half - 1)
    return start * d + group


def natten_pb_start(i: int, n: int, k: int, d: int) -> int:
    half = k // 2
    if d <= 1:
        return half + (i < half) * (half - i) + (i + half >= n) * (n - i - 1 - half)
    if i - half * d < 0:
        return k - 1 - i // d
    if i + half * d >= n:
        return (n - i - 1) // d
    return half


def _neighbors(n: int, k: int, d: int):
    """Per query of a length-``n`` dimension: its ``k`` keys and their bias indices."""
    keys = [[natten_window_start(i, n, k, d) + t * d for t in range(k)] for i in range(n)]
    bias = [[natten_pb_start(i, n, k, d) + t for t in range(k)] for i in range(n)]
    return torch.tensor(keys), torch.tensor(bias)


def natten2dqkrpb(q, k, rpb, kernel, dilation):
    """``[B, heads, H, W, d]`` queries and keys -> ``[B, heads, H, W, kernel^2]`` logits."""
    b, h, height, width, _ = q.shape
    kr, br = _neighbors(height, kernel, dilation)
    kc, bc = _neighbors(width, kernel, dilation)
    keys = k[:, :, kr[:, None, :, None], kc[None, :, None, :]]   # B h H W k k d
    attn = torch.einsum("bhxyd,bhxyijd->bhxyij", q, keys)
    if rpb is not None:
        attn = attn + rpb[:, br[:, None, :, None], bc[None, :, None, :]]
    return attn.reshape(b, h, height, width, kernel * kernel)


def natten2dav(attn, v, kernel, dilation):
    b, h, height, width, _ = attn.shape
    kr, _ = _neighbors(height, kernel, dilation)
    kc, _ = _neighbors(width, kernel, dilation)
    values = v[:, :, kr[:, None, :, None], kc[None, :, None, :]]
    return torch.einsum("bhxyij,bhxyijd->bhxyd",
                        attn.view(b, h, height, width, kernel, kernel), values)


@pytest.fixture(autouse=True)
def _natten(monkeypatch):
    for module in (modeling_dinat, modeling_nat):
        monkeypatch.setattr(module, "natten2dqkrpb", natten2dqkrpb)
        monkeypatch.setattr(module, "natten2dav", natten2dav)
        monkeypatch.setattr(module, "requires_backends", lambda *args, **kwargs: None)


def _randomize(model: torch.nn.Module) -> None:
    """Every parameter random (the default init leaves biases, RPB and norms trivial)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5) + offset)


CASES = {  # feature maps at least kernel x dilation, so neither side pads
    # 100 px: levels of 25, 13, 7, 4 tokens; dilation groups of unequal length
    "dinat_k3_uneven_groups": ("dinat", 100, 0.0, dict(
        embed_dim=8, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3,
        dilations=[[1, 3], [2, 1], [1, 2], [1]], mlp_ratio=2.0)),
    "dinat_k5_layer_scale": ("dinat", 160, 1e-2, dict(
        embed_dim=16, depths=[1, 2, 1, 1], num_heads=[2, 2, 4, 4], kernel_size=5,
        dilations=[[2], [1, 2], [1], [1]], mlp_ratio=3.0)),
    "nat_k5_layer_scale": ("nat", 160, 0.5, dict(
        embed_dim=24, depths=[1, 1, 1, 1], num_heads=[3, 3, 6, 6], kernel_size=5,
        mlp_ratio=2.0)),
}


@pytest.mark.parametrize("case", CASES)
def test_classifier_matches_transformers(case):
    family, size, layer_scale, arch = CASES[case]
    config_cls = transformers.DinatConfig if family == "dinat" else transformers.NatConfig
    model_cls = (transformers.DinatForImageClassification if family == "dinat"
                 else transformers.NatForImageClassification)
    config = config_cls(**arch, layer_scale_init_value=layer_scale, num_labels=7,
                        drop_path_rate=0.0)
    hf = model_cls(config).eval()
    _randomize(hf)
    ours = M.create_model(f"{family}_tiny", num_classes=7, drop_path_rate=0.0,
                          layer_scale=layer_scale or None, **arch).eval()
    ours.load_state_dict(M.from_hf_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = hf(pixel_values=x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        back = model_cls(config).eval()
        back.load_state_dict(M.to_hf_state_dict(ours.state_dict(), prefix=family), strict=True)
        assert torch.equal(back(pixel_values=x).logits, expected)


def test_backbone_matches_transformers():
    arch = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8], kernel_size=3,
                dilations=[[2], [1], [1], [1]])
    config = transformers.DinatConfig(**arch, out_features=["stage1", "stage2", "stage3",
                                                            "stage4"])
    hf = transformers.DinatBackbone(config).eval()
    _randomize(hf)
    ours = M.create_model("dinat_tiny", features_only=True, **arch).eval()
    ours.load_state_dict(M.from_hf_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        for got, expected in zip(ours(x), hf(pixel_values=x).feature_maps, strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
