"""DINOv2 encoders: parity with Hugging Face's independent Dinov2Model, the original position interpolation, weight
layouts and their errors, sizes, the lightweight head, token masking and layer-wise learning rates."""
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT  # noqa: F401  (repository root on sys.path)
from hrda.backbones import create_backbone, load_pretrained
from hrda.heads import LightweightHead
from hrda.vit import DINOV2_ARCHS, DinoVisionEncoder, convert_dinov2_state_dict, masked_tokens

transformers = pytest.importorskip("transformers")

SMALL = dict(embed_dim=96, depth=2, num_heads=3)  # the DINOv2 block at a width that runs in milliseconds


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def randomise_(model, seed=0):
    "Every parameter drawn afresh (LayerScale and norms too, so that no weight hides behind a constant init)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters(): p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def hf_model(registers: bool, seed: int = 0):
    "Hugging Face's Dinov2Model (or the register variant) at the SMALL size, 518² table, random weights."
    kw = dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, image_size=518, patch_size=14,
              layer_norm_eps=1e-6, mlp_ratio=4)  # the config default eps is 1e-12, the original model's 1e-6
    if registers:
        model = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
    else: model = transformers.Dinov2Model(transformers.Dinov2Config(**kw))
    return randomise_(model, seed).eval()


def ours_from(hf, registers: bool):
    enc = DinoVisionEncoder("vit_tiny14" if not registers else "dinov2_vits14_reg", **SMALL).eval()
    sd, fmt = enc.convert_state_dict(hf.state_dict())
    assert fmt == "huggingface"
    result = enc.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return enc


@pytest.mark.parametrize("registers", [False, True], ids=["plain", "registers"])
def test_parity_with_huggingface_at_the_table_size(registers):
    hf = hf_model(registers)
    enc = ours_from(hf, registers)
    x = torch.randn(2, 3, 518, 518, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
        tokens, grid = enc.tokens(x)
    assert grid == (37, 37) and tokens.shape == ref.shape == (2, 1 + 4 * registers + 1369, 96)
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)
    feats = enc(x)[0]
    torch.testing.assert_close(feats.flatten(2).transpose(1, 2), ref[:, 1 + 4 * registers:], atol=1e-4, rtol=1e-4)


def test_parity_with_huggingface_off_the_table_size_given_the_same_position_embeddings(monkeypatch):
    "Hugging Face interpolates by output size; with our (the original's) interpolation injected, the tokens agree."
    hf = hf_model(False)
    enc = ours_from(hf, False)
    x = torch.randn(1, 3, 280, 224, generator=torch.Generator().manual_seed(2))  # a 20×16 grid
    pos = torch.cat([enc.vit.pos_embed[:, :1], enc.position_embeddings(20, 16)], dim=1).detach()
    monkeypatch.setattr(type(hf.embeddings), "interpolate_pos_encoding", lambda self, emb, h, w: pos)
    with torch.no_grad():
        ref, (tokens, grid) = hf(pixel_values=x).last_hidden_state, enc.tokens(x)
    assert grid == (20, 16)
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)


def test_position_interpolation_is_the_original_formula():
    enc = randomise_(DinoVisionEncoder("vit_tiny14"))
    with torch.no_grad():
        table = enc.vit.pos_embed[:, 1:].reshape(1, 37, 37, 96).permute(0, 3, 1, 2)
        assert torch.equal(enc.position_embeddings(37, 37), enc.vit.pos_embed[:, 1:])  # the stored table itself
        for gh, gw in [(80, 80), (40, 73)]:
            want = F.interpolate(table, scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37), mode="bicubic", antialias=False)
            assert torch.equal(enc.position_embeddings(gh, gw), want.permute(0, 2, 3, 1).reshape(1, gh * gw, 96))
        by_size = F.interpolate(table, size=(80, 80), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 6400, 96)
        assert (by_size - enc.position_embeddings(80, 80)).abs().max() > 1e-3  # timm's and HF's resampling is another


