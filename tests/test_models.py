"""NAT / DiNAT / DiNAT_s / isotropic models: registry-driven tests.

Full-size models are only built on the meta device (parameter counts, key names and
shapes); forward/backward runs use shrunken versions of every registered config.
Expected keys are written from SPEC.md and the official model code, not read from the
models.
"""

from __future__ import annotations

import math
import re
import sys
import types
import warnings

import pytest
import torch

import natkit.models as M
from natkit.models import CheckpointMismatchError, create_model, list_models
from natkit.models._layers import NATLayer
from natkit.models.convert import from_hf_state_dict, to_hf_state_dict

NAT_LIKE = ["nat_mini", "nat_tiny", "nat_small", "nat_base", "dinat_mini", "dinat_tiny",
            "dinat_small", "dinat_base", "dinat_large", "dinat_large_384"]
DINAT_S = ["dinat_s_tiny", "dinat_s_small", "dinat_s_base", "dinat_s_large",
           "dinat_s_large_384"]
ISOTROPIC = ["nat_isotropic_small", "nat_isotropic_base", "dinat_isotropic_small",
             "dinat_isotropic_base"]
ALL = NAT_LIKE + DINAT_S + ISOTROPIC + ["nat_micro"]

# (depths, heads, C, mlp_ratio, layer scale) -- SPEC.md's table; DiNAT-Small has no layer
# scale; DiNAT-Large C=192, heads 6/12/24/48, mlp 2 (no layer scale in the official code).
SPEC_ARCH = {
    "nat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, False),
    "nat_tiny": ((3, 4, 18, 5), (2, 4, 8, 16), 64, 3, False),
    "nat_small": ((3, 4, 18, 5), (3, 6, 12, 24), 96, 2, True),
    "nat_base": ((3, 4, 18, 5), (4, 8, 16, 32), 128, 2, True),
    "dinat_mini": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, False),
    "dinat_tiny": ((3, 4, 18, 5), (2, 4, 8, 16), 64, 3, False),
    "dinat_small": ((3, 4, 18, 5), (3, 6, 12, 24), 96, 2, False),
    "dinat_base": ((3, 4, 18, 5), (4, 8, 16, 32), 128, 2, True),
    "dinat_large": ((3, 4, 18, 5), (6, 12, 24, 48), 192, 2, False),
    "dinat_large_384": ((3, 4, 18, 5), (6, 12, 24, 48), 192, 2, False),
    # DiNAT_s: Swin-T/S/B/L shapes, mlp 4, no layer scale
    "dinat_s_tiny": ((2, 2, 6, 2), (3, 6, 12, 24), 96, 4, False),
    "dinat_s_small": ((2, 2, 18, 2), (3, 6, 12, 24), 96, 4, False),
    "dinat_s_base": ((2, 2, 18, 2), (4, 8, 16, 32), 128, 4, False),
    "dinat_s_large": ((2, 2, 18, 2), (6, 12, 24, 48), 192, 4, False),
    "dinat_s_large_384": ((2, 2, 18, 2), (6, 12, 24, 48), 192, 4, False),
    # isotropic: (depth, heads, C, mlp) -- 16x16 patches, 12 layers
    "nat_isotropic_small": (12, 12, 384, 4, False),
    "nat_isotropic_base": (12, 24, 768, 4, False),
    "dinat_isotropic_small": (12, 12, 384, 4, False),
    "dinat_isotropic_base": (12, 24, 768, 4, False),
}

# Published parameter counts in millions at 1000 classes, with the precision they were
# published at (NAT: one decimal; DiNAT/DiNAT_s/isotropic: whole millions, DiNAT-L "200M").
PUBLISHED_M = {
    "nat_mini": (20.0, 0.05), "nat_tiny": (27.9, 0.05), "nat_small": (50.7, 0.05),
    "nat_base": (89.8, 0.05),
    "dinat_mini": (20, 0.5), "dinat_tiny": (28, 0.5), "dinat_small": (51, 0.5),
    "dinat_base": (90, 0.5), "dinat_large": (200, 1.0), "dinat_large_384": (200, 1.0),
    "dinat_s_tiny": (28, 0.5), "dinat_s_small": (50, 0.5), "dinat_s_base": (88, 0.5),
    "dinat_s_large": (197, 0.5), "dinat_s_large_384": (197, 0.5),
    "nat_isotropic_small": (22, 0.5), "nat_isotropic_base": (86, 0.5),
    "dinat_isotropic_small": (22, 0.5), "dinat_isotropic_base": (86, 0.5),
}

K = 7  # every published model: kernel 7


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run tiny tensors, where intra-op threads only add synchronization: on a
    busy 2-core machine OpenMP spin-waiting made them up to 60x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _block_keys(prefix, dim, heads, mlp, layer_scale, k=K):
    hidden = int(dim * mlp)
    keys = {
        "norm1.weight": (dim,), "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.rpb": (heads, 2 * k - 1, 2 * k - 1),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (hidden, dim), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (dim, hidden), "mlp.fc2.bias": (dim,),
    }
    if layer_scale:
        keys.update({"gamma1": (dim,), "gamma2": (dim,)})
    return {prefix + n: s for n, s in keys.items()}


