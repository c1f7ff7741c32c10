"""Backbones: registry loop at tiny inputs, parameter counts, checkpoint formats, loader errors."""
import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import ROOT  # noqa: F401  (repository root on sys.path)
from hrda.backbones import LoadReport, SmallCNN, TimmBackbone, create_backbone, load_pretrained, read_state_dict
from hrda.mit import MIT_CONFIGS, DropPath, MixTransformer, convert_mit_state_dict, to_huggingface_keys

# (name, constructor kwargs) of every backbone family, at sizes that run in well under a second on a CPU
REGISTRY = [
    ("mit_b0", {}),
    ("cnn", {}),
    ("cnn", {"norm": "gn"}),
    ("cnn", {"strides": (2, 4, 8, 16)}),
    ("cnn", {"strides": (4, 8, 8, 8), "widths": (16, 32, 48, 64)}),
    ("timm:resnet18", {}),
]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def seeded(name, seed=0, **kw):
    return create_backbone(name, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("size", [(64, 96), (97, 131)])
@pytest.mark.parametrize("name,kw", REGISTRY, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v.values())))
def test_forward_backward_shapes_and_strides(name, kw, size):
    bb = seeded(name, **kw).train()
    x = torch.randn(2, 3, *size, requires_grad=True)
    feats = bb(x)
    assert len(feats) == 4 == len(bb.out_channels) == len(bb.strides)
    for f, c, s in zip(feats, bb.out_channels, bb.strides):
        assert f.shape == (2, c, math.ceil(size[0] / s), math.ceil(size[1] / s)), (name, f.shape, s)
        assert torch.isfinite(f).all()
    sum(f.square().mean() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in bb.parameters()), name


def test_announced_strides():
    assert seeded("mit_b0").strides == (4, 8, 16, 32)
    assert seeded("cnn", strides=(2, 4, 8, 16)).strides == (2, 4, 8, 16)
    assert TimmBackbone("resnet18", output_stride=8).strides == (4, 8, 8, 8)
    assert TimmBackbone("resnet18", out_indices=(0, 1, 2, 3, 4)).strides == (2, 4, 8, 16, 32)


def test_parameter_counts_on_meta_device():
    with torch.device("meta"):
        counts = {name: n_params(create_backbone(name)) for name in MIT_CONFIGS}
    assert counts["mit_b5"] == 81_443_008  # the original MiT-B5 (SegFormer: 81.4 M)
    assert counts == {"mit_b0": 3_319_392, "mit_b1": 13_151_424, "mit_b2": 24_196_288, "mit_b3": 44_072_128,
                      "mit_b4": 60_842_688, "mit_b5": 81_443_008}
    published = {"mit_b0": 3.3, "mit_b1": 13.2, "mit_b2": 24.2, "mit_b3": 44.0, "mit_b4": 60.8, "mit_b5": 81.4}
    for k, v in counts.items():
        assert abs(v / 1e6 - published[k]) < 0.1, (k, v)
    assert 1_000_000 <= n_params(SmallCNN()) <= 1_500_000


def test_mit_b5_structure_and_key_names():
    with torch.device("meta"):
        b5 = create_backbone("mit_b5")
    keys = set(b5.state_dict())
    assert [len(getattr(b5, f"block{i}")) for i in range(1, 5)] == [3, 6, 40, 3]
    rates = [blk.drop_path.drop_prob for i in range(1, 5) for blk in getattr(b5, f"block{i}")]
    assert len(rates) == 52 and rates[0] == 0 and abs(rates[-1] - 0.1) < 1e-7
    assert all(b > a for a, b in zip(rates, rates[1:]))
    assert {"patch_embed1.proj.weight", "patch_embed4.norm.bias", "block3.39.attn.kv.weight", "block3.39.attn.sr.weight",
            "block1.2.mlp.dwconv.dwconv.weight", "block4.2.mlp.fc2.weight", "norm4.bias"} <= keys
    assert not any(k.startswith("block4.") and (".attn.sr." in k or ".attn.norm." in k) for k in keys)
    assert b5.block1[0].attn.kv.weight.shape == (128, 64)
    assert b5.patch_embed1.proj.kernel_size == (7, 7) and b5.patch_embed2.proj.stride == (2, 2)