def test_original_and_timm_layouts_load_to_the_same_encoder(tmp_path):
    "The release layout (mask_token, register_tokens, class position in the table) and timm's give the same outputs."
    src = randomise_(DinoVisionEncoder("dinov2_vits14_reg", **SMALL)).eval()
    ours = src.state_dict()
    original = {k.removeprefix("vit."): v for k, v in ours.items() if k.startswith("vit.") and k not in
                ("vit.cls_token", "vit.pos_embed", "vit.reg_token")}
    pos0 = torch.randn(1, 1, 96)
    original.update(cls_token=ours["vit.cls_token"] - pos0, pos_embed=torch.cat([pos0, ours["vit.pos_embed"]], 1),
                    register_tokens=ours["vit.reg_token"], mask_token=ours["mask_token"][0])
    timm_layout = {k.removeprefix("vit."): v for k, v in ours.items() if k != "mask_token"}
    x = torch.randn(1, 3, 70, 84)
    with torch.no_grad(): want = src(x)[0]
    for name, sd, fmt in [("original", original, "original"), ("timm", timm_layout, "timm")]:
        torch.save(sd, tmp_path / f"{name}.pth")
        enc = create_backbone("dinov2_vits14_reg", pretrained=tmp_path / f"{name}.pth", **SMALL).eval()
        with torch.no_grad(): torch.testing.assert_close(enc(x)[0], want, atol=1e-5, rtol=1e-5)
        assert convert_dinov2_state_dict(sd, 4)[1] == fmt
    assert torch.equal(create_backbone("dinov2_vits14_reg", pretrained=tmp_path / "original.pth", **SMALL).mask_token,
                       src.mask_token)


def test_vfm_uda_checkpoint_keys_load():
    src = randomise_(DinoVisionEncoder("vit_tiny14", **SMALL))
    pos0 = src.vit.pos_embed
    lightning = {f"network.encoder.{k.removeprefix('vit.')}": v for k, v in src.state_dict().items()}
    lightning["network.encoder.mask_token"] = src.mask_token.detach()[0]
    lightning["network.out.weight"] = torch.zeros(19, 24, 1, 1)  # the head's keys are not the encoder's
    sd, fmt = convert_dinov2_state_dict(lightning)
    assert fmt == "vfm-uda" and set(sd) == set(src.state_dict())
    assert torch.equal(sd["vit.pos_embed"], pos0.detach())


def test_weight_files_of_another_model_are_refused_in_one_line(tmp_path):
    other = DinoVisionEncoder("vit_tiny14", embed_dim=192, depth=2, num_heads=3).state_dict()
    torch.save(other, tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"width-192, 2-block ViT but the encoder vit_tiny14 is width 96 with 2 blocks"):
        create_backbone("vit_tiny14", pretrained=tmp_path / "wide.pth", **SMALL)
    patch16 = {k: v for k, v in DinoVisionEncoder("vit_tiny14", **SMALL).state_dict().items()}
    patch16["vit.patch_embed.proj.weight"] = torch.zeros(96, 3, 16, 16)
    torch.save(patch16, tmp_path / "p16.pth")
    with pytest.raises(ValueError, match=r"\(16, 16\) patch embedding, not 14x14"):
        create_backbone("vit_tiny14", pretrained=tmp_path / "p16.pth", **SMALL)
    with pytest.raises(FileNotFoundError, match="dinov2_vitb14_pretrain.pth"):
        create_backbone("dinov2_vitb14", pretrained=tmp_path / "missing.pth")
    plain = DinoVisionEncoder("vit_tiny14", **SMALL).state_dict()
    with pytest.raises(ValueError, match="use the dinov2_\\* encoder without _reg"):
        convert_dinov2_state_dict({k.removeprefix("vit."): v for k, v in plain.items()}, num_registers=4)


def test_a_file_without_the_mask_token_is_named(tmp_path):
    import logging
    sd = {k.removeprefix("vit."): v for k, v in DinoVisionEncoder("vit_tiny14", **SMALL).state_dict().items() if k != "mask_token"}
    torch.save(sd, tmp_path / "timm.pth")
    enc = DinoVisionEncoder("vit_tiny14", **SMALL)
    records, handler = [], logging.Handler(logging.WARNING)
    handler.emit = records.append  # the hrda logger does not propagate to the root, where caplog listens
    logging.getLogger("hrda").addHandler(handler)
    try: report = load_pretrained(enc, tmp_path / "timm.pth")
    finally: logging.getLogger("hrda").removeHandler(handler)
    assert report.missing == ["mask_token"] and any("has no mask_token" in r.getMessage() for r in records)


