"""The VFM-UDA recipe on a ViT: layer-wise learning rates, its schedule, flip-averaged pseudo-labels, token-masked MIC,
per-image augmentation, the labelled-pixel source mean, the refusal of replayed steps, and a bit-exact resume."""
import copy
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from hrda.config import TrainConfig, load_config
from hrda.core import ConfigError, IGNORE_INDEX, make_generator
from hrda.dacs import DACSConfig, dacs_step, ema_init_
from hrda.optim import build_optimizer, layerwise_param_groups, lr_at
from hrda.scenes import SYNTH_TRAIN_IDS
from hrda.segmentor import SegmentorConfig, build_segmentor, seg_ce_loss
from hrda.train import train
from hrda.checkpoint import load_checkpoint

sys.path.insert(0, str(ROOT / "tests"))
from ddp_worker import SMALL  # noqa: E402
from test_train import restore_torch_globals, tensors_equal  # noqa: E402,F401  (the fixture restores torch's globals)

VIT = dict(backbone="vit_tiny14", backbone_kwargs={"embed_dim": 48, "depth": 2, "num_heads": 2, "input_scale": 1.1},
           head="lightweight", head_kwargs={}, attention_head="lightweight", attention_head_kwargs={})
VFM_STEP = dict(pseudo_flip=True, weak_jitter=True, strong_aug="per_image", mic_lambda=1.0, mic_mask="tokens",
                source_ce="labelled", fd_lambda=0.0)


def vit_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_segmentor(SegmentorConfig(**{**VIT, "num_classes": 4, "hr_crop_size": (32, 32),
                                              "test_crop_size": (64, 64), "test_stride": (32, 32), **kw}))


def test_layerwise_groups_cover_every_parameter_once_with_its_rate():
    with torch.device("meta"):
        model = build_segmentor(SegmentorConfig(backbone="dinov2_vitb14", head="lightweight", single_scale=1.0))
    for decay in (1.0, 0.9):
        groups = layerwise_param_groups(model, 1.4142e-4, 0.01, 0.1, decay)
        seen = [n for g in groups for n, _ in g["params"]]
        assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad) and len(set(seen)) == len(seen)
        lr = {n: g["lr"] for g in groups for n, _ in g["params"]}
        assert all(g["weight_decay"] == 0.01 for g in groups)
        assert lr["decode_head.conv_seg.weight"] == pytest.approx(1.4142e-4)
        for i in (0, 5, 11):
            assert lr[f"backbone.vit.blocks.{i}.attn.qkv.weight"] == pytest.approx(1.4142e-5 * decay ** (11 - i))
        for stem in ("backbone.mask_token", "backbone.vit.pos_embed", "backbone.vit.cls_token",
                     "backbone.vit.patch_embed.proj.weight", "backbone.vit.norm.weight"):
            assert lr[stem] == pytest.approx(1.4142e-5 * decay ** 12), stem
        assert len(groups) == (2 if decay == 1.0 else 14)  # equal rates share a group
    with pytest.raises(ValueError, match="use optim_groups=daformer"):
        layerwise_param_groups(build_segmentor(SegmentorConfig(backbone="cnn", single_scale=0.5)))


def test_linear_schedule_points():
    f = lambda t: lr_at(t, 1.0, 40000, 1500, 1e-3, schedule="linear")
    assert [f(t) for t in (0, 1499, 1500, 20000, 40000)] == pytest.approx([1e-3, 1.0, 0.9625, 0.5, 0.0], abs=1e-12)


def test_labelled_source_mean_is_cross_entropy_over_labelled_pixels():
    logits, gt = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    gt[0, :3] = IGNORE_INDEX
    labelled = (gt != IGNORE_INDEX).float()
    loss, _ = seg_ce_loss(logits, gt, labelled * (labelled.numel() / labelled.sum()))
    torch.testing.assert_close(loss, F.cross_entropy(logits, gt, ignore_index=IGNORE_INDEX))


def step_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    gt = torch.randint(0, 4, (2, 64, 64), generator=g)
    return dict(img=torch.randn(2, 3, 64, 64, generator=g), gt=gt, target_img=torch.randn(2, 3, 64, 64, generator=g),
                source_classes=torch.unique(gt).tolist())


def one_step(cfg, model_seed=0, step_seed=0, **model_kw):
    student = vit_model(model_seed, **model_kw)
    teacher = copy.deepcopy(student)
    ema_init_(teacher, student)
    opt = build_optimizer(student, 1e-3, rule="layerwise")
    out = dacs_step(student, teacher, None, opt, step_batch(), 1, make_generator(step_seed), cfg, return_debug=True)
    return student, teacher, out


