"""Every experiment file loads, every grid names existing files, and the paper-scale models build at their sizes on the
meta device (no memory, no weights): parameter counts, learning rates per group and, for the DINOv2 runs, one training
forward at the paper's crop, so that a typo or a crop that does not divide into patches fails here, not on a GPU."""
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT
from hrda.config import TrainConfig, load_config, narrow
from hrda.grid import expand_grid
from hrda.optim import build_optimizer
from hrda.segmentor import SegmentorConfig, build_segmentor

EXPERIMENTS = ROOT / "experiments"
GRIDS = sorted(p for p in EXPERIMENTS.glob("*.yaml") if "runs" in (yaml.safe_load(p.read_text()) or {}))
RUNS = sorted(set(EXPERIMENTS.glob("*.yaml")) - set(GRIDS))


@pytest.mark.parametrize("path", RUNS, ids=lambda p: p.stem)
def test_experiment_files_load_and_name_themselves(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.experiment == path.stem, f"{path.name} names experiment {cfg.experiment!r}"


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_grids_expand_into_checked_runs(path):
    "Each run's experiment file exists and its overrides make a valid config (hrda.grid checks both)."
    runs = expand_grid(path, seeds=[0], reports=Path("/nonexistent"))
    assert len(runs) == len(yaml.safe_load(path.read_text())["runs"])


def meta_model(name, **overrides):
    cfg = load_config(TrainConfig, EXPERIMENTS / f"{name}.yaml", {"pretrained": None, **overrides})
    with torch.device("meta"):
        return cfg, build_segmentor(narrow(SegmentorConfig, cfg))


def n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, encoder, head", [("vfmuda_gta2cs_vitb", 86_580_480, 1_811_520),
                                                 ("vfmuda_gta2cs_vitl", 304_368_640, 3_218_176)])
def test_vfm_uda_models_have_the_published_sizes_and_learning_rates(name, encoder, head):
    cfg, model = meta_model(name)
    assert (n_params(model.backbone), n_params(model.decode_head)) == (encoder, head)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, rule=cfg.optim_groups, backbone_lr_mult=cfg.backbone_lr_mult,
                          layer_decay=cfg.layer_decay)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert sorted({lrs[id(p)] for p in model.decode_head.parameters()}) == pytest.approx([1.4142e-4])
    assert sorted({lrs[id(p)] for p in model.backbone.parameters()}) == pytest.approx([1.4142e-5])
    assert {g["weight_decay"] for g in opt.param_groups} == {0.01}


def test_vfm_uda_pp_model_has_its_sizes_and_learning_rates():
    "DINOv2 ViT-L without its final norm and mask token, the adapter, the distillation head; the pyramid head."
    cfg, model = meta_model("vfmudapp_gta2cs_vitl")
    vit = sum(p.numel() for n, p in model.backbone.named_parameters() if n.startswith("vit."))
    assert (vit, n_params(model.backbone) - vit, n_params(model.decode_head)) == (
        304_365_568, 23_236_800 + 8_401_920, 6_918_656 + 2_432)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, rule=cfg.optim_groups, backbone_lr_mult=cfg.backbone_lr_mult,
                          layer_decay=cfg.layer_decay)
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    at = lambda name: lr[id(named[name])]
    assert at("decode_head.conv_seg.weight") == at("backbone.spm.fc4.weight") == pytest.approx(2.8284e-5)
    assert at("backbone.distill_head.feat_project.0.weight") == pytest.approx(2.8284e-5)
    assert at("backbone.vit.blocks.23.mlp.fc1.weight") == pytest.approx(2.8284e-6)
    assert at("backbone.vit.blocks.0.mlp.fc1.weight") == pytest.approx(2.8284e-6 * 0.9 ** 23)
    assert at("backbone.vit.pos_embed") == pytest.approx(2.8284e-6 * 0.9 ** 24)
    assert len(opt.param_groups) == 26  # heads and adapter, 24 blocks, the embeddings


@pytest.mark.parametrize("name", ["vfmuda_gta2cs_vitb", "vfmudapp_gta2cs_vitl", "hrda_gta2cs_dinov2b",
                                  "mic_hrda_gta2cs_dinov2b"])
def test_dinov2_runs_take_a_training_forward_at_the_paper_crop(name):
    "The 1024² crop (VFM-UDA: seen at 1120; HRDA: a 512 context input and a 512 detail crop, each seen at 560)."
    cfg, model = meta_model(name)
    img = torch.empty(1, 3, *cfg.crop_size, device="meta")
    gt = torch.empty(1, *cfg.crop_size, dtype=torch.long, device="meta")
    out = model.forward_train(img, gt, generator=torch.Generator(), return_maps=True)
    assert out["loss"].shape == () and out["maps"]["fused"].shape[1] == 19
    if cfg.single_scale is None:
        assert out["maps"]["lr"].shape[-2:] == (cfg.crop_size[0] // 8,) * 2  # the context logits on its stride-4 grid


def test_hrda_on_dinov2_slides_a_cityscapes_image():
    "Outer 1024 windows, inner 512 detail windows with stride 256: every window resized into whole patches."
    cfg, model = meta_model("hrda_gta2cs_dinov2b")
    model.eval()
    with torch.no_grad():
        logits = model.inference(torch.empty(1, 3, 1024, 2048, device="meta"))
    assert logits.shape == (1, 19, 1024, 2048)