def test_sizes_on_the_meta_device():
    want = {"dinov2_vits14": 22_056_576, "dinov2_vitb14": 86_580_480, "dinov2_vitl14": 304_368_640,
            "dinov2_vitg14": 1_136_480_768, "dinov2_vitb14_reg": 86_582_784}
    for name, n in want.items():
        with torch.device("meta"): enc = DinoVisionEncoder(name)
        assert n_params(enc) == n, name
    assert set(want) | {"vit_tiny14"} <= set(DINOV2_ARCHS)
    assert n_params(LightweightHead((768,), 19)) == 1_811_520 and n_params(LightweightHead((1024,), 19)) == 3_218_176


def test_shapes_at_the_vfm_uda_crop():
    "A 1024² crop is resized to 1120² (80×80 tokens); the lightweight head gives 320² logits."
    with torch.device("meta"):
        enc = DinoVisionEncoder("dinov2_vitb14", input_scale=1.1)
        feats = enc(torch.empty(2, 3, 1024, 1024))
        logits = LightweightHead((768,), 19)(feats)
    assert feats[0].shape == (2, 768, 80, 80) and logits.shape == (2, 19, 320, 320)
    with pytest.raises(ValueError, match="multiples of 14"):
        DinoVisionEncoder("vit_tiny14", **SMALL)(torch.randn(1, 3, 512, 512))


def test_token_masking_fraction_cls_and_eval():
    enc = randomise_(DinoVisionEncoder("vit_tiny14", **SMALL)).train()
    g = torch.Generator().manual_seed(0)
    enc.token_mask_ratio, enc.token_mask_generator = 0.7, g
    mask = enc.draw_token_mask(4, 6400, torch.device("cpu"))
    assert abs(mask.float().mean().item() - 0.7) < 0.01
    x = torch.randn(1, 3, 56, 56)
    model = torch.nn.Module(); model.backbone = enc
    with masked_tokens(model, 1.0, torch.Generator().manual_seed(0)):
        everything_masked = enc(x)[0]
        other_image = enc(torch.randn(1, 3, 56, 56))[0]
    torch.testing.assert_close(everything_masked, other_image)  # the image no longer matters: every patch is the token
    assert enc.token_mask_ratio == 0 and not torch.allclose(enc(x)[0], everything_masked)
    enc.eval()
    with masked_tokens(model, 1.0, None): assert torch.equal(enc(x)[0], enc.eval()(x)[0])  # no-op in eval
    with pytest.raises(ValueError, match="mic_mask=blocks"):
        m = torch.nn.Module(); m.backbone = torch.nn.Identity()
        with masked_tokens(m, 0.5, None): pass