def test_flip_averaged_pseudo_labels():
    student, teacher, out = one_step(DACSConfig(num_classes=4, pseudo_flip=True, pseudo_threshold=0.3))
    trg = step_batch()["target_img"]
    teacher.train()
    with torch.no_grad():
        p = (teacher.encode_decode(trg).softmax(1) + teacher.encode_decode(trg.flip(-1)).softmax(1).flip(-1)) / 2
    assert torch.equal(out.debug["pseudo_gt"], p.argmax(1))
    q = (p.max(1).values >= 0.3).float().mean()
    torch.testing.assert_close(out.debug["pseudo_weight"], torch.full_like(p[:, 0], q.item()))
    with torch.no_grad(): unflipped = teacher.encode_decode(trg).argmax(1)
    assert not torch.equal(unflipped, out.debug["pseudo_gt"])  # the flip changes the labels of a random model


@pytest.mark.parametrize("single_scale", [None, 1.0], ids=["hrda", "single-scale"])
def test_token_masked_consistency_trains_the_mask_token(single_scale):
    cfg = DACSConfig(num_classes=4, **VFM_STEP, pseudo_threshold=0.0)  # q = 1: the masked loss has weight
    student, _, out = one_step(cfg, single_scale=single_scale)
    assert "masked.decode.loss_seg" in out.logs
    assert student.backbone.token_mask_ratio == 0  # masking ends with the masked pass
    assert (out.debug["mic_img"] != 0).float().mean() > 0.99  # the MIC input keeps its pixels (no block mask)
    blocks, _, _ = one_step(DACSConfig(num_classes=4, mic_lambda=1.0, fd_lambda=0.0, pseudo_threshold=0.0),
                            single_scale=single_scale)
    before = vit_model(0, single_scale=single_scale).backbone.mask_token
    assert not torch.equal(student.backbone.mask_token, before)  # the masked pass gave it a gradient
    assert torch.equal(blocks.backbone.mask_token, before)  # pixel-block masking never reads it


def test_vfm_options_are_seeded_and_change_the_step():
    a = one_step(DACSConfig(num_classes=4, **VFM_STEP))[0]
    b = one_step(DACSConfig(num_classes=4, **VFM_STEP))[0]
    c = one_step(DACSConfig(num_classes=4, **VFM_STEP), step_seed=1)[0]
    same = lambda x, y: all(torch.equal(p, q) for p, q in zip(x.parameters(), y.parameters()))
    assert same(a, b) and not same(a, c)


def test_replayed_steps_refuse_per_image_draws(synth, tmp_path):
    student = vit_model()
    with pytest.raises(ValueError, match="train with step_mode=eager"):
        dacs_step(student, copy.deepcopy(student), None, build_optimizer(student), step_batch(), 1, make_generator(0),
                  DACSConfig(num_classes=4, pseudo_flip=True), draws={})
    cfg = run_config(synth, tmp_path, step_mode="replay")
    with pytest.raises(ConfigError, match="use step_mode=eager"):
        train(cfg, resume=False)


def run_config(synth, out, **overrides) -> TrainConfig:
    "The VFM-UDA recipe (its step, groups and schedule) with HRDA on a two-block ViT, on the tiny benchmark."
    return load_config(TrainConfig, overrides={
        **SMALL, **VIT, **VFM_STEP, "source_root": str(synth / "source"), "target_root": str(synth / "target"),
        "out_dir": str(out), "eval_every": 0, "checkpoint_every": 0, "eval_classes": list(SYNTH_TRAIN_IDS),
        "optim_groups": "layerwise", "lr_schedule": "linear", "warmup_iters": 2, "warmup_ratio": 1e-3, "iters": 4,
        **overrides})


def checkpoints_straight_and_resumed(make_config, synth, tmp_path):
    "The last checkpoints of a run straight through and of the same run stopped after 2 iterations and resumed; equal."
    straight, split = make_config(synth, tmp_path / "straight"), make_config(synth, tmp_path / "split")
    train(straight, resume=False)
    assert train(split, resume=False, stop_after=2)["iterations"] == 2
    assert train(split)["finished"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "latest.pth") for d in ("straight", "split"))
    for part in ("student", "teacher", "optimizer"):
        assert tensors_equal(a[part], b[part]), f"{part} differs after stop + resume"
    return a, b


def test_vit_run_resumes_bit_for_bit(synth, tmp_path):
    a, _ = checkpoints_straight_and_resumed(run_config, synth, tmp_path)
    assert len(a["optimizer"]["param_groups"]) == 2 and a["optimizer"]["state"]