def spec_keys(name: str, num_classes: int = 1000, in_chans: int = 3) -> dict:
    """The official state-dict keys and shapes, written from SPEC.md / the official code."""
    keys = {}
    if name in ISOTROPIC:
        depth, heads, c, mlp, ls = SPEC_ARCH[name]
        keys["patch_embed.proj.weight"] = (c, in_chans, 16, 16)
        keys["patch_embed.proj.bias"] = (c,)
        keys["patch_embed.norm.weight"] = keys["patch_embed.norm.bias"] = (c,)
        for j in range(depth):
            keys.update(_block_keys(f"layers.{j}.", c, heads, mlp, ls))
        c_last = c
    else:
        depths, heads, c, mlp, ls = SPEC_ARCH[name]
        swin = name in DINAT_S
        if swin:
            keys["patch_embed.proj.weight"] = (c, in_chans, 4, 4)
            keys["patch_embed.proj.bias"] = (c,)
        else:
            keys["patch_embed.proj.0.weight"] = (c // 2, in_chans, 3, 3)
            keys["patch_embed.proj.0.bias"] = (c // 2,)
            keys["patch_embed.proj.1.weight"] = (c, c // 2, 3, 3)
            keys["patch_embed.proj.1.bias"] = (c,)
        keys["patch_embed.norm.weight"] = keys["patch_embed.norm.bias"] = (c,)
        stage = "layers" if swin else "levels"
        for i, (d, h) in enumerate(zip(depths, heads)):
            dim = c * 2 ** i
            for j in range(d):
                keys.update(_block_keys(f"{stage}.{i}.blocks.{j}.", dim, h, mlp, ls))
            if i < 3:
                p = f"{stage}.{i}.downsample."
                if swin:
                    keys[p + "reduction.weight"] = (2 * dim, 4 * dim)
                    keys[p + "norm.weight"] = keys[p + "norm.bias"] = (4 * dim,)
                else:
                    keys[p + "reduction.weight"] = (2 * dim, dim, 3, 3)
                    keys[p + "norm.weight"] = keys[p + "norm.bias"] = (2 * dim,)
        c_last = c * 8
    keys["norm.weight"] = keys["norm.bias"] = (c_last,)
    keys["head.weight"] = (num_classes, c_last)
    keys["head.bias"] = (num_classes,)
    return keys


def tiny_kwargs(name: str) -> dict:
    """Overrides that shrink a registered config to a few thousand parameters, keeping its
    family's structure (stem, downsampler, layer scale, dilation schedule)."""
    if name == "nat_micro":
        return dict(drop_path_rate=0.0)
    if name in ISOTROPIC:
        return dict(embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.0, num_classes=5)
    return dict(embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 2, 2, 4), drop_path_rate=0.0,
                num_classes=5)


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def in_chans_of(model) -> int:
    return model.pretrained_cfg["input_size"][0]


# -- registry ----------------------------------------------------------------------------

def test_registry_has_every_family():
    assert set(ALL) <= set(list_models())
    assert list_models("dinat_s_*") == sorted(DINAT_S)
    assert list_models("*isotropic*") == sorted(ISOTROPIC)
    assert list_models("nope*") == []


def test_create_model_errors():
    with pytest.raises(ValueError, match="nat_tiny"):
        create_model("nat_tinyy")
    with pytest.raises(TypeError, match="pretrained"):
        create_model("nat_micro", pretrained=True)
    assert create_model("nat_micro", pretrained=False).num_classes == 10  # timm's "no weights"
    with pytest.raises(ValueError, match=r"global_pool must be 'avg' or '' \(no pooling\), "
                                         r"got 'max'"):
        create_model("nat_micro", global_pool="max")
    with pytest.raises(ValueError, match="dilations"):
        create_model("dinat_mini", dilations=[[1], [1], [1], [1]])
    with pytest.raises(ValueError, match="out_indices"):
        create_model("nat_micro", features_only=True, out_indices=(0, 3))
    with pytest.raises(ValueError, match="kernel_size"):
        create_model("nat_micro", kernel_size=(3, 3, 3))
    with pytest.raises(FileNotFoundError):
        create_model("nat_micro", pretrained="/nonexistent/ckpt.pth")


BAD_ARGS = [  # (model, the bad argument, the exception): each error names the argument
    ("nat_mini", dict(depths=3), TypeError),
    ("nat_mini", dict(depths=None), TypeError),
    ("nat_mini", dict(depths=()), ValueError),
    ("nat_mini", dict(num_heads=None), TypeError),
    ("nat_mini", dict(dilations=5), TypeError),
    ("dinat_mini", dict(dilations=5), TypeError),
    ("dinat_mini", dict(dilations=[[1, 1, 1]] * 3), ValueError),
    ("nat_isotropic_small", dict(dilations=5), TypeError),
    ("nat_micro", dict(mlp_ratio=-1), ValueError),
    ("nat_micro", dict(mlp_ratio=0), ValueError),
    ("nat_micro", dict(mlp_ratio=math.inf), ValueError),
    ("nat_micro", dict(mlp_ratio="x"), TypeError),
    ("nat_micro", dict(mlp_ratio=None), TypeError),
    ("nat_micro", dict(mlp_ratio=1e-3), ValueError),  # no hidden unit at width 16
    ("dinat_s_tiny", dict(mlp_ratio=0), ValueError),
    ("nat_micro", dict(drop_path_rate="x"), TypeError),
    ("nat_micro", dict(drop_path_rate=None), TypeError),
    ("nat_micro", dict(drop_path_rate=1.0), ValueError),
    ("nat_micro", dict(attn_drop_rate=-1), ValueError),
    ("nat_micro", dict(drop_rate=math.nan), ValueError),
    ("nat_micro", dict(in_chans=0), ValueError),
    ("nat_micro", dict(in_chans=-1), ValueError),
    ("nat_micro", dict(in_chans=1.5), TypeError),
    ("nat_micro", dict(layer_scale="x"), TypeError),
    ("nat_micro", dict(layer_scale=math.nan), ValueError),
    ("nat_micro", dict(layer_scale=0), ValueError),
    ("nat_micro", dict(num_classes=True), TypeError),
    ("nat_micro", dict(features_only="yes"), TypeError),
    ("nat_micro", dict(img_size=True), TypeError),
    ("nat_isotropic_small", dict(num_classes=True), TypeError),
    ("nat_isotropic_small", dict(mlp_ratio=0), ValueError),
    ("nat_isotropic_small", dict(in_chans=0), ValueError),
    ("nat_isotropic_small", dict(embed_dim=None), TypeError),
    ("nat_isotropic_small", dict(patch_size=0), ValueError),
    ("dinat_isotropic_small", dict(patch_size=0), ValueError),
    ("dinat_isotropic_small", dict(kernel_size=(7, 7)), TypeError),
]


@pytest.mark.parametrize("name, kwargs, exc", BAD_ARGS,
                         ids=[f"{n}-{kw}" for n, kw, _ in BAD_ARGS])
def test_bad_constructor_args_raise_named_errors(name, kwargs, exc):
    (arg, value), = kwargs.items()
    with pytest.raises(exc) as info:
        create_model(name, **kwargs)
    assert arg in str(info.value) and repr(value) in str(info.value)


def _write_truncated(path):
    torch.save(create_model("nat_micro").state_dict(), path)
    path.write_bytes(path.read_bytes()[:2000])


BAD_FILES = {  # kind: (how to write it, exception, text of the message)
    "empty": (lambda p: p.write_bytes(b""), ValueError, "not a readable PyTorch checkpoint"),
    "text": (lambda p: p.write_text("hello world\n"), ValueError, "not a readable PyTorch"),
    "binary": (lambda p: p.write_bytes(bytes(range(256)) * 8), ValueError, "not a readable"),
    "truncated": (_write_truncated, ValueError, "not a readable PyTorch checkpoint"),
    "int_keys": (lambda p: torch.save({1: torch.zeros(1)}, p), ValueError, "str keys"),
    "directory": (lambda p: p.mkdir(), ValueError, "is a directory"),
    "missing": (lambda p: None, FileNotFoundError, "not found"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_pretrained_files_raise_named_errors(tmp_path, kind):
    write, exc, text = BAD_FILES[kind]
    path = tmp_path / "ckpt.pth"
    write(path)
    with pytest.raises(exc, match=text) as info:
        create_model("nat_micro", pretrained=path)
    assert f"pretrained={str(path)!r}" in str(info.value)
    if "readable" in text:   # the reader's own error stays attached
        assert info.value.__cause__ is not None


def test_load_checkpoint_argument_errors():
    model = create_model("nat_micro")
    with pytest.raises(ValueError, match="checkpoint holds no state dict.*str keys.*1"):
        M.load_checkpoint(model, {1: torch.zeros(1)})
    with pytest.raises(TypeError, match="checkpoint must be a path or a state dict"):
        M.load_checkpoint(model, 3)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        M.load_checkpoint({}, {})


BAD_INPUTS = {  # input images: each error names ``x``
    "channels": (torch.randn(1, 4, 32, 32), ValueError),
    "nhwc": (torch.randn(1, 32, 32, 3), ValueError),
    "5d": (torch.randn(1, 3, 2, 32, 32), ValueError),
    "unbatched": (torch.randn(3, 32, 32), ValueError),
    "0x0": (torch.randn(1, 3, 0, 0), ValueError),
    "width0": (torch.randn(1, 3, 32, 0), ValueError),
    "int": (torch.ones(1, 3, 32, 32, dtype=torch.long), TypeError),
    "float64": (torch.randn(1, 3, 32, 32, dtype=torch.float64), TypeError),
    "list": ([[0.0]], TypeError),
}
ENTRY_FAMILIES = ["nat_tiny", "dinat_s_tiny", "nat_isotropic_small"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
@pytest.mark.parametrize("name", ENTRY_FAMILIES)
def test_bad_inputs_raise_named_errors(name, kind):
    x, exc = BAD_INPUTS[kind]
    kw = tiny_kwargs(name)
    model = create_model(name, **kw)
    backbone = create_model(name, features_only=True, **kw | dict(num_classes=0))
    for entry in (model, model.forward_features, model.forward_intermediates, backbone):
        with pytest.raises(exc, match=r"^x (must|has)"):
            entry(x)


@pytest.mark.parametrize("name", ENTRY_FAMILIES)
def test_empty_batch_gives_empty_outputs(name):
    kw = tiny_kwargs(name) | dict(drop_path_rate=0.1)
    x = torch.randn(0, 3, 40, 40)
    assert create_model(name, **kw)(x).shape == (0, 5)
    feats = create_model(name, features_only=True, **kw | dict(num_classes=0))(x)
    assert feats and all(f.shape[0] == 0 for f in feats)


# -- published architectures (meta device: no memory, no time) ----------------------------

@pytest.mark.parametrize("name", sorted(PUBLISHED_M))
def test_param_count_matches_published(name):
    model = meta_model(name)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    published, tol = PUBLISHED_M[name]
    assert abs(n - published) <= tol, f"{name}: {n:.2f}M vs published {published}M"


# Published compute at 224x224 in GMACs (fvcore's "FLOPs"), one decimal: NAT paper Table 1,
# DiNAT paper (DiNAT_s and isotropic variants).
PUBLISHED_GMACS = {"nat_mini": 2.7, "nat_tiny": 4.3, "nat_small": 7.8, "nat_base": 13.7,
                   "dinat_s_tiny": 4.5, "nat_isotropic_small": 4.3}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_compute_matches_published(name):
    """FlopCounterMode over a 224x224 forward, neighborhood attention included through the
    fused op's registered formula (2-4% of the total: without it NAT-Tiny counts 4.1)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = create_model(name).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 224, 224))
    assert round(counter.get_total_flops() / 2e9, 1) == PUBLISHED_GMACS[name]


@pytest.mark.parametrize("name", sorted(SPEC_ARCH))
def test_state_dict_keys_and_shapes_are_official(name):
    model = meta_model(name)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = spec_keys(name)
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert {k: s for k, s in got.items() if want[k] != s} == {}


def test_state_dict_keys_follow_overrides():
    model = meta_model("nat_tiny", num_classes=10, in_chans=1)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == spec_keys("nat_tiny", num_classes=10, in_chans=1)


def test_dinat_dilations_are_the_published_ones():
    spec_224 = [[1, 8, 1], [1, 4, 1, 4], [1, 2] * 9, [1] * 5]   # SPEC.md, 224x224
    assert meta_model("dinat_tiny").dilations == spec_224
    assert meta_model("dinat_large").dilations == spec_224
    assert meta_model("dinat_mini").dilations == [[1, 8, 1], [1, 4, 1, 4], [1, 2, 1, 2, 1, 2],
                                                  [1] * 5]
    # the official 384x384 DiNAT-L and DiNAT_s-L configurations
    assert meta_model("dinat_large_384").dilations == [[1, 13, 1], [1, 6, 1, 6], [1, 3] * 9,
                                                       [1] * 5]
    assert meta_model("dinat_tiny", img_size=384).dilations == [[1, 13, 1], [1, 6, 1, 6],
                                                                [1, 3] * 9, [1] * 5]
    assert meta_model("dinat_s_tiny").dilations == [[1, 8], [1, 4], [1, 2, 1, 2, 1, 2], [1, 1]]
    assert meta_model("dinat_s_large_384").dilations == [[1, 13], [1, 6], [1, 3] * 9, [1, 1]]
    assert meta_model("dinat_isotropic_small").dilations == [1, 2] * 6
    assert meta_model("nat_tiny").dilations == [[1] * d for d in (3, 4, 18, 5)]
    custom = [[1, 2, 1], [1, 2, 1, 2], [1, 3] * 9, [1, 1, 1, 1, 1]]
    model = meta_model("dinat_tiny", dilations=custom)
    assert model.dilations == custom
    assert model.levels[2].blocks[1].attn.dilation == (3, 3)


# -- building blocks against the SPEC -----------------------------------------------------

def test_block_follows_the_spec_formula():
    """x + gamma1 * Attn(LN1(x)), then + gamma2 * MLP(LN2(x)); qkv split as [3, heads, hd]."""
    from natkit import na2d
    F = torch.nn.functional
    blk = NATLayer(12, 3, kernel_size=5, dilation=2, mlp_ratio=2, layer_scale=0.5).eval()
    with torch.no_grad():
        for p in blk.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 11, 13, 12)
    h = F.layer_norm(x, (12,), blk.norm1.weight, blk.norm1.bias)
    q, k, v = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(
        2, 11, 13, 3, 3, 4).unbind(3)
    a = na2d(q, k, v, kernel_size=5, dilation=2, rpb=blk.attn.rpb, scale=4 ** -0.5,
             backend="reference")
    x1 = x + blk.gamma1 * F.linear(a.reshape(2, 11, 13, 12), blk.attn.proj.weight,
                                   blk.attn.proj.bias)
    h = F.layer_norm(x1, (12,), blk.norm2.weight, blk.norm2.bias)
    mlp = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)),
                   blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    torch.testing.assert_close(blk(x), x1 + blk.gamma2 * mlp, rtol=1e-5, atol=1e-5)


def test_patch_merging_concatenation_order():
    """Official (Swin) order: (even row, even col), (odd, even), (even, odd), (odd, odd)."""
    from natkit.models._layers import PatchMerging
    pm = PatchMerging(1)
    seen = []
    pm.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    x = torch.arange(16.0).reshape(1, 4, 4, 1)
    pm(x)
    assert seen[0][0, 0, 0].tolist() == [0.0, 4.0, 1.0, 5.0]
    assert pm(torch.randn(1, 5, 7, 1)).shape == (1, 3, 4, 2)   # odd sides padded


def test_drop_path_drops_whole_samples_and_rescales():
    from natkit.models._layers import drop_path
    x = torch.ones(4000, 3)
    y = drop_path(x, 0.25, training=True)
    assert ((y == 0) | torch.isclose(y, torch.tensor(1 / 0.75))).all()
    assert (y[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert (y == y[:, :1]).all()                      # a sample is dropped as a whole
    assert torch.equal(drop_path(x, 0.25, training=False), x)


# -- forward / backward on shrunken configs -----------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = create_model(name, **tiny_kwargs(name))
    x = torch.randn(2, in_chans_of(model), 45, 61)
    out = model(x)
    assert out.shape == (2, model.num_classes)
    out.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["nat_tiny", "dinat_s_tiny", "dinat_isotropic_small",
                                  "nat_micro"])
def test_backbone_shapes_on_odd_input(name):
    kw = tiny_kwargs(name)
    kw.pop("num_classes", None)
    model = create_model(name, features_only=True, **kw)
    assert not hasattr(model, "head") and not hasattr(model, "norm")
    h, w = 97, 131
    feats = model(torch.randn(1, in_chans_of(model), h, w))
    if name in ISOTROPIC:   # default: the last block, stride 16
        expect = [(16, math.ceil(h / 16), math.ceil(w / 16))]
    else:
        expect = [(c, math.ceil(h / s), math.ceil(w / s)) for c, s in
                  zip([i["num_chs"] for i in model.feature_info],
                      [i["reduction"] for i in model.feature_info])]
        assert [i["reduction"] for i in model.feature_info][:2] == [4, 8]
    assert [tuple(f.shape[1:]) for f in feats] == expect
    for i in model.out_indices:   # each output through its own LayerNorm
        assert isinstance(getattr(model, f"norm{i}"), torch.nn.LayerNorm)
    feats[-1].sum().backward()


def test_backbone_strides_4_8_16_32_and_out_indices():
    model = create_model("dinat_tiny", features_only=True, out_indices=(1, 3),
                         **tiny_kwargs("nat_tiny") | dict(num_classes=0))
    feats = model(torch.randn(1, 3, 97, 131))
    assert [tuple(f.shape) for f in feats] == [(1, 16, 13, 17), (1, 64, 4, 5)]
    assert sorted(k.split(".")[0] for k in model.state_dict() if k.startswith("norm")) == \
        ["norm1", "norm1", "norm3", "norm3"]
    # timm's FeatureInfo accessors describe the outputs; indexing still covers every level
    info = model.feature_info
    assert info.channels() == [f.shape[1] for f in feats] == [16, 64]
    assert info.reduction() == [8, 32] and info.module_name() == ["levels.1", "levels.3"]
    assert info.get_dicts(keys=["num_chs"]) == [{"num_chs": 16}, {"num_chs": 64}]
    assert len(info) == 4 and info[0]["reduction"] == 4 and info.channels(0) == 8
    assert info.reduction([0, 2]) == [4, 16]
    classifier = meta_model("nat_tiny")
    assert classifier.feature_info.reduction() == [4, 8, 16, 32]
    assert classifier.head_hidden_size == classifier.num_features == 512


def test_models_compile_fullgraph_one_after_another():
    """Compiling a second model whose attention has another scale (head dim) made
    torch.compile trace the scale symbolically, which the op's checks must survive."""
    torch._dynamo.reset()
    for name in ("nat_micro", "dinat_tiny", "dinat_isotropic_small"):
        model = create_model(name, **tiny_kwargs(name)).eval()
        x = torch.randn(2, in_chans_of(model), 40, 44)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_intermediates_match_forward():
    model = create_model("dinat_tiny", **tiny_kwargs("dinat_tiny")).eval()
    x = torch.randn(2, 3, 40, 56)
    final, feats = model.forward_intermediates(x)
    assert torch.equal(final, model.forward_features(x))
    assert [tuple(f.shape) for f in feats] == [(2, 8, 10, 14), (2, 16, 5, 7), (2, 32, 3, 4),
                                               (2, 64, 2, 2)]
    last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert all(torch.equal(a, b) for a, b in zip(last2, feats[2:]))
    nhwc = model.forward_intermediates(x, indices=[0], output_fmt="NHWC",
                                       intermediates_only=True)
    assert torch.equal(nhwc[0].permute(0, 3, 1, 2), feats[0])
    normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
    assert torch.allclose(normed[0], final.permute(0, 3, 1, 2))
    # stopping early: the last level run, unnormalized (the final norm is the last level's)
    early, feats1 = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert torch.equal(feats1[0], feats[1]) and torch.equal(early.permute(0, 3, 1, 2), feats[1])
    final3, _ = model.forward_intermediates(x, indices=[3], stop_early=True)
    assert torch.equal(final3, final)
    # pooled features and logits
    pooled = model.forward_head(final, pre_logits=True)
    assert torch.allclose(pooled, final.mean((1, 2)))
    assert torch.allclose(model.forward_head(final), model(x))
    # backbone mode on the same weights: intermediates through the new norms
    backbone = create_model("dinat_tiny", features_only=True, **tiny_kwargs("dinat_tiny"))
    fresh = M.load_checkpoint(backbone, model.state_dict())
    assert sorted(fresh) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    out = backbone.eval()(x)
    for i, (f, g) in enumerate(zip(out, feats)):
        norm = getattr(backbone, f"norm{i}")
        assert torch.allclose(f, norm(g.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), atol=1e-6)


@pytest.mark.parametrize("name", ["dinat_tiny", "dinat_s_tiny", "nat_isotropic_small"])
def test_prune_intermediate_layers_keeps_the_requested_features(name):
    """timm's API: drop what comes after the last requested output; the kept outputs are
    unchanged, and the pruned model still runs forward_features / forward."""
    model = create_model(name, **tiny_kwargs(name)).eval()
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        full = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        levels = len(model.feature_info)
        assert model.prune_intermediate_layers([0, -levels + 1]) == [0, 1]
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(pruned, full))
        assert len(model.feature_info) == 2
        feats = model.forward_features(x)
        assert torch.equal(model.forward_head(feats, pre_logits=True), model(x))
    assert model.num_classes == 0 and isinstance(model.head, torch.nn.Identity)
    width = model.feature_info[1]["num_chs"]
    assert model.num_features == model.head_hidden_size == width == model(x).shape[-1]
    if name in ISOTROPIC:   # every block has the norm's width: it stays, as in timm's ViT
        assert isinstance(model.norm, torch.nn.LayerNorm)
        assert torch.equal(feats, model.norm(full[1].permute(0, 2, 3, 1)))
    else:                   # the norm is sized for the last level: it goes with it
        assert isinstance(model.norm, torch.nn.Identity)
        assert torch.equal(feats.permute(0, 3, 1, 2), full[1])
        assert len(model.stages) == 2 and model.stages[-1].downsample is None
        full_arch = create_model(name, **tiny_kwargs(name))
        assert model.depths == full_arch.depths[:2] and model.dims == full_arch.dims[:2]
    # nothing to cut: the norm and head stay unless asked for
    model = create_model(name, **tiny_kwargs(name))
    assert model.prune_intermediate_layers(indices=1, prune_head=False) == [levels - 1]
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.num_classes > 0
    model.prune_intermediate_layers(indices=1, prune_norm=True)
    assert isinstance(model.norm, torch.nn.Identity) and model.num_classes == 0
    with pytest.raises(ValueError, match="indices"):
        model.prune_intermediate_layers(indices=[levels])


def test_prune_intermediate_layers_of_a_backbone():
    model = create_model("dinat_tiny", features_only=True, out_indices=(1, 3),
                         **tiny_kwargs("dinat_tiny")).eval()
    x = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        before = model(x)
        model.prune_intermediate_layers(2)     # the last two levels: nothing to cut
        assert model.out_indices == [1, 3]
        model.prune_intermediate_layers([1])
        after = model(x)
    assert model.out_indices == [1] and not hasattr(model, "norm3")
    assert sorted({k.split(".")[0] for k in model.state_dict()}) == \
        ["levels", "norm1", "patch_embed"]
    assert model.feature_info.channels() == [16] and torch.equal(after[0], before[0])
    with pytest.raises(ValueError, match="every output"):
        model.prune_intermediate_layers([0])


def test_inputs_smaller_than_the_dilated_kernel_work():
    model = create_model("nat_micro").eval()
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)      # 2x2 then 1x1 tokens, k=3
    model = create_model("dinat_s_tiny", **tiny_kwargs("dinat_s_tiny")).eval()
    assert model(torch.randn(1, 3, 23, 9)).shape == (1, 5)      # dilation 8 on a 6x3 map


def test_bf16_autocast_matches_fp32():
    for name in ("nat_micro", "dinat_tiny"):
        model = create_model(name, **tiny_kwargs(name)).eval()
        x = torch.randn(2, in_chans_of(model), 64, 64)
        with torch.no_grad():
            ref = model(x)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        assert out.dtype == torch.bfloat16
        err = (out.float() - ref).abs().max() / ref.abs().max()
        assert err < 0.05, f"{name}: relative error {err:.3g}"
    model = create_model("dinat_tiny", **tiny_kwargs("dinat_tiny"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(torch.randn(2, 3, 64, 64)).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_grad_checkpointing_gives_the_same_gradients():
    model = create_model("dinat_tiny", **tiny_kwargs("dinat_tiny"))
    iso = create_model("dinat_isotropic_small", **tiny_kwargs("dinat_isotropic_small"))
    for m in (model, iso):
        x = torch.randn(2, 3, 48, 48)
        m(x).square().sum().backward()
        ref = {n: p.grad.clone() for n, p in m.named_parameters()}
        m.zero_grad()
        m.set_grad_checkpointing(True)
        m(x).square().sum().backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_nat_micro_learns_quickly():
    torch.manual_seed(0)
    model = create_model("nat_micro")
    x = torch.randn(32, 1, 32, 32)
    y = torch.randint(0, 10, (32,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# -- timm-style API -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["nat_small", "dinat_s_tiny", "nat_isotropic_small"])
def test_no_weight_decay_is_rpb_and_norms(name):
    model = meta_model(name)
    nwd = model.no_weight_decay()
    names = dict(model.named_parameters())
    assert nwd <= set(names)
    expected = {n for n in names if n.endswith(".rpb") or ".norm" in n or n.startswith("norm")}
    assert nwd == expected
    assert not any(n.endswith(("qkv.weight", "fc1.weight", "gamma1")) for n in nwd)


def _timm_groups(model, coarse):
    """Parameter name -> group ordinal under ``model.group_matcher``, by timm's rule
    (``timm.models.group_parameters``): the first regex that matches gives (matcher
    position, captured numbers, suffix); a suffix of 99999 joins the previous group;
    unmatched names (the head) come last."""
    specs = []
    for pos, spec in enumerate(model.group_matcher(coarse=coarse).values()):
        for regex, suffix in (spec if isinstance(spec, list) else [(spec, None)]):
            specs.append((re.compile(regex), pos, suffix))

    def key(name):
        for regex, pos, suffix in specs:
            m = regex.match(name)
            if m:
                return (pos, *map(int, m.groups()), *(suffix or ()))
        return (math.inf,)
    keys = {n: key(n) for n, _ in model.named_parameters()}
    ordinal, ids = -1, {}
    for k in sorted(set(keys.values())):
        if ordinal < 0 or k[-1] != 99999:
            ordinal += 1
        ids[k] = ordinal
    return {n: ids[k] for n, k in keys.items()}


@pytest.mark.parametrize("name", ["nat_tiny", "dinat_s_tiny", "nat_isotropic_small"])
def test_group_matcher_orders_parameters_by_depth(name):
    """Layer-wise LR decay (timm's ``layer_decay``) needs groups in forward order: the stem,
    one group per block, the final norm with the last block, the head after everything."""
    model = meta_model(name)
    groups = _timm_groups(model, coarse=False)
    blocks = [m for m in model.modules() if isinstance(m, NATLayer)]
    assert max(groups.values()) == len(blocks) + 1
    assert {groups[n] for n in groups if n.startswith("patch_embed.")} == {0}
    assert {groups[n] for n in groups if n.startswith("head.")} == {len(blocks) + 1}
    assert {groups[n] for n in groups if n.startswith("norm.")} == {len(blocks)}
    order = [groups[f"{prefix}.norm1.weight"] for prefix, m in model.named_modules()
             if isinstance(m, NATLayer)]
    assert order == list(range(1, len(blocks) + 1))
    for n, g in groups.items():   # a downsampler joins the last block of its level
        if ".downsample." in n:
            stages, level = n.split(".")[:2]
            last = model.depths[int(level)] - 1
            assert g == groups[f"{stages}.{level}.blocks.{last}.norm1.weight"], n
    coarse = _timm_groups(model, coarse=True)   # the stem, then one group per level
    levels = len(model.depths) if hasattr(model, "depths") else model.depth
    assert max(coarse.values()) == levels + 1


def test_reset_classifier_and_head_free_model():
    model = create_model("nat_micro")
    model.reset_classifier(3)
    assert model.num_classes == 3 and model(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    model.reset_classifier(0)
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 64)   # pooled features
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(-1)
    assert create_model("nat_micro", num_classes=0)(torch.randn(1, 1, 32, 32)).shape == (1, 64)
    # timm's global_pool: "" keeps every position (unpooled features, per-position logits)
    x = torch.randn(2, 1, 32, 32)
    model.reset_classifier(0, "")
    features = model(x)
    assert features.shape == (2, 4, 4, 64) and model.global_pool == ""
    model.reset_classifier(4)  # None keeps the pooling
    assert model(x).shape == (2, 4, 4, 4)
    model.reset_classifier(4, "avg")
    assert torch.allclose(model.forward_head(features, pre_logits=True), features.mean((1, 2)))
    with pytest.raises(ValueError, match="global_pool must be 'avg' or ''"):
        model.reset_classifier(0, "token")
    for name in ("nat_micro", "nat_isotropic_small"):
        m = create_model(name, **{**tiny_kwargs(name), "num_classes": 0, "global_pool": ""})
        assert m(torch.randn(1, m.in_chans, 32, 32)).dim() == 4


def test_pretrained_cfg():
    assert meta_model("nat_tiny").pretrained_cfg["input_size"] == (3, 224, 224)
    assert meta_model("dinat_large_384").pretrained_cfg["input_size"] == (3, 384, 384)
    micro = meta_model("nat_micro")
    assert micro.pretrained_cfg["input_size"] == (1, 32, 32) and micro.num_classes == 10
    assert micro.default_cfg is micro.pretrained_cfg  # timm's older name


# -- checkpoints --------------------------------------------------------------------------

@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "ddp"])
def test_save_load_round_trip(tmp_path, wrap):
    src = create_model("dinat_s_tiny", **tiny_kwargs("dinat_s_tiny")).eval()
    sd = src.state_dict()
    obj = {"bare": sd, "model": {"model": sd, "epoch": 3},
           "state_dict": {"state_dict": sd, "optimizer": {}},
           "ddp": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    dst = create_model("dinat_s_tiny", pretrained=str(path), **tiny_kwargs("dinat_s_tiny"))
    x = torch.randn(2, 3, 37, 29)
    assert torch.equal(src(x), dst.eval()(x))


class _Foreign:
    """An arbitrary pickled object: loading it would run code from the file."""


def test_timm_training_checkpoint_loads_and_foreign_pickles_are_refused(tmp_path):
    import argparse
    sd = create_model("nat_micro").state_dict()
    torch.save({"epoch": 3, "arch": "nat_micro", "state_dict": sd,
                "args": argparse.Namespace(lr=1e-3, model="nat_micro")}, tmp_path / "t.pth")
    model = create_model("nat_micro", pretrained=tmp_path / "t.pth")
    assert torch.equal(model.head.weight, sd["head.weight"])
    torch.save({"state_dict": sd, "extra": _Foreign()}, tmp_path / "p.pth")
    with pytest.raises(ValueError, match="pickled objects"):
        create_model("nat_micro", pretrained=tmp_path / "p.pth")


def test_mismatched_checkpoint_error_lists_the_keys(tmp_path):
    sd = create_model("nat_micro").state_dict()
    del sd["levels.1.blocks.0.attn.proj.bias"]
    sd["levels.0.blocks.0.attn.relative_position_bias_table"] = torch.zeros(3)
    sd["levels.0.blocks.1.mlp.fc1.weight"] = torch.zeros(5, 32)
    torch.save(sd, tmp_path / "bad.pth")
    target = create_model("nat_micro")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        M.load_checkpoint(target, tmp_path / "bad.pth")
    msg = str(info.value)
    assert "levels.1.blocks.0.attn.proj.bias" in msg
    assert "levels.0.blocks.0.attn.relative_position_bias_table" in msg
    assert "levels.0.blocks.1.mlp.fc1.weight: checkpoint (5, 32) vs model (64, 32)" in msg
    assert info.value.missing == ["levels.1.blocks.0.attn.proj.bias"]
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # a different architecture is refused too (no silent partial load)
    with pytest.raises(CheckpointMismatchError, match="gamma1"):
        M.load_checkpoint(target, create_model("nat_micro", layer_scale=1e-5).state_dict())


def test_rpb_of_another_kernel_size_is_interpolated_with_a_warning(tmp_path):
    src = create_model("nat_micro", kernel_size=5)
    sd = src.state_dict()
    for k in sd:
        if k.endswith("rpb"):
            sd[k] = torch.full_like(sd[k], 0.25)   # bicubic keeps a constant table constant
    torch.save(sd, tmp_path / "k5.pth")
    with pytest.warns(UserWarning, match="interpolated 4 relative positional bias"):
        dst = create_model("nat_micro", pretrained=tmp_path / "k5.pth")   # kernel 3
    rpb = dst.levels[0].blocks[0].attn.rpb
    assert rpb.shape == (2, 5, 5)
    torch.testing.assert_close(rpb, torch.full_like(rpb, 0.25))
    assert torch.equal(dst.levels[1].blocks[1].mlp.fc2.weight,
                       sd["levels.1.blocks.1.mlp.fc2.weight"])


def test_failed_load_gives_no_adaptation_warning(tmp_path):
    """The rpb interpolation is announced only once the checkpoint is known to load."""
    torch.save(create_model("nat_micro").state_dict(), tmp_path / "micro.pth")  # kernel 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointMismatchError):
            create_model("nat_micro", kernel_size=5, depths=(2, 3),
                         pretrained=tmp_path / "micro.pth")


@pytest.mark.parametrize("name", ["nat_micro", "dinat_s_tiny"])
def test_rgb_stem_is_adapted_to_other_input_channels(tmp_path, name):
    """timm's rule: summed for 1 channel, repeated and scaled by 3/in_chans otherwise; a
    gray image then gets the RGB model's output (1 channel, or a multiple of 3)."""
    small = tiny_kwargs(name)
    src = create_model(name, **{**small, "in_chans": 3}).eval()
    torch.save(src.state_dict(), tmp_path / "rgb.pth")
    gray = torch.randn(2, 1, 32, 32)
    expected = src(gray.expand(2, 3, 32, 32))
    for in_chans in (1, 6, 5):
        with pytest.warns(UserWarning, match=rf"adapted {src.pretrained_cfg['first_conv']}"
                                             rf"\.weight from 3 input channels to the "
                                             rf"model's {in_chans}"):
            dst = create_model(name, **{**small, "in_chans": in_chans},
                               pretrained=tmp_path / "rgb.pth").eval()
        stem = dst.state_dict()[src.pretrained_cfg["first_conv"] + ".weight"]
        rgb = src.state_dict()[src.pretrained_cfg["first_conv"] + ".weight"]
        if in_chans == 5:
            torch.testing.assert_close(stem, torch.cat([rgb, rgb[:, :2]], 1) * 3 / 5)
        else:
            torch.testing.assert_close(dst(gray.expand(2, in_chans, 32, 32)), expected,
                                       atol=1e-5, rtol=1e-5)


def test_new_num_classes_keeps_a_fresh_head(tmp_path):
    src = create_model("nat_micro")
    torch.save(src.state_dict(), tmp_path / "c10.pth")
    with pytest.warns(UserWarning, match="classifier not loaded"):
        dst = create_model("nat_micro", pretrained=tmp_path / "c10.pth", num_classes=4)
    assert dst.head.weight.shape == (4, 64)
    assert torch.equal(dst.norm.weight, src.norm.weight)
    # without an explicit num_classes, a head mismatch is an error
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        M.load_checkpoint(create_model("nat_micro", num_classes=4), tmp_path / "c10.pth")
    # backbone mode ignores the classifier and the final norm
    backbone = create_model("nat_micro", pretrained=tmp_path / "c10.pth", features_only=True)
    assert torch.equal(backbone.levels[0].blocks[0].attn.qkv.weight,
                       src.levels[0].blocks[0].attn.qkv.weight)
    # a detector's checkpoint (mmdetection layout): its backbone, with trained out norms
    det = {f"backbone.{k}": v + 1 for k, v in backbone.state_dict().items()}
    det["neck.lateral.weight"] = torch.zeros(3)
    torch.save({"state_dict": det, "meta": {}}, tmp_path / "det.pth")
    loaded = create_model("nat_micro", pretrained=tmp_path / "det.pth", features_only=True)
    assert all(torch.equal(v, det[f"backbone.{k}"]) for k, v in loaded.state_dict().items())


# -- Hugging Face transformers layout -----------------------------------------------------

def test_hf_conversion_round_trip(tmp_path):
    src = create_model("nat_tiny", layer_scale=1e-5, **tiny_kwargs("nat_tiny")).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.01)    # make gammas and norms distinctive
    sd = src.state_dict()
    hf = to_hf_state_dict(sd, prefix="dinat")
    dim = 8
    # the transformers names (DinatForImageClassification)
    expect = {
        "dinat.embeddings.patch_embeddings.projection.0.weight": (4, 3, 3, 3),
        "dinat.embeddings.patch_embeddings.projection.1.bias": (8,),
        "dinat.embeddings.norm.weight": (8,),
        "dinat.encoder.levels.0.layers.0.layernorm_before.weight": (dim,),
        "dinat.encoder.levels.0.layers.0.attention.self.query.weight": (dim, dim),
        "dinat.encoder.levels.0.layers.0.attention.self.key.bias": (dim,),
        "dinat.encoder.levels.0.layers.0.attention.self.value.weight": (dim, dim),
        "dinat.encoder.levels.0.layers.0.attention.self.rpb": (1, 13, 13),
        "dinat.encoder.levels.0.layers.0.attention.output.dense.weight": (dim, dim),
        "dinat.encoder.levels.0.layers.0.layernorm_after.bias": (dim,),
        "dinat.encoder.levels.0.layers.0.intermediate.dense.weight": (3 * dim, dim),
        "dinat.encoder.levels.0.layers.0.output.dense.weight": (dim, 3 * dim),
        "dinat.encoder.levels.0.layers.0.layer_scale_parameters": (2, dim),
        "dinat.encoder.levels.0.downsample.reduction.weight": (2 * dim, dim, 3, 3),
        "dinat.encoder.levels.0.downsample.norm.weight": (2 * dim,),
        "dinat.layernorm.weight": (8 * dim,),
        "classifier.weight": (5, 8 * dim),
    }
    assert {k: tuple(hf[k].shape) for k in expect} == expect
    # per block (5): qkv weight+bias -> 6 keys (+4), gamma1+gamma2 -> 1 key (-1)
    assert len(hf) == len(sd) + 5 * (4 - 1)
    q = hf["dinat.encoder.levels.1.layers.1.attention.self.query.weight"]
    assert torch.equal(q, sd["levels.1.blocks.1.attn.qkv.weight"][:16])   # q = first third
    back = from_hf_state_dict(hf)
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # a transformers checkpoint file loads directly, and gives the same outputs
    torch.save(hf, tmp_path / "pytorch_model.bin")
    dst = create_model("nat_tiny", layer_scale=1e-5, pretrained=tmp_path / "pytorch_model.bin",
                       **tiny_kwargs("nat_tiny")).eval()
    x = torch.randn(1, 3, 50, 50)
    assert torch.equal(src(x), dst(x))
    # bare NatModel keys (no prefix, no classifier) and a backbone's output norms
    bare = to_hf_state_dict({k: v for k, v in sd.items() if not k.startswith("head.")},
                            prefix="")
    assert "encoder.levels.0.layers.0.attention.self.query.weight" in bare
    backbone_sd = {"hidden_states_norms.stage1.weight": torch.ones(8),
                   "embeddings.norm.weight": torch.ones(8)}
    assert sorted(from_hf_state_dict(backbone_sd)) == ["norm0.weight", "patch_embed.norm.weight"]


def test_hf_qkv_are_stacked_in_query_key_value_order():
    hf = {f"nat.encoder.levels.0.layers.0.attention.self.{n}.weight": torch.full((2, 2), v)
          for n, v in (("query", 1.0), ("key", 2.0), ("value", 3.0))}
    qkv = from_hf_state_dict(hf)["levels.0.blocks.0.attn.qkv.weight"]
    assert qkv[:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    del hf["nat.encoder.levels.0.layers.0.attention.self.key.weight"]
    with pytest.raises(ValueError, match="query/key/value"):
        from_hf_state_dict(hf)


# -- optional timm integration ------------------------------------------------------------

def test_timm_registration_glue(tmp_path, monkeypatch):
    """Registers with a stand-in for ``timm.models`` (timm needs torchvision, which this
    CPU-only test environment does not have) and calls entrypoints as timm does."""
    registry = {}
    fake = types.SimpleNamespace(is_model=lambda n: n in registry or n == "nat_base",
                                 register_model=lambda fn: registry.setdefault(fn.__name__, fn))
    names = M.register_with_timm(fake)
    assert "nat_tiny" in names and "nat_base" not in names   # existing names left alone
    mod = sys.modules["natkit.models._timm"]
    assert registry["nat_micro"] is getattr(mod, "nat_micro")
    model = registry["nat_micro"](pretrained=False, pretrained_cfg=None,
                                  pretrained_cfg_overlay=None, cache_dir=None, num_classes=3)
    assert model.num_classes == 3
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = registry["nat_micro"](pretrained=True, num_classes=3,
                                   pretrained_cfg_overlay=dict(file=str(tmp_path / "m.pth")))
    assert torch.equal(loaded.head.weight, model.head.weight)
    with pytest.raises(ValueError, match="hosts no weights"):
        registry["nat_micro"](pretrained=True)
    # timm's features_only options: natkit's backbone mode is its "getter"
    backbone = registry["nat_micro"](features_only=True, feature_cls="getter", out_indices=(1,))
    assert backbone.out_indices == [1] and backbone.features_only
    with pytest.raises(ValueError, match="feature_cls='hook' is not supported"):
        registry["nat_micro"](features_only=True, feature_cls="hook")


def test_timm_stays_optional(monkeypatch):
    try:
        import timm
    except Exception:   # not installed (or unusable, e.g. without torchvision)
        timm = None
    if timm is not None:   # natkit.models registered its models when it was imported
        model = timm.create_model("nat_micro", num_classes=7)
        assert isinstance(model, M.NAT) and model.num_classes == 7
    monkeypatch.setitem(sys.modules, "timm", None)   # as if timm were not installed
    assert M.register_with_timm() == []


def test_linear_init_is_trunc_normal_std_002():
    import natkit.models as M
    torch.manual_seed(0)
    model = M.create_model("nat_mini")
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel()
           > 20000]
    assert lin
    for m in lin:
        assert abs(m.weight.std().item() - 0.02) < 0.001
        assert not m.bias.any()


def test_rpb_interpolation_is_bicubic():
    from natkit.models.convert import interpolate_rpb
    torch.manual_seed(0)
    table = torch.randn(2, 9, 9)
    got = interpolate_rpb(table, (13, 13))
    # bicubic (a = -0.75, half-pixel centers) of a quadratic ramp, computed by hand below
    src = torch.arange(9, dtype=torch.float64)
    ramp = (src[:, None] ** 2 + 0 * src[None, :]).float()[None]
    out = interpolate_rpb(ramp, (13, 13))[0, :, 0].double()
    x = (torch.arange(13, dtype=torch.float64) + 0.5) * 9 / 13 - 0.5

    def cubic(t, a=-0.75):
        t = t.abs()
        return torch.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                           torch.where(t < 2, a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a,
                                       torch.zeros_like(t)))
    want = []
    for xi in x:
        base = math.floor(xi)
        s = 0.0
        for j in range(base - 1, base + 3):
            s += cubic(xi - j) * float(src[min(max(j, 0), 8)] ** 2)
        want.append(s)
    torch.testing.assert_close(out, torch.stack(want), atol=1e-4, rtol=0)
    assert got.shape == (2, 13, 13)


def test_backbone_norms_round_trip_through_transformers_names():
    import natkit.models as M
    model = M.create_model("dinat_tiny", features_only=True, embed_dim=16, depths=[1, 1, 1, 1],
                           num_heads=[1, 2, 4, 8], kernel_size=3,
                           dilations=[[1], [1], [1], [1]])
    sd = model.state_dict()
    hf = M.to_hf_state_dict(sd, prefix="")
    assert "hidden_states_norms.stage1.weight" in hf and "hidden_states_norms.stage4.bias" in hf
    assert torch.equal(hf["hidden_states_norms.stage1.weight"], sd["norm0.weight"])
    back = M.from_hf_state_dict(hf)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_drop_path_rates_are_linspace_over_all_blocks():
    import natkit.models as M
    from natkit.models._layers import DropPath
    model = M.create_model("nat_mini", drop_path_rate=0.2)
    rates = [blk.drop_path.p if isinstance(blk.drop_path, DropPath) else 0.0
             for level in model.levels for blk in level.blocks]
    assert len(rates) == 18
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.2, 18))