def vit_hrda(**kw):
    from hrda.segmentor import SegmentorConfig, build_segmentor
    cfg = dict(backbone="vit_tiny14", backbone_kwargs=SMALL, head="lightweight", attention_head="lightweight",
               num_classes=4, hr_crop_size=(56, 56), test_crop_size=(112, 112), test_stride=(56, 56))
    torch.manual_seed(0)
    return build_segmentor(SegmentorConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("resize", [False, True], ids=["patch-multiples", "input_scale"])
def test_hrda_on_a_vit_trains_and_slides(resize):
    "Context and detail crops, the scale attention and the overlapping HR slide on a patch-14 encoder."
    kw = {"backbone_kwargs": {**SMALL, "input_scale": 1.1}, "hr_crop_size": (64, 64)} if resize else {}
    model = vit_hrda(**kw)
    crop = 128 if resize else 112  # 112: a 56-px LR input and a 56-px detail crop, both 4 patches
    x, gt = torch.randn(2, 3, crop, crop), torch.randint(0, 4, (2, crop, crop))
    out = model.forward_train(x, gt, generator=torch.Generator().manual_seed(0), return_maps=True)
    assert out["maps"]["lr"].shape[-2:] == (crop // 8,) * 2 and out["maps"]["fused"].shape[-2:] == (crop // 4,) * 2
    out["loss"].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and n != "backbone.mask_token")
    model.eval()
    assert model.size_divisor == (2 if resize else 28)
    with torch.no_grad():
        maps = model.predict_scales(torch.randn(1, 3, 150, 230))
    assert maps["fused"].shape == (1, 4, 150, 230) and maps["attention"].shape[1] == 4


def test_hrda_on_a_vit_refuses_crops_that_do_not_divide_into_patches():
    model = vit_hrda()
    with pytest.raises(ValueError, match=r"0.5x input of a \(128, 128\) training crop is \(64, 64\), not a multiple of the "
                                         r"encoder's 14-px patches"):
        model.forward_train(torch.randn(2, 3, 128, 128), torch.randint(0, 4, (2, 128, 128)), generator=torch.Generator())
    with pytest.raises(ValueError, match=r"detail crop \(hr_crop_size\).*\(48, 48\)"):
        vit_hrda(hr_crop_size=(48, 48)).forward_train(torch.randn(2, 3, 112, 112), torch.randint(0, 4, (2, 112, 112)),
                                                      generator=torch.Generator())


def vfm_uda_lightning_file(path, student, teacher):
    "A VFM-UDA Lightning checkpoint written from two of our single-scale models, under the release's key names."
    def network(model, prefix):
        out = {}
        for k, v in model.state_dict().items():
            if k == "backbone.mask_token": out[prefix + "encoder.mask_token"] = v  # the original (1, D) token
            elif k.startswith("backbone.vit."): out[prefix + "encoder." + k[len("backbone.vit."):]] = v
            elif k.startswith("decode_head.upscale."): out[prefix + k[len("decode_head."):]] = v
            elif k == "decode_head.conv_seg.weight": out[prefix + "out.weight"] = v
            else: raise AssertionError(f"no VFM-UDA name for {k}")
        return out
    torch.save({"epoch": 0, "global_step": 40000, "pytorch-lightning_version": "2.0.3",
                "state_dict": {**network(student, "network."), **network(teacher, "network_ema.")}}, path)
    return path


def test_a_released_vfm_uda_checkpoint_loads_student_or_teacher(tmp_path):
    "The published VFM-UDA models load as --released: encoder, head and classifier, strict, predicting as they did."
    from hrda.predict import load_model
    from hrda.released import ReleasedCheckpointError, load_released_checkpoint
    from hrda.segmentor import SegmentorConfig, build_segmentor
    cfg = SegmentorConfig(backbone="vit_tiny14", backbone_kwargs={**SMALL, "input_scale": 1.1}, head="lightweight",
                          single_scale=1.0, num_classes=19, test_mode="whole")
    student, teacher = (randomise_(build_segmentor(cfg), seed).eval() for seed in (1, 2))
    path = vfm_uda_lightning_file(tmp_path / "vfmuda_base_gta2city.ckpt", student, teacher)
    x = torch.randn(1, 3, 64, 96)
    for which, want in (("student", student), ("teacher", teacher)):
        fresh = build_segmentor(cfg).eval()
        report = load_released_checkpoint(fresh, path, which, strict=True, log=False)
        assert report.loaded == len(want.state_dict()) and report.ignored == len(want.state_dict())
        with torch.no_grad(): torch.testing.assert_close(fresh.inference(x), want.inference(x), atol=0, rtol=0)
    with pytest.raises(ReleasedCheckpointError, match="VFM-UDA checkpoint: it holds a student and a teacher, no imnet"):
        load_released_checkpoint(build_segmentor(cfg), path, "imnet", log=False)
    (tmp_path / "run.yaml").write_text("backbone: vit_tiny14\nbackbone_kwargs: {embed_dim: 96, depth: 2, num_heads: 3, "
                                       "input_scale: 1.1}\nhead: lightweight\nsingle_scale: 1.0\nhr_crop_size: null\ntest_mode: whole\n")
    loaded = load_model(path, tmp_path / "run.yaml", log=False)
    with torch.no_grad(): torch.testing.assert_close(loaded.model.inference(x), student.inference(x), atol=0, rtol=0)