@pytest.mark.parametrize("single_scale", [1.0, None], ids=["single-scale", "hrda"])
def test_slide_test_can_average_probabilities(single_scale):
    "VFM-UDA's test: the softmax of each 64-px window (stride 32) averaged by overlap count; label maps from it."
    from hrda.segmentor import tiny_segmentor
    kw = dict(single_scale=single_scale, test_mode="slide", test_crop_size=(64, 64), test_stride=(32, 32))
    def sharpened(model):  # logits far from zero, where averaging probabilities and logits differ
        with torch.no_grad(): model.decode_head.conv_seg.weight.mul_(100)
        return model.eval()
    model = sharpened(tiny_segmentor(test_average="probabilities", **kw))
    x = torch.randn(1, 3, 64, 128, generator=make_generator(0))
    with torch.no_grad():
        got = model.inference(x).exp()
        want, count = torch.zeros(1, 4, 64, 128), torch.zeros(1, 1, 64, 128)
        for left in (0, 32, 64):
            want[..., left:left + 64] += model.encode_decode(x[..., left:left + 64]).softmax(1)
            count[..., left:left + 64] += 1
        torch.testing.assert_close(got, want / count, atol=1e-6, rtol=1e-5)
        logits = sharpened(tiny_segmentor(**kw)).inference(x)  # the same weights, logits averaged instead
        assert not torch.allclose(logits.softmax(1), got, atol=1e-3)
        scales = model.predict_scales(x)["fused"]  # the label maps of `hrda predict --show-scales` agree
        assert torch.equal(scales.argmax(1), model.inference(x).argmax(1))


def test_scale_jitter_draws_a_resize_factor_per_sample():
    "GTA's 1914x1052 frame at short side 1440, times U(0.9, 1.1): drawn from the sample's generator, first."
    import numpy as np
    from hrda.datasets import PipelineConfig, train_transform
    img, label = np.zeros((1052, 1914, 3), np.uint8), np.zeros((1052, 1914), np.uint8)
    cfg = PipelineConfig(scale=(4096, 1440), crop_size=(64, 64), scale_jitter=(0.9, 1.1))
    shapes = [train_transform(img, label, cfg, make_generator(s))["meta"]["img_shape"] for s in range(40)]
    heights = [h for h, _ in shapes]
    assert all(1296 <= h <= 1584 for h in heights) and max(heights) - min(heights) > 150
    assert all(abs(w / h - 1914 / 1052) < 2e-3 for h, w in shapes)  # the aspect ratio is kept
    again = train_transform(img, label, cfg, make_generator(3))["meta"]["img_shape"]
    assert again == shapes[3]
    plain = PipelineConfig(scale=(4096, 1440), crop_size=(64, 64))
    assert train_transform(img, label, plain, make_generator(0))["meta"]["img_shape"] == (1440, 2620)


def test_rcs_joint_test_keeps_only_crops_that_pass_both(synth, tmp_path):
    "VFM-UDA's rare class sampling: each draw is one crop, kept when it holds enough of the class and no class >= 75 %."
    from hrda.datasets import RCSConfig, UDADataset
    from hrda.train import build_datasets
    cfg = load_config(TrainConfig, overrides={**SMALL, "source_root": str(synth / "source"), "target_root": str(synth / "target"),
                                               "out_dir": str(tmp_path), "rcs_joint_cat_max": True, "rcs_max_reloads": 20})
    pairs, _ = build_datasets(cfg)
    assert pairs.source.pipeline.cat_max_ratio == 1.0 and pairs.rcs.joint_cat_max == 0.75 and pairs.rcs.max_reloads == 20
    one_class = torch.full((8, 8), 3)  # all of class 3: enough of it, but one class covers everything
    mixed = torch.cat([torch.full((8, 6), 3), torch.full((8, 2), 5)], 1)  # two classes, but class 3 covers 75 %
    fine = torch.cat([torch.full((8, 4), 3), torch.full((8, 4), 5)], 1)  # 50 %: passes both tests
    class Source:  # hands out the crops of one image in this order
        def __init__(self): self.crops = iter([one_class, mixed, fine, one_class])
        def load(self, k, g): return {"img": torch.zeros(3, 8, 8), "gt": next(self.crops), "meta": {}}
    class Sampler:
        def sample(self, g): return 3, 0
    for joint, kept in ((0.75, fine), (None, one_class)):
        ds = UDADataset.__new__(UDADataset)
        ds.source, ds.target, ds.sampler, ds.seed = Source(), None, Sampler(), 0
        ds.rcs = RCSConfig(min_pixels=5, min_crop_ratio=1.0, max_reloads=20, joint_cat_max=joint)
        assert torch.equal(ds[0]["gt"], kept)