def test_mit_init_follows_spec():
    m = MixTransformer(embed_dims=(32, 64, 160, 256), depths=(1, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    w = m.block3[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 2e-3 and m.block3[0].mlp.fc1.bias.abs().sum() == 0
    conv = m.block1[0].mlp.dwconv.dwconv  # fan_out = 3*3*128/128 = 9
    assert abs(conv.weight.std().item() - math.sqrt(2 / 9)) < 0.05
    assert torch.equal(m.norm2.weight, torch.ones(64)) and m.norm2.bias.abs().sum() == 0


def test_generator_reproduces_init_and_leaves_global_rng_alone():
    for name in ["mit_b0", "cnn", "timm:resnet18"]:
        torch.manual_seed(123)
        before = torch.get_rng_state()
        a, b = seeded(name, seed=5), seeded(name, seed=5)
        c = seeded(name, seed=6)
        sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].is_floating_point()), name
        if name != "timm:resnet18":  # our own inits draw only from the generator
            assert torch.equal(before, torch.get_rng_state()), name


def test_drop_path_reproducible_and_off_in_eval():
    bb = seeded("mit_b0", drop_path_rate=0.5).train()
    x = torch.randn(4, 3, 64, 64)
    torch.manual_seed(0); a = bb(x)[-1]
    torch.manual_seed(0); b = bb(x)[-1]
    torch.manual_seed(1); c = bb(x)[-1]
    assert torch.equal(a, b) and not torch.equal(a, c)
    bb.eval()
    with torch.no_grad():
        assert torch.equal(bb(x)[-1], bb(x)[-1])
    assert DropPath(0.0).train()(x) is x


# ---------------------------------------------------------------- checkpoint formats
def _segformer_file(sd, path):
    "The original SegFormer release: wrapped in 'state_dict', with the ImageNet classifier `head.*`."
    torch.save({"state_dict": {**sd, "head.weight": torch.randn(1000, 256), "head.bias": torch.randn(1000)}}, path)


def _hf_dict(sd):
    "The nvidia/mit-b* layout, written here by renaming our keys by hand (independent of to_huggingface_keys)."
    out = {}
    for k, v in sd.items():
        stage, rest = None, k
        if k.startswith("patch_embed"):
            i, rest = int(k[11]) - 1, k[13:]
            rest = rest.replace("norm.", "layer_norm.")
            out[f"segformer.encoder.patch_embeddings.{i}.{rest}"] = v
        elif k.startswith("norm"):
            out[f"segformer.encoder.layer_norm.{int(k[4]) - 1}.{k[6:]}"] = v
        else:
            stage, j, rest = k[5], k.split(".")[1], ".".join(k.split(".")[2:])
            base = f"segformer.encoder.block.{int(stage) - 1}.{j}."
            if rest.startswith("attn.kv."):
                kk, vv = v.chunk(2, 0)
                out[base + "attention.self.key." + rest[8:]] = kk.clone()
                out[base + "attention.self.value." + rest[8:]] = vv.clone()
                continue
            for a, b in [("norm1", "layer_norm_1"), ("norm2", "layer_norm_2"), ("attn.q.", "attention.self.query."),
                         ("attn.sr.", "attention.self.sr."), ("attn.norm.", "attention.self.layer_norm."),
                         ("attn.proj.", "attention.output.dense."), ("mlp.fc1.", "mlp.dense1."),
                         ("mlp.fc2.", "mlp.dense2.")]:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            out[base + rest] = v
    out["classifier.weight"], out["classifier.bias"] = torch.randn(1000, 256), torch.randn(1000)
    return out


@pytest.fixture(scope="module")
def source_mit():
    m = seeded("mit_b0", seed=1).eval()
    with torch.no_grad():  # non-trivial norms, so that a mis-mapped LayerNorm shows in the outputs
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
    return m


@pytest.mark.parametrize("fmt", ["segformer_pth", "segformer_model_key", "hf_bin", "hf_safetensors", "hf_no_prefix",
                                 "mmseg_segformer", "hf_semantic"])
def test_checkpoint_formats_load_completely_and_reproduce_outputs(fmt, source_mit, tmp_path):
    sd, extra = source_mit.state_dict(), {}
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        ref = source_mit(x)
    if fmt == "segformer_pth":
        path = tmp_path / "mit_b0.pth"; _segformer_file(sd, path); expected = "segformer"
    elif fmt == "segformer_model_key":
        path = tmp_path / "mit_b0.pth"; torch.save({"model": dict(sd)}, path); expected = "segformer"
    elif fmt == "mmseg_segformer":  # a SegFormer segmentation checkpoint: backbone.* plus a decode head
        extra = {"decode_head.linear_pred.weight": torch.zeros(19, 256, 1, 1)}
        path = tmp_path / "seg.pth"
        torch.save({"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in sd.items()}, **extra}}, path)
        expected = "segformer"
    else:
        hf = _hf_dict(sd)
        assert set(hf) - {"classifier.weight", "classifier.bias"} == set(to_huggingface_keys(sd))
        if fmt == "hf_no_prefix":
            hf = {k.replace("segformer.", ""): v for k, v in hf.items() if k.startswith("segformer.")}
        if fmt == "hf_semantic":  # SegformerForSemanticSegmentation: encoder plus decode_head.*, no classifier
            hf = {k: v for k, v in hf.items() if k.startswith("segformer.")}
            extra = {"decode_head.classifier.weight": torch.zeros(19, 256, 1, 1)}
            hf.update(extra)
        expected = "huggingface"
        if fmt == "hf_safetensors":
            path = tmp_path / "model.safetensors"; save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
        else:
            path = tmp_path / "pytorch_model.bin"; torch.save(hf, path)
    dst = seeded("mit_b0", seed=2).eval()
    rep = load_pretrained(dst, path, log=False)
    assert isinstance(rep, LoadReport)
    assert (rep.format, rep.missing, rep.unexpected, rep.loaded) == (expected, [], list(extra), len(sd))
    with torch.no_grad():
        for a, b in zip(ref, dst(x)):
            assert torch.allclose(a, b, atol=1e-6), fmt
    if fmt == "hf_safetensors":  # the registry path loads the same weights
        again = create_backbone("mit_b0", pretrained=path).eval()
        with torch.no_grad():
            assert torch.allclose(again(x)[-1], ref[-1], atol=1e-6)


def test_missing_and_unexpected_keys_are_reported(source_mit, tmp_path, caplog):
    sd = dict(source_mit.state_dict())
    sd.pop("norm4.weight"); sd["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"; torch.save(sd, path)
    rep = load_pretrained(seeded("mit_b0"), path, log=False)
    assert rep.missing == ["norm4.weight"] and rep.unexpected == ["extra.weight"]


def test_cnn_and_timm_native_round_trip(tmp_path):
    for name in ["cnn", "timm:resnet18"]:
        src, dst = seeded(name, seed=1).eval(), seeded(name, seed=2).eval()
        path = tmp_path / f"{name.replace(':', '_')}.pth"
        torch.save({"state_dict": src.state_dict()}, path)
        rep = load_pretrained(dst, path, log=False)
        assert rep.missing == [] and rep.unexpected == []
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(src(x)[-1], dst(x)[-1])
    # a bare timm state dict (no `model.` prefix, with the classifier `fc.*`) loads into the wrapper
    src = TimmBackbone("resnet18", generator=torch.Generator().manual_seed(3))
    bare = {k[len("model."):]: v for k, v in src.state_dict().items()}
    bare.update({"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)})
    torch.save(bare, tmp_path / "resnet18.pth")
    rep = load_pretrained(TimmBackbone("resnet18"), tmp_path / "resnet18.pth", log=False)
    assert rep.format == "timm" and rep.missing == [] and sorted(rep.unexpected) == ["model.fc.bias", "model.fc.weight"]


def test_loader_errors(source_mit, tmp_path):
    with pytest.raises(FileNotFoundError, match="nvidia/mit-b5") as e:
        create_backbone("mit_b5", pretrained=tmp_path / "mit_b5.pth")
    assert "mit_b5.pth" in str(e.value) and "SegFormer" in str(e.value)
    bad = tmp_path / "mit_b0.pth"; bad.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        read_state_dict(bad)
    good = tmp_path / "ok.pth"; torch.save(source_mit.state_dict(), good)
    truncated = tmp_path / "truncated.pth"; truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ValueError, match="truncated.pth"):
        read_state_dict(truncated)
    bad_st = tmp_path / "model.safetensors"; bad_st.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        read_state_dict(bad_st)
    lfs = tmp_path / "lfs.pth"; lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(ValueError, match="git lfs pull"):
        read_state_dict(lfs)
    notsd = tmp_path / "list.pth"; torch.save([1, 2, 3], notsd)
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(notsd)
    with pytest.raises(ValueError, match="shape mismatches"):  # B0 weights into a B1
        load_pretrained(create_backbone("mit_b1"), good, log=False)
    hf = _hf_dict(source_mit.state_dict())
    hf.pop("segformer.encoder.block.0.0.attention.self.value.weight")
    with pytest.raises(ValueError, match="kv needs both key and value"):
        convert_mit_state_dict(hf)
    with pytest.raises(ValueError, match="choose one of"):
        create_backbone("resnet50")


@pytest.mark.slow
def test_mit_b5_one_training_step():
    bb = create_backbone("mit_b5", generator=torch.Generator().manual_seed(0)).train()
    assert n_params(bb) == 81_443_008
    opt = torch.optim.SGD(bb.parameters(), lr=0.01)
    x = torch.randn(1, 3, 256, 256)
    feats = bb(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 64, 64), (1, 128, 32, 32), (1, 320, 16, 16), (1, 512, 8, 8)]
    loss = sum(f.square().mean() for f in feats)
    loss.backward()
    opt.step()
    assert all(p.grad is not None for p in bb.parameters())
