"""HRDA segmentor: shapes, fusion identities, losses, slide inference, released-checkpoint loading (HRDA paper §3.2-3.4)."""
import math

import pytest
import torch
import torch.nn.functional as F

from hrda.backbones import create_backbone
from hrda.core import IGNORE_INDEX, make_generator
from hrda.crops import slide_boxes, window_counts
from hrda.heads import create_head
from hrda.released import load_released_checkpoint, save_mmseg_checkpoint
from hrda.segmentor import EncoderDecoder, HRDAEncoderDecoder, SegmentorConfig, build_segmentor, fuse, seg_ce_loss

K = 19


def small_model(seed=0, widths=(8, 16, 24, 32), head_ch=16, **kw):
    "A tiny HRDA model: the from-scratch CNN backbone and narrow DAFormer/attention heads."
    cfg = SegmentorConfig(**{"backbone": "cnn", "backbone_kwargs": {"widths": widths, "depths": (1, 1, 1, 1)},
                             "head_kwargs": {"channels": head_ch, "embed_dims": head_ch},
                             "attention_head_kwargs": {"channels": head_ch, "embed_dims": head_ch}, **kw})
    torch.manual_seed(seed)
    return build_segmentor(cfg)


def reduced(**kw):
    "The original geometry scaled down 4x: 256² context crops, 128² detail crops, 256² test windows with stride 128."
    return small_model(**{"hr_crop_size": (128, 128), "test_crop_size": (256, 256), "test_stride": (128, 128), **kw})


def record_backbone_inputs(model):
    calls = []
    model.backbone.register_forward_hook(lambda mod, args, out: calls.append(tuple(args[0].shape)))
    return calls


@pytest.fixture(scope="module")
def meta_hrda():
    "The full MiT-B5 HRDA model on the 'meta' device: real shapes, no compute."
    with torch.device("meta"):
        return build_segmentor(SegmentorConfig())


@pytest.fixture(scope="module")
def batch():
    g = make_generator(0)
    return torch.randn(2, 3, 256, 256, generator=g), torch.randint(0, K, (2, 256, 256), generator=g)


# ---------------------------------------------------------------- shapes

def test_full_size_training_shapes_on_meta(meta_hrda):
    assert sum(p.numel() for p in meta_hrda.parameters()) == 81_443_008 + 3_712_275 + 530_707
    img = torch.zeros(2, 3, 1024, 1024, device="meta")
    gt = torch.zeros(2, 1024, 1024, dtype=torch.long, device="meta")
    out = meta_hrda.forward_train(img, gt, generator=make_generator(0), return_maps=True, return_features=True)
    m = out["maps"]
    for k in ("lr", "hr", "attention"): assert m[k].shape == (2, K, 128, 128), k
    assert m["fused"].shape == (2, K, 256, 256)
    assert [f.shape[1:] for f in out["features"]] == [(64, 128, 128), (128, 64, 64), (320, 32, 32), (512, 16, 16)]
    y1, y2, x1, x2 = out["box"]
    assert (y2 - y1, x2 - x1) == (512, 512) and all(v % 8 == 0 for v in out["box"])  # box/8 and box/4 are integers


def test_full_size_inference_batches_windows_on_meta(meta_hrda):
    calls = record_backbone_inputs(meta_hrda)
    meta_hrda.eval()
    with torch.no_grad():
        assert meta_hrda.encode_decode(torch.zeros(2, 3, 1024, 1024, device="meta")).shape == (2, K, 1024, 1024)
        assert calls == [(20, 3, 512, 512)]  # the LR context and 9 HR windows x 2 images: one backbone pass
        calls.clear()
        assert meta_hrda.inference(torch.zeros(1, 3, 1024, 2048, device="meta")).shape == (1, K, 1024, 2048)
        assert calls == [(30, 3, 512, 512)]  # 3 outer windows, each a context and 9 detail windows, in one batch


def test_training_shapes_reduced_and_exact_1024(batch):
    img, gt = batch
    out = reduced().forward_train(img, gt, generator=make_generator(1), return_maps=True)
    assert [tuple(out["maps"][k].shape) for k in ("lr", "hr", "attention", "fused")] == \
        [(2, K, 32, 32), (2, K, 32, 32), (2, K, 32, 32), (2, K, 64, 64)]
    model = small_model(widths=(4, 4, 4, 4), head_ch=4)
    g = make_generator(2)
    big = model.forward_train(torch.randn(1, 3, 1024, 1024, generator=g), torch.randint(0, K, (1, 1024, 1024), generator=g),
                              generator=g, return_maps=True)
    assert big["maps"]["hr"].shape == (1, K, 128, 128) and big["maps"]["fused"].shape == (1, K, 256, 256)


