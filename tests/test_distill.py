"""Distillation runs: a trained run's fused predictions on the target crops train a student (`distill_from`), which
resumes bit for bit, saves no EMA teacher, and refuses the step modes and settings it cannot run."""
import sys

import pytest
import torch

from conftest import ROOT
from hrda.checkpoint import load_checkpoint
from hrda.config import TrainConfig, load_config
from hrda.core import ConfigError
from hrda.distill import teacher_labels
from hrda.scenes import SYNTH_TRAIN_IDS
from hrda.train import distill_teacher, train

sys.path.insert(0, str(ROOT / "tests"))
from ddp_worker import SMALL  # noqa: E402
from test_train import restore_torch_globals, tensors_equal  # noqa: E402,F401  (the fixture restores torch's globals)


def config(synth, out, **overrides):
    return load_config(TrainConfig, overrides={**SMALL, "source_root": str(synth / "source"), "target_root": str(synth / "target"),
                                               "out_dir": str(out), "eval_every": 0, "checkpoint_every": 0, "iters": 3,
                                               "eval_classes": list(SYNTH_TRAIN_IDS), **overrides})


@pytest.fixture(scope="module")
def teacher_run(synth, tmp_path_factory):
    "An HRDA run of three iterations: the teacher."
    out = tmp_path_factory.mktemp("teacher")
    train(config(synth, out), resume=False)
    return out


def test_a_student_learns_the_teachers_fused_labels_and_resumes(synth, teacher_run, tmp_path):
    student = dict(distill_from=str(teacher_run), single_scale=1.0, hr_crop_size=None, test_mode="whole")
    straight, split = (config(synth, tmp_path / d, **student) for d in ("straight", "split"))
    result = train(straight, resume=False)
    assert result["finished"] and result["final"]["mIoU"] is not None
    assert train(split, resume=False, stop_after=2)["iterations"] == 2 and train(split)["finished"]
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "latest.pth") for d in ("straight", "split"))
    assert tensors_equal(a["student"], b["student"]) and a.get("teacher") is None
    assert "distilling the fused predictions of" in (tmp_path / "straight" / "train.log").read_text()
    teacher = distill_teacher(teacher_run, torch.device("cpu"))
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    img = torch.randn(2, 3, 64, 64)
    valid = torch.ones(2, 64, 64)
    valid[:, :, :8] = 0
    labels = teacher_labels(teacher, img, valid)
    with torch.no_grad(): want = teacher.encode_decode(img).argmax(1)
    assert torch.equal(labels[..., 8:], want[..., 8:]) and (labels[..., :8] == 255).all()


def test_distillation_refuses_what_it_cannot_run(synth, teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="keep self_training=true and step_mode=eager"):
        train(config(synth, tmp_path / "a", distill_from=str(teacher_run), step_mode="replay"), resume=False)
    with pytest.raises(ConfigError, match="keep self_training=true"):
        train(config(synth, tmp_path / "b", distill_from=str(teacher_run), self_training=False), resume=False)
    with pytest.raises(ValueError, match="nothing.*does not exist"):
        train(config(synth, tmp_path / "c", distill_from=str(tmp_path / "nothing")), resume=False)
