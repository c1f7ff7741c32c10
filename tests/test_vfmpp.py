"""VFM-UDA++ on a tiny ViT-Adapter: the distillation of a frozen DINOv2's features (two extra passes that train the
projection head and the encoder), strong source augmentation, pixel-block masking, the loading of released
checkpoints in the original layout, the refusals that name their fix, and a bit-exact resume."""
import copy
import sys

import pytest
import torch

from conftest import ROOT
from hrda.backbones import create_backbone
from hrda.config import TrainConfig, load_config
from hrda.core import make_generator
from hrda.dacs import DACSConfig, dacs_step, ema_init_
from hrda.features import FrozenFeatureTarget
from hrda.optim import build_optimizer, layerwise_param_groups
from hrda.released import load_released_checkpoint
from hrda.scenes import SYNTH_TRAIN_IDS
from hrda.segmentor import SegmentorConfig, build_segmentor

sys.path.insert(0, str(ROOT / "tests"))
from ddp_worker import SMALL  # noqa: E402
from test_train import restore_torch_globals, tensors_equal  # noqa: E402,F401  (the fixture restores torch's globals)
from test_vfm import checkpoints_straight_and_resumed  # noqa: E402

TARGET_WIDTH = 96  # vit_tiny14's width: the frozen target of these tests
ADAPTER = dict(backbone="vit_tiny14_adapter", head="pyramid", head_kwargs={}, single_scale=1.0, hr_crop_size=None,
               backbone_kwargs={"embed_dim": 64, "depth": 4, "num_heads": 2, "input_scale": 1.1, "conv_inplane": 16,
                                "distill_channels": TARGET_WIDTH})
VFMPP_STEP = dict(pseudo_flip=True, weak_jitter=True, strong_aug="per_image", mic_lambda=1.0, mic_mask="blocks",
                  mic_block_size=16, source_ce="labelled", fd_lambda=0.0, strong_source_aug=True,
                  feature_distill_lambda=0.1, feature_target="vit_tiny14", feature_target_size=56)


def adapter_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_segmentor(SegmentorConfig(**{**ADAPTER, "num_classes": 4, "test_crop_size": (64, 64),
                                              "test_stride": (32, 32), **kw}))


def step_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 4, (2, 64, 64), generator=g)
    return dict(img=torch.randn(2, 3, 64, 64, generator=g), gt=gt, target_img=torch.randn(2, 3, 64, 64, generator=g),
                source_classes=torch.unique(gt).tolist())


def one_step(cfg, step_seed=0, target=True):
    student = adapter_model()
    teacher = copy.deepcopy(student)
    ema_init_(teacher, student)
    frozen = FrozenFeatureTarget(cfg.feature_target, cfg.feature_target_size, generator=make_generator(7)) if target else None
    opt = build_optimizer(student, 1e-3, rule="layerwise")
    out = dacs_step(student, teacher, None, opt, step_batch(), 1, make_generator(step_seed), cfg, return_debug=True,
                    feature_target=frozen)
    return student, out


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_step_distils_both_domains_and_masks_pixel_blocks():
    student, out = one_step(DACSConfig(num_classes=4, **VFMPP_STEP, pseudo_threshold=0.0))
    for key in ("decode.loss_seg", "mix.decode.loss_seg", "masked.decode.loss_seg", "src.loss_feat_distill",
                "trg.loss_feat_distill"):
        assert key in out.logs, key
    assert 0 < out.logs["src.loss_feat_distill"] < 0.1 * 2.1  # λ × (0.1 SmoothL1 + 0.9 (1 − cos)), cos ≥ −1
    hidden = (out.debug["mic_img"] == 0).all(1).float().mean()
    assert 0.4 < hidden < 0.95  # ~70 % of the 4×4 grid of 16-px blocks is hidden
    fresh = adapter_model()
    assert not same(student.backbone.distill_head, fresh.backbone.distill_head)  # the head learnt from the distillation


def test_without_distillation_the_head_stays_as_it_was():
    cfg = DACSConfig(num_classes=4, **{**VFMPP_STEP, "feature_distill_lambda": 0.0})
    student, out = one_step(cfg, target=False)
    assert not any(k.endswith("loss_feat_distill") for k in out.logs)
    assert same(student.backbone.distill_head, adapter_model().backbone.distill_head)
    assert not same(student.backbone.spm, adapter_model().backbone.spm)  # the adapter itself trains on the CE passes