# ---------------------------------------------------------------- fusion identities

def manual_lr_hr(model, img):
    "LR logits and HR sliding-window logits computed window by window, independently of the segmentor's code."
    lr = model.decode_head(model.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False)))
    H, W = img.shape[-2:]
    acc, cnt = torch.zeros(img.shape[0], K, H // 4, W // 4), torch.zeros(H // 4, W // 4)
    for y in range(0, H - 128 + 1, 64):
        for x in range(0, W - 128 + 1, 64):
            acc[..., y // 4:(y + 128) // 4, x // 4:(x + 128) // 4] += model.decode_head(model.backbone(img[..., y:y + 128, x:x + 128]))
            cnt[y // 4:(y + 128) // 4, x // 4:(x + 128) // 4] += 1
    return lr, acc / cnt


def test_fixed_attention_selects_lr_or_stitched_hr(batch):
    img = batch[0]
    model = reduced().eval()
    with torch.no_grad():
        lr, hr = manual_lr_hr(model, img)
        up_lr = F.interpolate(lr, size=(64, 64), mode="bilinear", align_corners=False)
        for a, expected in ((0.0, up_lr), (1.0, hr)):
            fused = model.encode_decode(img, fixed_attention=a)
            want = F.interpolate(expected, size=(256, 256), mode="bilinear", align_corners=False)
            assert torch.allclose(fused, want, atol=1e-5), a
        maps = model.encode_decode(img, return_maps=True)
        assert not torch.allclose(maps["fused"], maps["lr"], atol=1e-3)  # the learned attention mixes both


def test_training_fused_equals_lr_outside_box_band(batch):
    img, gt = batch
    model = reduced()
    for seed in range(3):
        out = model.forward_train(img, gt, generator=make_generator(seed), return_maps=True)
        m, (y1, y2, x1, x2) = out["maps"], out["box"]
        up_lr = F.interpolate(m["lr"], size=(64, 64), mode="bilinear", align_corners=False)
        outside = torch.ones(64, 64, dtype=torch.bool)
        outside[max(y1 // 4 - 1, 0):y2 // 4 + 1, max(x1 // 4 - 1, 0):x2 // 4 + 1] = False  # box (HR cells) + 1-cell band
        assert torch.equal(m["attention"].flatten(2).amax(2) > 0, torch.ones(2, K, dtype=torch.bool))
        assert torch.allclose(m["fused"][..., outside], up_lr[..., outside], atol=1e-6)
        inside = m["fused"][..., y1 // 4 + 1:y2 // 4 - 1, x1 // 4 + 1:x2 // 4 - 1]
        assert not torch.allclose(inside, up_lr[..., y1 // 4 + 1:y2 // 4 - 1, x1 // 4 + 1:x2 // 4 - 1], atol=1e-4)


def test_fuse_masks_at_lr_resolution_and_scales_lr_before_upsampling():
    g = make_generator(3)
    lr, hr, att = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g), torch.rand(1, 2, 4, 4, generator=g)
    box = (0, 2, 2, 4)
    mask = torch.zeros(1, 1, 4, 4); mask[..., 0:2, 2:4] = 1
    a = att * mask
    up = lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    hr_ins = torch.zeros(1, 2, 8, 8); hr_ins[..., 0:4, 4:8] = hr
    assert torch.allclose(fuse(lr, hr, att, box, 2), up(a) * hr_ins + up((1 - a) * lr), atol=1e-6)


# ---------------------------------------------------------------- slide windows

def test_slide_window_and_overlap_counts():
    boxes = slide_boxes((1024, 1024), (512, 512), (256, 256))
    assert len(boxes) == 9 and {b[0] for b in boxes} == {0, 256, 512}
    assert set(window_counts(boxes, (1024, 1024)).unique().tolist()) == {1.0, 2.0, 4.0}
    assert len(slide_boxes((1024, 1024), (512, 512), (512, 512))) == 4
    assert [b[2] for b in slide_boxes((1024, 2048), (1024, 1024), (512, 512))] == [0, 512, 1024]


def test_outer_slide_averages_windows(batch):
    model = reduced().eval()
    wide = torch.randn(1, 3, 256, 512, generator=make_generator(4))
    calls = record_backbone_inputs(model)
    with torch.no_grad():
        full = model.inference(wide)
        assert calls == [(3, 3, 128, 128), (27, 3, 128, 128)]
        left, mid = model.encode_decode(wide[..., :256]), model.encode_decode(wide[..., 128:384])
    assert torch.allclose(full[..., :128], left[..., :128], atol=1e-5)
    assert torch.allclose(full[..., 128:256], (left[..., 128:] + mid[..., :128]) / 2, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(model.inference(wide, mode="whole"), model.encode_decode(wide), atol=1e-6)


def test_odd_sizes_give_full_size_predictions():
    model = small_model(widths=(4, 4, 4, 4), head_ch=4).eval()
    img = torch.randn(1, 3, 1000, 1999, generator=make_generator(5))
    with torch.no_grad():
        assert model.inference(img).shape == (1, K, 1000, 1999)
        assert model.encode_decode(img[..., :300, :333]).shape == (1, K, 300, 333)
        maps = model.predict_scales(img[..., :250, :517], mode="whole")
    assert {k: tuple(v.shape[-2:]) for k, v in maps.items()} == {k: (250, 517) for k in maps}
    assert maps["attention_pred"].shape[1] == 1 and 0 <= float(maps["attention_pred"].min()) <= float(maps["attention_pred"].max()) <= 1


# ---------------------------------------------------------------- losses

def test_ce_mean_over_all_pixels_including_ignored():
    g = make_generator(6)
    logits, label = torch.randn(2, 5, 16, 16, generator=g), torch.randint(0, 5, (2, 16, 16), generator=g)
    half = label.clone(); half[:, 8:] = IGNORE_INDEX
    valid_mean = F.cross_entropy(logits, half, ignore_index=IGNORE_INDEX)
    loss, acc = seg_ce_loss(logits, half)
    assert torch.allclose(loss, valid_mean / 2, atol=1e-6)
    assert acc <= 50.0  # accuracy counts ignored pixels as wrong
    up = seg_ce_loss(torch.randn(1, 5, 4, 4, generator=g), torch.zeros(1, 16, 16, dtype=torch.long))[0]  # resized first
    assert up.ndim == 0 and torch.isfinite(up)


def test_loss_combination_and_detail_crop_of_label_and_weight(batch):
    img, gt = batch
    model = reduced()
    out = model.forward_train(img, gt, generator=make_generator(7), return_maps=True)
    y1, y2, x1, x2 = out["box"]
    m = out["maps"]
    fused_l = seg_ce_loss(m["fused"], gt)[0]
    detail_l = seg_ce_loss(m["hr"], gt[:, y1:y2, x1:x2])[0]
    assert math.isclose(out["loss"].item(), 0.9 * fused_l.item() + 0.1 * detail_l.item(), rel_tol=1e-5)
    assert math.isclose(out["logs"]["hr.loss_seg"], 0.1 * detail_l.item(), rel_tol=1e-5)
    weight = torch.ones(2, 256, 256); weight[:, y1:y2, x1:x2] = 0  # same box: same generator state
    out_w = model.forward_train(img, gt, weight, generator=make_generator(7))
    assert out_w["box"] == out["box"] and out_w["logs"]["hr.loss_seg"] == 0.0 and out_w["logs"]["loss_seg"] > 0
    lr_model = reduced(lr_loss_weight=0.1)
    logs = lr_model.forward_train(img, gt, generator=make_generator(7))["logs"]
    assert set(logs) == {"loss_seg", "acc_seg", "hr.loss_seg", "hr.acc_seg", "lr.loss_seg", "lr.acc_seg"}


def test_forward_backward_reaches_every_parameter(batch):
    img, gt = batch
    model = reduced()
    out = model(img, gt, generator=make_generator(8), return_features=True)  # forward() routes to forward_train
    assert len(out["features"]) == 4 and out["features"][0].shape[-1] == 32  # LR context features (for FD)
    out["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_boxes_follow_the_generator(batch):
    img, gt = batch
    model = reduced()
    boxes = [model.forward_train(img, gt, generator=make_generator(s))["box"] for s in range(6)]
    assert boxes[0] == model.forward_train(img, gt, generator=make_generator(0))["box"]
    assert len(set(boxes)) > 1 and all(b[0] % 8 == 0 and b[2] % 8 == 0 and b[0] <= 120 for b in boxes)


# ---------------------------------------------------------------- variants

def test_single_scale_mode_one_pass(batch):
    img, gt = batch
    model = small_model(single_scale=0.5)
    assert type(model) is EncoderDecoder and not hasattr(model, "attention_head")
    assert isinstance(small_model(), HRDAEncoderDecoder)
    calls = record_backbone_inputs(model)
    out = model.forward_train(img, gt, generator=make_generator(0))
    assert calls == [(2, 3, 128, 128)] and set(out["logs"]) == {"loss_seg", "acc_seg"}
    with torch.no_grad():
        assert model.eval().encode_decode(img[..., :200, :230]).shape == (2, K, 200, 230)


def test_blur_hr_crop_feeds_blurred_detail(batch):
    img, gt = batch
    model = reduced(blur_hr_crop=True)
    calls = []
    model.backbone.register_forward_hook(lambda mod, args, out: calls.append(args[0]))
    box = model.forward_train(img, gt, generator=make_generator(9))["box"]
    crop = img[..., box[0]:box[1], box[2]:box[3]]
    blurred = F.interpolate(F.interpolate(crop, scale_factor=0.5, mode="bilinear", align_corners=False),
                            scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(calls[1], blurred) and not torch.allclose(calls[1], crop)


def test_not_classwise_attention_and_fixed_attention_training(batch):
    img, gt = batch
    model = reduced(attention_classwise=False)
    assert model.attention_head.conv_seg.out_channels == 1
    assert model.forward_train(img, gt, generator=make_generator(0), return_maps=True)["maps"]["attention"].shape[1] == 1
    fixed = reduced(fixed_attention=0.5).forward_train(img, gt, generator=make_generator(0), return_maps=True)
    a, (y1, y2, x1, x2) = fixed["maps"]["attention"], fixed["box"]
    assert a[..., y1 // 8:y2 // 8, x1 // 8:x2 // 8].unique().tolist() == [0.5] and a.sum() == 0.5 * 2 * (y2 - y1) * (x2 - x1) / 64


# ---------------------------------------------------------------- released checkpoints

def original_keys(depths, attention=True):
    "The exact mmseg key names of an HRDA MiT + DAFormer model, written out from the original code."
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    wb = ["weight", "bias"]
    keys = []
    for s in range(1, 5):
        keys += [f"backbone.patch_embed{s}.{m}.{p}" for m in ("proj", "norm") for p in wb]
        for j in range(depths[s - 1]):
            mods = ["norm1", "attn.q", "attn.kv", "attn.proj", "norm2", "mlp.fc1", "mlp.dwconv.dwconv", "mlp.fc2"]
            if s < 4: mods += ["attn.sr", "attn.norm"]
            keys += [f"backbone.block{s}.{j}.{m}.{p}" for m in mods for p in wb]
        keys += [f"backbone.norm{s}.{p}" for p in wb]
    head = [f"embed_layers.{i}.proj.{p}" for i in range(4) for p in wb] + [f"conv_seg.{p}" for p in wb]
    seg = head + ["fuse_layer.aspp_modules.0.conv.weight"] + [f"fuse_layer.aspp_modules.0.bn.{p}" for p in bn]
    for i in (1, 2, 3):
        for part in ("depthwise_conv", "pointwise_conv"):
            seg += [f"fuse_layer.aspp_modules.{i}.{part}.conv.weight"] + [f"fuse_layer.aspp_modules.{i}.{part}.bn.{p}" for p in bn]
    seg += ["fuse_layer.bottleneck.conv.weight"] + [f"fuse_layer.bottleneck.bn.{p}" for p in bn]
    att = head + ["fuse_layer.conv.weight"] + [f"fuse_layer.bn.{p}" for p in bn]
    keys += ["decode_head.head." + k for k in seg]
    if attention: keys += ["decode_head.scale_attention." + k for k in att]
    return keys


def mit_b0_hrda(seed):
    torch.manual_seed(seed)
    cfg = SegmentorConfig(backbone="mit_b0", hr_crop_size=(64, 64), test_crop_size=(128, 128), test_stride=(64, 64),
                          head_kwargs={"channels": 32, "embed_dims": 32},
                          attention_head_kwargs={"channels": 32, "embed_dims": 32})
    return build_segmentor(cfg)


def test_released_checkpoint_round_trip_with_original_keys(tmp_path):
    student, teacher, fresh = mit_b0_hrda(0), mit_b0_hrda(1), mit_b0_hrda(2)
    keys = original_keys((2, 2, 2, 2))
    path = save_mmseg_checkpoint(tmp_path / "iter_40000_relevant.pth", student, teacher, {"iter": 40000})
    state = torch.load(path, weights_only=True)["state_dict"]
    assert sorted(state) == sorted(["model." + k for k in keys] + ["ema_model." + k for k in keys])
    # a file written by hand with the original names, plus an imnet model, loads strictly
    ours = student.state_dict()
    ours_name = lambda k: k.replace("decode_head.head.", "decode_head.").replace("decode_head.scale_attention.", "attention_head.")
    own = {"model." + k: ours[ours_name(k)] for k in keys}
    own.update({"imnet_model." + k: torch.zeros_like(ours[ours_name(k)]) for k in keys})
    torch.save({"meta": {"CLASSES": ["road"] * K}, "state_dict": own}, tmp_path / "hand.pth")
    report = load_released_checkpoint(fresh, tmp_path / "hand.pth", strict=True, log=False)
    assert (report.missing, report.unexpected, report.loaded, report.ignored) == ([], [], len(keys), len(keys))
    img = torch.randn(1, 3, 128, 128, generator=make_generator(0))
    with torch.no_grad():
        assert torch.equal(fresh.eval().encode_decode(img), student.eval().encode_decode(img))
        load_released_checkpoint(fresh, path, which="teacher", strict=True, log=False)
        assert torch.equal(fresh.encode_decode(img), teacher.eval().encode_decode(img))


def test_broken_and_foreign_checkpoints_fail_clearly(tmp_path):
    model = reduced()
    path = save_mmseg_checkpoint(tmp_path / "ok.pth", model)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or not a PyTorch checkpoint"):
        load_released_checkpoint(model, tmp_path / "cut.pth")
    torch.save({"state_dict": {"foo.bar": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="holds no student segmentor weights"):
        load_released_checkpoint(model, tmp_path / "foreign.pth")
    with pytest.raises(ValueError, match="holds no teacher segmentor weights.*only the student"):
        load_released_checkpoint(model, path, which="teacher")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_released_checkpoint(reduced(num_classes=7), path)


@pytest.mark.slow
def test_mit_b5_hrda_forward_backward_cpu():
    "The real model at a reduced crop (256² context) trains one step on the CPU (tens of seconds)."
    cfg = SegmentorConfig(hr_crop_size=(128, 128))
    model = build_segmentor(cfg)
    g = make_generator(0)
    img, gt = torch.randn(1, 3, 256, 256, generator=g), torch.randint(0, K, (1, 256, 256), generator=g)
    out = model.forward_train(img, gt, generator=g)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.attention_head.conv_seg.weight.grad is not None


@pytest.mark.parametrize("backbone,head_norm", [("mit_b0", "bn"), ("cnn_gn", "gn")])
def test_context_and_detail_windows_share_one_backbone_pass(backbone, head_norm):
    "HR slide inference puts the context and its windows through one backbone pass: the maps of two passes, to rounding."
    kw = ({"backbone": "mit_b0", "backbone_kwargs": {}} if backbone == "mit_b0"
          else {"backbone_kwargs": {"widths": (8, 16, 24, 32), "depths": (1, 1, 1, 1), "norm": "gn"}})
    heads = {"channels": 16, "embed_dims": 16, "norm": head_norm}
    model = reduced(**kw, head_kwargs=heads, attention_head_kwargs=heads).eval()
    assert model.backbone_per_sample and model.heads_per_sample == (head_norm == "gn")
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    calls = []
    model.backbone.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad():
        one = model.maps(x)
        model.backbone_per_sample = False
        two = model.maps(x)
    assert calls == [2 + 2 * 9, 2, 2 * 9]  # context + 9 overlapping windows per image in one pass, then apart
    for key in ("lr", "hr", "attention", "fused"):
        torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=1e-5)
