"""DACS self-training (hrda.dacs) and its optimiser (hrda.optim): the training checks with asserted numbers,
kornia 0.5.8 reference values for the jitter and blur, and whole iterations on a stand-in and on the real segmentor."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import ROOT  # noqa: F401  (puts the repository on the path like the other tests)
from hrda.core import make_generator
from hrda.augment import color_jitter, gaussian_blur, renormalize, strong_augment
from hrda.dacs import (DACSConfig, classmix_masks, confidence_weight, dacs_step, ema_alpha, ema_init_, ema_step_,
                       ema_update_, mix_batch, pseudo_label, teacher_mode_)
from hrda.features import FD_CLASSES, downscale_label_ratio, feature_distance
from hrda.optim import build_optimizer, lr_at, set_lr_


# ---------------------------------------------------------------- stand-in segmentor with the hrda.segmentor API
class TinySegmentor(nn.Module):
    """backbone (conv + BN + dropout) on the 0.5x context, 1x1 head; records every call for order checks."""

    def __init__(self, num_classes=19, calls=None, tag=""):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 4, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.1))
        self.decode_head = nn.Conv2d(8, num_classes, 1)
        self.calls, self.tag = calls if calls is not None else [], tag

    def extract_features(self, img):
        self.calls.append((self.tag, "extract_features", self.training))
        return [self.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))]

    def encode_decode(self, img):
        modes = (self.backbone[1].training, self.backbone[3].training)
        self.calls.append((self.tag, "encode_decode", modes))
        feats = self.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))
        return F.interpolate(self.decode_head(feats), img.shape[-2:], mode="bilinear", align_corners=False)

    def forward_train(self, img, gt, weight=None, *, generator, return_features=False, **kwargs):
        self.calls.append((self.tag, "forward_train", None if weight is None else weight.clone()))
        torch.randint(0, 8, (2,), generator=generator)  # the detail-crop draw of the real segmentor
        feats = [self.backbone(F.interpolate(img, scale_factor=0.5, mode="bilinear", align_corners=False))]
        logits = F.interpolate(self.decode_head(feats[-1]), gt.shape[-2:], mode="bilinear", align_corners=False)
        ce = F.cross_entropy(logits, gt, ignore_index=255, reduction="none")
        loss = (ce if weight is None else ce * weight).mean()
        out = dict(loss=loss, logs={"loss_seg": loss.item()})
        if return_features: out["features"] = feats
        return out


def toy_batch(seed, size=64, cell=16, margin=0):
    g = make_generator(seed, "batch")
    n = size // cell
    gt = torch.randint(0, 19, (2, n, n), generator=g).repeat_interleave(cell, 1).repeat_interleave(cell, 2)
    valid = torch.ones(2, size, size)
    if margin: valid[:, :margin] = 0
    return dict(img=torch.randn(2, 3, size, size, generator=g), gt=gt,
                target_img=torch.randn(2, 3, size, size, generator=g), valid_pseudo_mask=valid)


def params_of(m):
    return [p.detach().clone() for p in m.parameters()]


# ---------------------------------------------------------------- EMA
def test_ema_alpha_schedule():
    assert [ema_alpha(t) for t in (0, 1, 9)] == [0.0, 0.5, 0.9]
    assert [ema_alpha(t) for t in (2, 99)] == pytest.approx([2 / 3, 0.99], abs=1e-15)
    assert ema_alpha(998) == pytest.approx(0.998999) and ema_alpha(998) < 0.999
    assert ema_alpha(999) == 0.999 and ema_alpha(40000) == 0.999
    assert ema_alpha(9, alpha=0.5) == 0.5


def test_ema_copy_then_half_average_inside_iterations():
    """The update at the start of t = 1 makes the teacher 0.5 initial copy + 0.5 student after step 0."""
    torch.manual_seed(0)
    student, teacher, imnet = TinySegmentor(), TinySegmentor(), TinySegmentor()
    bn_before = teacher.backbone[1].running_mean.clone()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    g = make_generator(0)
    theta0 = params_of(student)
    dacs_step(student, teacher, imnet, opt, toy_batch(0), 0, g)
    assert all(torch.equal(a, b) for a, b in zip(params_of(teacher), theta0))  # t = 0: a copy of the initial student
    assert not any(p.requires_grad for p in teacher.parameters())
    theta1 = params_of(student)
    assert not all(torch.equal(a, b) for a, b in zip(theta0, theta1))  # the student moved
    logs = dacs_step(student, teacher, imnet, opt, toy_batch(1), 1, g).logs
    assert logs["ema_alpha"] == 0.5
    for p, a, b in zip(teacher.parameters(), theta0, theta1):
        assert torch.equal(p, 0.5 * a + 0.5 * b)
    # buffers are not averaged: the teacher's BN statistics come from its own (target) batches only
    assert not torch.equal(teacher.backbone[1].running_mean, student.backbone[1].running_mean)
    assert not torch.equal(teacher.backbone[1].running_mean, bn_before)


def test_ema_reaches_alpha_and_leaves_buffers():
    teacher, student = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    with torch.no_grad():
        for p in teacher.parameters(): p.fill_(1.0)
        for p in student.parameters(): p.fill_(0.0)
        student.running_mean.fill_(5.0)
    assert ema_step_(teacher, student, 999) == 0.999
    assert torch.equal(teacher.weight, torch.full((3,), 0.999))
    assert torch.equal(teacher.running_mean, torch.zeros(3))
    ema_update_(teacher, student, 0.0)
    assert torch.equal(teacher.weight, student.weight)
    ema_init_(teacher, nn.BatchNorm1d(3))
    assert torch.equal(teacher.weight, torch.ones(3)) and not teacher.weight.requires_grad


def test_teacher_mode_keeps_bn_training_and_stops_dropout():
    m = teacher_mode_(TinySegmentor().eval())
    assert m.training and m.backbone[1].training and not m.backbone[3].training


# ---------------------------------------------------------------- pseudo-labels
def test_confidence_weight_is_one_scalar_per_batch():
    """5 confident pixels out of 2 x 4 x 4 = 32: every pixel weighs 5/32, margin rows 0 (they still count in q)."""
    logits = torch.zeros(2, 3, 4, 4)
    for b, y, x in [(0, 0, 0), (0, 0, 1), (0, 3, 3), (1, 2, 2), (1, 0, 3)]:  # two confident pixels in row 0
        logits[b, 2, y, x] = 12.0
    logits[1, 1, 1, 1] = 3.0  # argmax 1 but p = e^3 / (e^3 + 2) = 0.909 < 0.968: not confident
    valid = torch.ones(2, 4, 4)
    valid[:, 0] = 0  # the top margin
    label, weight, q = pseudo_label(logits, 0.968, valid)
    assert q.item() == 5 / 32
    assert torch.equal(weight[:, 1:], torch.full((2, 3, 4), 5 / 32))
    assert torch.equal(weight[:, 0], torch.zeros(2, 4))
    assert label[0, 0, 0] == 2 and label[1, 1, 1] == 1 and label[1, 3, 3] == 0
    assert confidence_weight(torch.tensor([0.968, 0.9679999, 1.0, 0.5])).item() == 0.5  # >= tau counts


def test_pseudo_label_legacy_rows_and_mask_shape():
    logits = torch.zeros(1, 2, 6, 3)
    logits[:, 0] = 10.0
    _, w, q = pseudo_label(logits, 0.968, ignore_top=1, ignore_bottom=2)
    assert q.item() == 1.0 and w[0, :, 0].tolist() == [0, 1, 1, 1, 0, 0]
    _, w, _ = pseudo_label(logits, 0.968, torch.zeros(1, 1, 6, 3))
    assert w.shape == (1, 6, 3) and w.sum() == 0


# ---------------------------------------------------------------- ClassMix and mixing
def test_classmix_classes_from_the_whole_batch():
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :, :2], labels[0, :, 2:4], labels[0, :, 4:6], labels[0, :, 6:] = 3, 7, 255, 0
    masks = classmix_masks(labels, make_generator(0))
    candidates = torch.tensor([0, 3, 7, 255])  # batch-wide unique values, 255 included; ceil(4/2) = 2 per image
    expect = [set(candidates[torch.randperm(4, generator=g)[:2]].tolist())
              for g in [make_generator(0)] for _ in range(2)]
    assert set(labels[0][masks[0]].tolist()) == expect[0]
    assert masks[1].all() == (0 in expect[1]) and masks[1].any() == (0 in expect[1])  # image 1 holds only class 0
    assert expect == [{0, 3}, {0, 7}]  # the draws of this seed, fixed forever
    assert torch.equal(masks, classmix_masks(labels, make_generator(0)))


def test_classmix_odd_count_rounds_up():
    labels = torch.arange(5).view(1, 5, 1).expand(1, 5, 4).contiguous()
    for seed in range(5):
        m = classmix_masks(labels, make_generator(seed))
        assert m[0, :, 0].sum() == 3 and m.all(dim=2).equal(m.any(dim=2))


def test_mix_batch_images_labels_weights():
    mask = torch.tensor([[[True, False], [False, True]]])
    img, gt, w = mix_batch(mask, torch.ones(1, 3, 2, 2), -torch.ones(1, 3, 2, 2), torch.tensor([[[1, 2], [3, 255]]]),
                           torch.tensor([[[9, 9], [9, 9]]]), torch.tensor([[[0.5, 0.0], [0.5, 0.5]]]))
    assert img[0, :, 0, 0].tolist() == [1, 1, 1] and img[0, :, 0, 1].tolist() == [-1, -1, -1]
    assert gt.tolist() == [[[1, 9], [9, 255]]] and w.tolist() == [[[1.0, 0.0], [0.5, 1.0]]]


# ---------------------------------------------------------------- colour jitter and blur
def jitter_input():
    return ((torch.arange(48, dtype=torch.float32) * 0.37) % 1).view(1, 3, 4, 4)


@pytest.mark.parametrize("factors, order, every6th, total", [
    ((1.13, 0.87, 1.19, -0.17), [3, 1, 0, 2],
     [0.09951232, 0.32140002, 0.51280004, 0.60815239, 0.79955256, 0.12095392, 0.46808884, 0.65948933], 24.78113937),
    ((0.85, 1.18, 0.81, 0.11), [2, 0, 3, 1],
     [0.02926616, 0.08260006, 0.31773162, 0.69620001, 0.95580006, 0.02336466, 0.23647255, 0.49607250], 21.21556282),
])
def test_color_jitter_matches_kornia_058(factors, order, every6th, total):
    """Reference numbers from kornia 0.5.8 ColorJitter.apply_transform with these factors and order."""
    b, c, s, h = factors
    params = dict(brightness=torch.tensor([b]), contrast=torch.tensor([c]), saturation=torch.tensor([s]),
                  hue=torch.tensor([h]), order=torch.tensor([order]))
    out = color_jitter(jitter_input(), params)
    assert torch.allclose(out.flatten()[::6], torch.tensor(every6th), atol=1e-6)
    assert out.sum().item() == pytest.approx(total, abs=1e-4)


def test_color_jitter_identity_and_per_image_params():
    x = torch.rand(2, 3, 16, 16, generator=make_generator(0))
    one = dict(brightness=torch.ones(2), contrast=torch.ones(2), saturation=torch.ones(2), hue=torch.zeros(2),
               order=torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]]))
    assert torch.allclose(color_jitter(x, one), x, atol=1e-5)  # neutral factors: only the HSV round trip
    only_bc = dict(one, order=torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]))  # brightness/contrast only: exact
    assert torch.equal(color_jitter(x, only_bc), x)
    two = dict(one, brightness=torch.tensor([1.0, 1.1]), order=torch.tensor([[0, 1, 0, 1], [0, 1, 0, 1]]))
    out = color_jitter(x, two)
    shift = torch.tensor(1.1) - 1  # float32, as kornia computes b - 1
    assert torch.equal(out[0], x[0]) and torch.equal(out[1], torch.clamp(torch.clamp(x[1] + shift, 0, 1) + shift, 0, 1))


def test_gaussian_blur_matches_kornia_058():
    x = ((torch.arange(3 * 9 * 10, dtype=torch.float32) * 0.61) % 1).view(1, 3, 9, 10)
    out = gaussian_blur(x, [0.8], kernel_size=(5, 7))
    row = [0.49228415, 0.45469198, 0.41403916, 0.54496938, 0.50842911,
           0.50403559, 0.50011975, 0.46406752, 0.60093147, 0.61306816]
    col = [0.51306784, 0.56298029, 0.64858061, 0.64423496, 0.51631027, 0.51176745, 0.59037638, 0.58277202, 0.49772102]
    assert torch.allclose(out[0, 1, 0], torch.tensor(row), atol=2e-6)
    assert torch.allclose(out[0, 2, :, 9], torch.tensor(col), atol=2e-6)
    assert out.sum().item() == pytest.approx(133.635468, abs=1e-3)


def test_strong_augment_coins_determinism_identity():
    x = renormalize(torch.rand(2, 3, 64, 64, generator=make_generator(0)))  # a normalised image of [0, 1] RGB
    run = lambda seed, jc, bc, **kw: strong_augment(x, make_generator(seed), jitter_coin=jc, blur_coin=bc, **kw)
    assert torch.equal(run(0, 0.2, 0.5), x)  # p = 0.2 and 0.5 are strict thresholds
    assert torch.equal(run(0, 0.9, 0.9), run(0, 0.9, 0.9))
    assert not torch.equal(run(0, 0.9, 0.9), run(1, 0.9, 0.9))
    assert not torch.equal(run(0, 0.21, 0.0), x) and not torch.equal(run(0, 0.0, 0.51), x)
    assert torch.allclose(run(0, 0.9, 0.0, strength=0.0), x, atol=1e-3)  # s = 0: neutral factors
    assert torch.equal(run(0, 0.0, 0.9, blur=False), x)
    blurred = run(0, 0.0, 0.9)  # kernel 7 for 64 px; per-image sigma in [0.15, 1.15]
    assert blurred.std() < x.std()


# ---------------------------------------------------------------- feature distance
def test_fd_label_pooling_ratio():
    """A 64x64 block that is 80% car -> car; 70% -> 255 (factor 64, ratio 0.75)."""
    def cell(n_car, other=2):  # building (2) with the first n_car pixels car (13), row-major
        c = torch.full((64, 64), other)
        c.view(-1)[:n_car] = 13
        return c
    lab = torch.cat([cell(3277), cell(2867), cell(3072), cell(0, other=255), cell(3277, other=255)], dim=1)[None]
    assert [round(n / 4096, 3) for n in (3277, 2867, 3072)] == [0.8, 0.7, 0.75]
    assert downscale_label_ratio(lab, 64, 0.75, 19).tolist() == [[[13, 255, 13, 255, 13]]]
    assert downscale_label_ratio(lab, 64, 0.85, 19).tolist() == [[[255, 255, 255, 255, 255]]]
    assert downscale_label_ratio(lab, 32, 0.75, 19).shape == (1, 2, 10)


def test_feature_distance_mask_mean_lambda_and_empty():
    B, C = 2, 512
    f_s = torch.zeros(B, C, 16, 16, requires_grad=True)
    f_i = torch.zeros(B, C, 16, 16)
    lab = torch.full((B, 1024, 1024), 0)  # road everywhere
    lab[0, :64, :64] = 13  # one car cell
    lab[1, 64:128, :64] = 11  # one person cell
    lab[1, :64, :64] = 5  # pole: not an FD class
    f_i[0, :, 0, 0] = 0.1  # distance sqrt(512 * 0.01) = 2.2627
    f_i[1, :, 1, 0] = 0.2  # distance 4.5255
    f_i[1, :, 0, 0] = 9.0  # pole cell: ignored
    loss, mask = feature_distance(f_s, f_i, lab)
    assert mask.sum() == 2 and mask[0, 0, 0] and mask[1, 1, 0] and not mask[1, 0, 0]
    expect = 0.005 * (math.sqrt(512 * 0.01) + math.sqrt(512 * 0.04)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    loss.backward()
    assert f_s.grad[0, :, 0, 0].abs().sum() > 0 and f_s.grad[1, :, 0, 0].abs().sum() == 0
    empty, mask = feature_distance(f_s, f_i, torch.zeros(B, 1024, 1024, dtype=torch.long))
    assert empty.item() == 0.0 and not math.isnan(empty.item()) and not mask.any()
    assert 5 not in FD_CLASSES and len(FD_CLASSES) == 10


# ---------------------------------------------------------------- one iteration
def make_models(seed=0, calls=None):
    torch.manual_seed(seed)
    return (TinySegmentor(calls=calls, tag="student"), TinySegmentor(calls=calls, tag="teacher"),
            TinySegmentor(calls=calls, tag="imnet"))


def run_standin(seed, iters=3, cfg=None, batch_seed=0):
    student, teacher, imnet = make_models(seed)
    opt = build_optimizer(student, lr=1e-3)
    g = make_generator(seed, "train")
    logs = []
    for t in range(iters):
        set_lr_(opt, t, 1e-3, max_iters=10, warmup_iters=0)
        logs.append(dacs_step(student, teacher, imnet, opt, toy_batch(batch_seed + t), t, g, cfg).logs)
    return student, teacher, logs, g


def test_iteration_order_modes_and_mixed_weights():
    calls = []
    student, teacher, imnet = make_models(0, calls)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = toy_batch(0, margin=8)
    out = dacs_step(student, teacher, imnet, opt, batch, 0, make_generator(0), return_debug=True)
    assert [c[:2] for c in calls] == [("student", "forward_train"), ("imnet", "extract_features"),
                                      ("teacher", "encode_decode"), ("student", "forward_train")]
    assert calls[0][2] is None  # the clean source pass has no weights
    assert calls[1][2] is False  # the ImageNet model runs in eval mode
    assert calls[2][2] == (True, False)  # teacher: BN in training mode, dropout off
    d = out.debug
    w = calls[3][2]
    q = out.logs["pseudo_weight"]
    assert torch.equal(w, d["mix_weight"])
    assert torch.equal(w[d["mix_mask"]], torch.ones(int(d["mix_mask"].sum())))  # pasted source pixels weigh 1
    trg = ~d["mix_mask"]
    expect = torch.where(batch["valid_pseudo_mask"] > 0, q.float(), torch.tensor(0.0))
    assert torch.equal(w[trg], expect[trg])  # q on the target, 0 in the margin
    assert torch.equal(d["mix_gt"][trg], d["pseudo_gt"][trg]) and torch.equal(d["mix_gt"][~trg], batch["gt"][~trg])
    assert set(out.logs) == {"ema_alpha", "decode.loss_seg", "src.loss_imnet_feat_dist", "mix.decode.loss_seg",
                             "pseudo_weight"}


def test_iteration_updates_weights_and_is_bit_identical():
    s1, t1, logs1, g1 = run_standin(0)
    s2, t2, logs2, g2 = run_standin(0)
    init, _, _ = make_models(0)
    assert not torch.equal(s1.decode_head.weight, init.decode_head.weight)  # the student trained
    assert logs1 == logs2
    for a, b in zip([*s1.state_dict().values(), *t1.state_dict().values()],
                    [*s2.state_dict().values(), *t2.state_dict().values()]):
        assert torch.equal(a, b)
    assert torch.equal(g1.get_state(), g2.get_state())
    s3, _, logs3, _ = run_standin(0, batch_seed=100)
    assert logs3 != logs1 and not torch.equal(s3.decode_head.weight, s1.decode_head.weight)


def test_fd_and_self_training_switches():
    base = run_standin(0, iters=1)[0]
    no_fd = run_standin(0, iters=1, cfg=DACSConfig(fd_lambda=0.0))
    assert "src.loss_imnet_feat_dist" not in no_fd[2][0]
    assert not torch.equal(base.backbone[0].weight, no_fd[0].backbone[0].weight)  # FD changes the backbone update
    assert torch.equal(base.decode_head.weight, no_fd[0].decode_head.weight)  # but never the head
    src_only = run_standin(0, iters=1, cfg=DACSConfig(self_training=False))
    assert set(src_only[2][0]) == {"decode.loss_seg", "src.loss_imnet_feat_dist"}
    student, _, imnet = make_models(0)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    batch = {k: v for k, v in toy_batch(0).items() if k in ("img", "gt")}
    with pytest.raises(ValueError, match="DACSConfig\\(self_training=False\\)"):
        dacs_step(student, None, imnet, opt, batch, 0, make_generator(0))
    logs = dacs_step(student, None, None, opt, batch, 0, make_generator(0), DACSConfig(self_training=False)).logs
    assert set(logs) == {"decode.loss_seg"}


# ---------------------------------------------------------------- the real segmentor
def small_segmentor_config():
    import hrda.segmentor as segmentor
    return segmentor, segmentor.SegmentorConfig(**{**segmentor.TINY_MODEL, "num_classes": 19})


def run_real(seed, iters=2):
    segmentor, cfg = small_segmentor_config()
    torch.manual_seed(seed)  # init and dropout
    student, teacher, imnet = (segmentor.build_segmentor(cfg) for _ in range(3))
    opt = build_optimizer(student)
    g = make_generator(seed, "train")
    outs = []
    for t in range(iters):
        set_lr_(opt, t, 6e-5, max_iters=iters, warmup_iters=1)
        outs.append(dacs_step(student, teacher, imnet, opt, toy_batch(t, size=128, cell=32), t, g,
                              return_debug=t == iters - 1))
    return student, teacher, outs


def test_real_segmentor_iteration():
    s1, t1, outs = run_real(0)
    s2, t2, _ = run_real(0)
    assert all(torch.equal(a, b) for a, b in zip(s1.state_dict().values(), s2.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(t1.state_dict().values(), t2.state_dict().values()))
    logs = outs[-1].logs
    for key in ("decode.loss_seg", "decode.hr.loss_seg", "src.loss_imnet_feat_dist", "mix.decode.loss_seg",
                "mix.decode.hr.loss_seg", "pseudo_weight"):
        assert math.isfinite(logs[key]), key
    assert logs["ema_alpha"] == 0.5
    d = outs[-1].debug
    assert d["fd_mask"].shape == (2, 2, 2)  # 128-px labels over 2x2 stage-4 features of the 64-px context: factor 64
    assert d["mix_img"].shape == (2, 3, 128, 128) and d["mix_maps"]["fused"].shape[0] == 2
    fresh = run_real(0, iters=0)[0]
    assert not torch.equal(s1.decode_head.conv_seg.weight, fresh.decode_head.conv_seg.weight)


def test_param_groups_on_the_real_segmentor():
    """The original parameter groups on MiT-B0 names: head x10 (decoder BN too, with decay), backbone norms without decay."""
    segmentor, _ = small_segmentor_config()
    model = segmentor.build_segmentor(segmentor.SegmentorConfig(backbone="mit_b0"))
    opt = build_optimizer(model)
    by_name = {n: (g["lr"], g["weight_decay"]) for g in opt.param_groups for n in g["param_names"]}
    assert len(by_name) == sum(1 for _ in model.parameters())
    assert by_name["decode_head.fuse_layer.aspp_modules.0.bn.weight"] == pytest.approx((6e-4, 0.01))
    assert by_name["attention_head.conv_seg.weight"] == pytest.approx((6e-4, 0.01))
    assert by_name["backbone.block1.0.attn.norm.weight"] == (6e-5, 0.0)
    assert by_name["backbone.patch_embed1.norm.bias"] == (6e-5, 0.0)
    assert by_name["backbone.norm4.weight"] == (6e-5, 0.0)
    assert by_name["backbone.block1.0.attn.q.bias"] == (6e-5, 0.01)
    assert len(opt.param_groups) == 3
    set_lr_(opt, 750)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr_at(750)] * 2 + [lr_at(750, 6e-4)])
    assert lr_at(750) == pytest.approx(6e-5 * 0.98125 * 0.5000005, rel=1e-12)


# ---------------------------------------------------------------- masked image consistency (MIC)
def test_block_mask_ratio_and_blocks_over_many_draws():
    from hrda.augment import block_mask
    g = make_generator(0, "mic")
    for block, ratio in ((64, 0.7), (32, 0.5), (16, 0.9)):
        m = block_mask((200, 128, 256), block, ratio, g)
        assert abs(m.mean().item() - (1 - ratio)) < 0.015, (block, ratio, m.mean().item())
        cells = m.view(200, 1, 128 // block, block, 256 // block, block)
        assert torch.equal(cells.amax(dim=(3, 5)), cells.amin(dim=(3, 5)))  # constant on every block
        assert set(m.unique().tolist()) <= {0.0, 1.0}


def test_mic_pass_trains_on_the_unmasked_pseudo_label_after_the_mixed_pass():
    calls = []
    student, teacher, imnet = make_models(0, calls)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    out = dacs_step(student, teacher, imnet, opt, toy_batch(0, margin=8), 0, make_generator(0), DACSConfig(mic_lambda=1.0),
                    return_debug=True)
    assert [c[:2] for c in calls] == [("student", "forward_train"), ("imnet", "extract_features"),
                                      ("teacher", "encode_decode"), ("student", "forward_train"),
                                      ("student", "forward_train")]  # one teacher call: MIC reuses its pseudo-label
    d = out.debug
    assert torch.equal(calls[4][2], d["pseudo_weight"]) and torch.equal(d["mic_gt"], d["pseudo_gt"])
    assert (d["mic_img"] == 0).all(dim=1).any() and not (d["mic_img"] == 0).all()  # masked, not blank
    assert {"masked.decode.loss_seg"} <= set(out.logs)


def test_mic_off_draws_nothing_and_changes_nothing():
    a, ta, la, ga = run_standin(0, cfg=DACSConfig())
    b, tb, lb, gb = run_standin(0, cfg=DACSConfig(mic_lambda=0.0, mic_mode="separate", mic_block_size=8))
    assert all(torch.equal(x, y) for x, y in zip(params_of(a), params_of(b))) and la == lb
    assert torch.equal(ga.get_state(), gb.get_state())
    c, _, lc, gc = run_standin(0, cfg=DACSConfig(mic_lambda=1.0))
    assert not torch.equal(ga.get_state(), gc.get_state()) and "masked.decode.loss_seg" in lc[-1]


def test_mic_step_under_bf16_autocast():
    student, teacher, imnet = make_models(0)
    opt = build_optimizer(student, lr=1e-3)
    out = dacs_step(student, teacher, imnet, opt, toy_batch(0), 1, make_generator(0), DACSConfig(mic_lambda=1.0),
                    amp_dtype=torch.bfloat16)
    assert math.isfinite(out.logs["masked.decode.loss_seg"]) and all(torch.isfinite(p).all() for p in student.parameters())


def test_source_and_feature_distance_share_one_backward():
    "One backward of source + FD loss gives the gradients of the original's two passes, up to float rounding."
    segmentor, cfg = small_segmentor_config()
    gt = torch.full((2, 128, 128), 13, dtype=torch.long); gt[:, :64] = 0  # car cells (an FD class) and road cells
    img = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    imnet = segmentor.build_segmentor(cfg).eval()
    grads = []
    for passes in (1, 2):
        torch.manual_seed(1)
        student = segmentor.build_segmentor(cfg)
        src = student.forward_train(img, gt, generator=make_generator(0), return_features=True)
        with torch.no_grad(): target = imnet.extract_features(img)[-1]
        fd, mask = feature_distance(src["features"][-1], target, gt, FD_CLASSES, 0.005, 0.75, 19)
        assert mask.any() and fd > 0
        if passes == 1: (src["loss"] + fd).backward()
        else: src["loss"].backward(retain_graph=True); fd.backward()
        grads.append([p.grad for p in student.parameters()])
    for one, two in zip(*grads):
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-7)