def test_strong_source_augmentation_changes_only_the_source_pass():
    base = {**VFMPP_STEP, "feature_distill_lambda": 0.0}
    a = one_step(DACSConfig(num_classes=4, **base), target=False)[1].logs["decode.loss_seg"]
    b = one_step(DACSConfig(num_classes=4, **{**base, "strong_source_aug": False}), target=False)[1].logs["decode.loss_seg"]
    assert a != b


def test_steps_are_seeded():
    cfg = DACSConfig(num_classes=4, **VFMPP_STEP)
    a, b, c = one_step(cfg)[0], one_step(cfg)[0], one_step(cfg, step_seed=1)[0]
    assert same(a, b) and not same(a, c)


def test_refusals_name_the_fix():
    with pytest.raises(ValueError, match="pass feature_target"):
        one_step(DACSConfig(num_classes=4, **VFMPP_STEP), target=False)
    headless = adapter_model(backbone_kwargs={**ADAPTER["backbone_kwargs"], "distill_channels": 0})
    with pytest.raises(ValueError, match="backbone_kwargs distill_channels"):
        dacs_step(headless, copy.deepcopy(headless), None, build_optimizer(headless), step_batch(), 1, make_generator(0),
                  DACSConfig(num_classes=4, **VFMPP_STEP), feature_target=FrozenFeatureTarget("vit_tiny14", 56))
    with pytest.raises(ValueError, match="use mic_mask=blocks"):
        one_step(DACSConfig(num_classes=4, **{**VFMPP_STEP, "mic_mask": "tokens", "feature_distill_lambda": 0.0}),
                 target=False)
    with pytest.raises(ValueError, match="splits the ViT into 4 stages"):
        create_backbone("vit_tiny14_adapter", depth=3)


def test_adapter_parts_train_at_the_heads_rate():
    model = adapter_model()
    lr = {n: g["lr"] for g in layerwise_param_groups(model, 1e-4, 0.01, 0.1, 0.9) for n, _ in g["params"]}
    for name in ("decode_head.conv_seg.weight", "backbone.spm.stem.0.weight", "backbone.level_embed",
                 "backbone.interactions.3.extra_extractors.1.ffn.fc2.weight", "backbone.up.weight",
                 "backbone.norm4.weight", "backbone.distill_head.feat_project.3.weight"):
        assert lr[name] == pytest.approx(1e-4), name
    assert lr["backbone.vit.blocks.3.attn.qkv.weight"] == pytest.approx(1e-5)
    assert lr["backbone.vit.blocks.0.attn.qkv.weight"] == pytest.approx(1e-5 * 0.9 ** 3)
    assert lr["backbone.vit.pos_embed"] == pytest.approx(1e-5 * 0.9 ** 4)


def original_layout(model, prefix="network."):
    "A model's weights under VFM-UDA++'s names: encoder.* (DINOv2's and the adapter's), upscale.*, out.weight."
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("backbone.distill_head."): continue  # the original keeps it beside the network
        if k.startswith("backbone.vit."): out[prefix + "encoder." + k[len("backbone.vit."):]] = v.clone()
        elif k.startswith("backbone."): out[prefix + "encoder." + k[len("backbone."):]] = v.clone()
        elif k.startswith("decode_head.upscale."): out[prefix + k[len("decode_head."):]] = v.clone()
        elif k == "decode_head.conv_seg.weight": out[prefix + "out.weight"] = v.clone()
    return out


def test_released_checkpoints_load_student_teacher_and_distillation_head(tmp_path):
    student, teacher = adapter_model(1).eval(), adapter_model(2).eval()
    state = {**original_layout(student), **original_layout(teacher, "network_ema."),
             **{"network_feature_head." + k[len("backbone.distill_head."):]: v
                for k, v in student.state_dict().items() if k.startswith("backbone.distill_head.")},
             "network_feature_extractor.encoder.cls_token": torch.zeros(1, 1, 96)}
    path = tmp_path / "vfmuda_plusplus_tiny.ckpt"
    torch.save({"state_dict": state, "epoch": 0, "global_step": 40000}, path)
    x = torch.randn(1, 3, 64, 64, generator=make_generator(3))
    for which, reference in (("student", student), ("teacher", teacher)):
        fresh = adapter_model(5).eval()
        report = load_released_checkpoint(fresh, path, which, log=False)
        missing = [k for k in report.missing if "num_batches_tracked" not in k]
        assert report.unexpected == [] and missing == ([] if which == "student" else
                                                       [k for k in missing if k.startswith("backbone.distill_head.")])
        with torch.no_grad():
            assert torch.equal(fresh.encode_decode(x), reference.encode_decode(x)), which
    assert torch.equal(fresh.backbone.vit.pos_embed, teacher.backbone.vit.pos_embed)


