"""Decode heads: registry loop on real backbone features, shapes and output strides, parameter counts, key names."""
import math

import pytest
import torch

from conftest import ROOT  # noqa: F401  (repository root on sys.path)
from hrda.backbones import create_backbone
from hrda.heads import HEADS, DAFormerHead, ScaleAttentionHead, create_head

MIT_CHANNELS = (64, 128, 320, 512)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


BACKBONES = [("mit_b0", {}), ("cnn", {"norm": "gn"}), ("cnn", {"strides": (4, 8, 8, 8)})]


@pytest.fixture(scope="module")
def features():
    "Real backbone features (no grad: the backbones' own backward is tested in test_backbones.py) per backbone and size."
    out = {}
    for name, kw in BACKBONES:
        bb = create_backbone(name, generator=gen(), **kw).eval()
        for size in SIZES:
            with torch.no_grad():
                out[f"{name}{sorted(kw.items())}", size] = bb, bb(torch.randn(2, 3, *size, generator=gen(2)))
    return out


SIZES = [(64, 64), (97, 131)]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("head_name", list(HEADS))
def test_every_head_on_every_backbone(head_name, size, features):
    for (key, sz), (bb, feats) in features.items():
        if sz != size:
            continue
        kw = {"in_strides": bb.strides}
        if head_name == "segformer":
            kw |= {"embed_dim": 32, "norm": "gn" if "gn" in key else "bn"}
        elif head_name not in ("dlv2", "lightweight", "pyramid"):
            kw |= {"channels": 32, "embed_dims": 32, "norm": "gn" if "gn" in key else "bn"}
        head = create_head(head_name, bb.out_channels, 5, generator=gen(1), **kw).train()
        feats = [f.clone().requires_grad_() for f in feats]
        out = head(feats)
        level = -1 if head_name in ("dlv2", "lightweight") else 0
        if head_name == "lightweight":  # a ViT head: ×4 the last level; the segmentor resizes to its stride-4 grid
            assert out.shape == (2, 5, *(4 * n for n in feats[-1].shape[-2:])) and head.output_stride == 4
        else:
            assert out.shape == (2, 5, *feats[level].shape[-2:]), (head_name, key, out.shape)
            assert head.output_stride == bb.strides[level]
            assert out.shape[-2:] == tuple(math.ceil(s / head.output_stride) for s in size)
        out.logsumexp(1).mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters()), (head_name, key)
        used = [level] if head_name in ("dlv2", "lightweight") else range(4)
        assert all(feats[i].grad is not None and feats[i].grad.abs().sum() > 0 for i in used), (head_name, key)


def test_parameter_counts_for_mit_b5_channels():
    assert n_params(create_head("daformer", MIT_CHANNELS, 19)) == 3_712_275  # the original DAFormer head
    assert n_params(create_head("attention", MIT_CHANNELS, 19)) == 530_707  # the original scale-attention head
    assert n_params(create_head("attention", MIT_CHANNELS, 19, classwise=False)) == 530_707 - 18 * 257
    assert n_params(create_head("segformer", MIT_CHANNELS, 19, embed_dim=768)) == 3_164_947
    assert n_params(create_head("dlv2", (256, 512, 1024, 2048), 19)) == 2 * (2048 * 19 * 9 + 19)
    with torch.device("meta"):
        student = [create_backbone("mit_b5"), create_head("daformer", MIT_CHANNELS, 19),
                   create_head("attention", MIT_CHANNELS, 19)]
    assert round(sum(map(n_params, student)) / 1e6, 2) == 85.69  # total student parameters


def test_daformer_and_attention_keys_match_the_original():
    d = {k for k in DAFormerHead(MIT_CHANNELS, 19).state_dict()}
    expected = {f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected |= {"fuse_layer.aspp_modules.0.conv.weight"} | {f"fuse_layer.aspp_modules.0.bn.{p}" for p in bn}
    for i in (1, 2, 3):
        for part in ("depthwise_conv", "pointwise_conv"):
            expected |= {f"fuse_layer.aspp_modules.{i}.{part}.conv.weight"}
            expected |= {f"fuse_layer.aspp_modules.{i}.{part}.bn.{p}" for p in bn}
    expected |= {"fuse_layer.bottleneck.conv.weight"} | {f"fuse_layer.bottleneck.bn.{p}" for p in bn}
    expected |= {"conv_seg.weight", "conv_seg.bias"}
    assert d == expected
    a = set(ScaleAttentionHead(MIT_CHANNELS, 19).state_dict())
    assert a == ({f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")}
                 | {"fuse_layer.conv.weight"} | {f"fuse_layer.bn.{p}" for p in bn} | {"conv_seg.weight", "conv_seg.bias"})


def test_daformer_structure_details():
    h = DAFormerHead(MIT_CHANNELS, 19)
    aspp = h.fuse_layer.aspp_modules
    assert [m.depthwise_conv.conv.dilation[0] for m in aspp[1:]] == [6, 12, 18]
    assert all(m.depthwise_conv.conv.groups == 1024 and m.depthwise_conv.conv.padding == m.depthwise_conv.conv.dilation
               for m in aspp[1:])
    assert aspp[0].conv.kernel_size == (1, 1) and h.fuse_layer.bottleneck.conv.kernel_size == (3, 3)
    assert all(m.bias is None for m in h.fuse_layer.modules() if isinstance(m, torch.nn.Conv2d))
    assert isinstance(h.dropout, torch.nn.Dropout2d) and h.dropout.p == 0.1
    assert h.conv_seg.bias is not None and h.conv_seg.bias.abs().sum() == 0


def test_eval_is_deterministic_and_dropout_acts_in_train():
    h = create_head("daformer", (16, 32, 48, 64), 3, channels=16, embed_dims=16, generator=gen(3))
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i) for i, c in enumerate((16, 32, 48, 64))]
    h.eval()
    with torch.no_grad():
        a, b = h(feats), h(feats)
    assert torch.equal(a, b)
    h.train()
    torch.manual_seed(0)
    with torch.no_grad():
        c = h(feats)
    assert not torch.allclose(a, c)


def test_gn_heads_work_with_batch_one():
    feats = [torch.randn(1, c, 8 // 2**i or 1, 8 // 2**i or 1) for i, c in enumerate((8, 16, 24, 32))]
    for name in ("daformer", "attention", "segformer"):
        out = create_head(name, (8, 16, 24, 32), 2, norm="gn").train()(feats)
        assert out.shape == (1, 2, 8, 8) and torch.isfinite(out).all()


def test_errors():
    with pytest.raises(ValueError, match="choose one of daformer, attention, segformer, dlv2"):
        create_head("uper", MIT_CHANNELS, 19)
    with pytest.raises(ValueError, match="choose 'bn'"):
        create_head("daformer", MIT_CHANNELS, 19, norm="syncbn")
    with pytest.raises(ValueError, match="choose 'aspp' or 'conv'"):
        create_head("daformer", MIT_CHANNELS, 19, fusion="mlp")