def test_the_imagenet_pretrained_adapter_loads_as_pretrained_weights(tmp_path):
    source = create_backbone("vit_tiny14_adapter", embed_dim=64, num_heads=2, conv_inplane=16, input_scale=None,
                             generator=make_generator(1))
    state = {"network.encoder." + k.removeprefix("vit."): v for k, v in source.state_dict().items()}
    state["network.head.8.weight"] = torch.zeros(1000, 64)  # the ImageNet classifier, not loaded
    path = tmp_path / "dinov2_tiny_with_vitadapter_pretraining_in1k_step50000.ckpt"
    torch.save({"state_dict": state}, path)
    loaded = create_backbone("vit_tiny14_adapter", path, embed_dim=64, num_heads=2, conv_inplane=16, input_scale=None)
    assert tensors_equal(loaded.state_dict(), source.state_dict())
    with pytest.raises(ValueError, match="width-64, 4-block ViT"):
        create_backbone("vit_tiny14_adapter", path, embed_dim=96, conv_inplane=16, input_scale=None)


def run_config(synth, out, **overrides) -> TrainConfig:
    "The VFM-UDA++ recipe (its step, groups and schedule) on a tiny adapter, on the tiny benchmark."
    return load_config(TrainConfig, overrides={
        **SMALL, **ADAPTER, **VFMPP_STEP, "source_root": str(synth / "source"), "target_root": str(synth / "target"),
        "out_dir": str(out), "eval_every": 0, "checkpoint_every": 0, "eval_classes": list(SYNTH_TRAIN_IDS),
        "attention_head_kwargs": {}, "optim_groups": "layerwise", "layer_decay": 0.9, "lr_schedule": "linear",
        "warmup_iters": 2, "warmup_ratio": 1e-3, "iters": 4, "test_crop_size": [64, 64], **overrides})


def test_adapter_run_resumes_bit_for_bit(synth, tmp_path):
    a, _ = checkpoints_straight_and_resumed(run_config, synth, tmp_path)
    assert not any(k.startswith("feature_target") or "imnet" in k for k in a["student"])  # the frozen model is not saved


def test_with_zero_injection_the_vit_inside_the_adapter_is_dinov2_itself():
    "γ = 0 (the initial injectors): the blocks see DINOv2's own tokens; any other γ changes them."
    adapter = create_backbone("vit_tiny14_adapter", input_scale=1.1, generator=make_generator(0)).eval()
    plain = create_backbone("vit_tiny14", input_scale=1.1).eval()
    plain.load_state_dict({k: v for k, v in adapter.state_dict().items() if k.startswith("vit.")}, strict=False)
    seen = {}
    for name, enc in (("adapter", adapter), ("plain", plain)):
        enc.vit.blocks[-1].register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x = torch.randn(2, 3, 64, 96, generator=make_generator(1))
    with torch.no_grad():
        adapter(x), plain(x)
        assert torch.equal(seen["adapter"], seen["plain"])
        adapter.interactions[1].injector.gamma.fill_(0.5)
        adapter(x)
    assert not torch.allclose(seen["adapter"], seen["plain"])


def test_deformable_attention_reads_the_values_bilinearly():
    "Each sampled point is the bilinear mix of its four neighbouring values (pixel centres at i + 0.5, zeros outside)."
    from hrda.vit_adapter import deformable_sample
    g = make_generator(0)
    h, w, c = 3, 5, 2
    value = torch.randn(1, h * w, 1, c, generator=g, dtype=torch.float64)
    grid = value[0, :, 0].reshape(h, w, c)
    points = torch.tensor([[0.5 / w, 0.5 / h], [1.0 / w, 0.5 / h], [2.3 / w, 1.9 / h], [-0.2 / w, 0.5 / h]], dtype=torch.float64)
    out = deformable_sample(value, [(h, w)], points[None, :, None, None, None], torch.ones(1, 4, 1, 1, 1, dtype=torch.float64))
    want = torch.stack([grid[0, 0], (grid[0, 0] + grid[0, 1]) / 2,
                        0.2 * 0.6 * grid[1, 1] + 0.8 * 0.6 * grid[1, 2] + 0.2 * 0.4 * grid[2, 1] + 0.8 * 0.4 * grid[2, 2],  # (1.8, 1.4) in cells
                        0.3 * grid[0, 0]])  # 0.7 of the point lies on the zero padding left of the map
    assert torch.allclose(out[0], want, atol=1e-12)
