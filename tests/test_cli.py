"""The `hrda` command: subcommand dispatch, help, exit codes and one-line error messages."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import hrda.cli as cli
from hrda.checkpoint import CheckpointError, save_checkpoint
from hrda.config import config_to_dict, load_config
from hrda.segmentor import build_segmentor
from hrda.config import TrainConfig, narrow
from hrda.segmentor import TINY_MODEL, SegmentorConfig
from conftest import ROOT

TINY = {**TINY_MODEL, "target_scale": [128, 64]}  # the shared tiny model, tested at 128x64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = load_config(TrainConfig, overrides=TINY)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_segmentor(narrow(SegmentorConfig, cfg))
    path = tmp_path_factory.mktemp("runs") / "exp" / "s0" / "checkpoints" / "latest.pth"
    return save_checkpoint(path, 3, config_to_dict(cfg), student=model.state_dict(), teacher=model.state_dict())


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cs")
    g = np.random.default_rng(0)
    for i, city in enumerate(("aachen", "bonn")):
        stem = f"{city}/{city}_{i:06d}_000019"
        for sub, arr in ((f"leftImg8bit/val/{stem}_leftImg8bit.png", g.integers(0, 256, (32, 64, 3), dtype=np.uint8)),
                         (f"gtFine/val/{stem}_gtFine_labelTrainIds.png", np.repeat(np.arange(32, dtype=np.uint8)[:, None] // 16, 64, 1))):
            (root / sub).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub)
    return root


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_every_subcommand(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name in ("prepare", "synth", "train", "evaluate", "predict"):
        assert f"    {name} " in out
    code, out, _ = run(capsys, "evaluate", "--help")
    assert code == 0 and "--released PATH --config experiments/gta2cs_hrda.yaml --data data/cityscapes --expect 73.79" in out
    code, out, _ = run(capsys, "predict", "--help")
    assert code == 0 and "--show-scales" in out


@pytest.mark.parametrize("name, target, argv", [
    ("train", "hrda.train.train_cli", ["--config", "experiments/x.yaml", "--set", "iters=2"]),
    ("synth", "hrda.synth.synth_cli", ["data/synth", "--n-source", "4"]),
])
def test_train_and_synth_hand_every_argument_to_their_module(monkeypatch, capsys, name, target, argv):
    module, fn = target.rsplit(".", 1)
    pytest.importorskip(module)
    seen = []
    monkeypatch.setattr(f"{module}.{fn}", lambda a: seen.append(a) or (0 if name == "synth" else {}))
    assert cli.main([name, *argv]) == 0
    assert seen == [argv]


def test_prepare_hands_the_dataset_and_its_arguments_to_the_converter(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr("hrda.convert.prepare_cli", lambda dataset, argv: seen.append((dataset, argv)) or 0)
    assert cli.main(["prepare", "cityscapes", "data/cityscapes", "--workers", "2"]) == 0
    assert seen == [("cityscapes", ["data/cityscapes", "--workers", "2"])]
    code, _, err = run(capsys, "prepare", "kitti", "data/kitti")
    assert code == 2 and "unknown dataset 'kitti'; choose one of gta, synthia, cityscapes, custom" in err
    assert run(capsys, "prepare")[0] == 2


def test_delegated_exit_codes_pass_through(monkeypatch, capsys):
    monkeypatch.setattr("hrda.convert.prepare_cli", lambda dataset, argv: 1)
    assert cli.main(["prepare", "gta", "data/gta"]) == 1
    code, _, err = run(capsys, "train", "--bogus-option")
    assert code == 2 and "unrecognized arguments: --bogus-option" in err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["evaluate"], "one of the arguments --checkpoint --released is required"),
    (["evaluate", "--released", "r.pth"], "--released needs --config"),
    (["evaluate", "--checkpoint", "c.pth", "--config", "x.yaml"], "--config goes with --released"),
    (["predict", "--checkpoint", "c.pth", "images"], "the following arguments are required: --out"),
    (["evaluate", "--checkpoint", "c.pth", "--scale", "huge"], "invalid scale 'huge'"),
])
def test_usage_errors_exit_2_with_a_message(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err


def test_input_errors_exit_1_with_one_line(capsys, tmp_path, ckpt):
    code, _, err = run(capsys, "evaluate", "--checkpoint", tmp_path / "missing.pth", "--device", "cpu")
    assert code == 1
    assert err.strip().splitlines() == [f"hrda evaluate: error: checkpoint {tmp_path / 'missing.pth'} does not exist; "
                                        "give the path of a .pth file written by training (<run dir>/checkpoints/latest.pth)"]
    code, _, err = run(capsys, "evaluate", "--checkpoint", ckpt, "--data", tmp_path / "nodata", "--device", "cpu")
    assert code == 1 and err.startswith("hrda evaluate: error: cityscapes: the image folder") and "Traceback" not in err
    code, _, err = run(capsys, "predict", "--checkpoint", ckpt, tmp_path / "noimages", "--out", tmp_path / "o", "--device", "cpu")
    assert code == 1 and "does not exist; give an image file or a folder of images" in err


def test_debug_mode_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("HRDA_DEBUG", "1")
    with pytest.raises(FileNotFoundError, match="input .* does not exist"):
        cli.main(["predict", "--checkpoint", str(tmp_path / "x.pth"), str(tmp_path / "in"), "--out", str(tmp_path / "o")])


def test_evaluate_writes_the_eval_folder_and_checks_an_expected_miou(capsys, ckpt, cityscapes, tmp_path):
    code, out, _ = run(capsys, "evaluate", "--checkpoint", ckpt, "--data", cityscapes, "--device", "cpu", "--no-progress")
    assert code == 0 and out.startswith("2 images of")
    metrics = json.loads((ckpt.parent.parent / "eval" / "metrics.json").read_text())
    assert (metrics["num_images"], metrics["split"]) == (2, "val")
    miou = metrics["mIoU"]
    common = ["evaluate", "--checkpoint", ckpt, "--data", cityscapes, "--device", "cpu", "--no-progress", "--out", tmp_path / "e"]
    code, out, _ = run(capsys, *common, "--expect", miou + 0.05)
    assert code == 0 and "matches the expected" in out
    code, _, err = run(capsys, *common, "--expect", miou + 1, "--tolerance", "0.5")
    assert code == 1 and f"mIoU {miou} differs from the expected {miou + 1} by more than 0.5" in err


def test_predict_reports_skipped_images_and_writes_scales(capsys, ckpt, cityscapes, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for p in (cityscapes / "leftImg8bit" / "val").rglob("*.png"): (src / p.name).write_bytes(p.read_bytes())
    (src / "broken.png").write_text("not a picture")
    code, out, err = run(capsys, "predict", "--checkpoint", ckpt, src, "--out", tmp_path / "out", "--show-scales",
                         "--device", "cpu", "--no-progress", "--scale", "none")
    assert code == 0 and "predicted 2 of 3 images" in out
    assert f"skipped {src / 'broken.png'}: cannot read image" in err
    assert sorted(p.name for p in (tmp_path / "out" / "scales").iterdir()) == ["attention", "attention_gray", "fused", "hr", "lr"]
    only_broken = tmp_path / "bad"
    only_broken.mkdir()
    (only_broken / "x.jpg").write_bytes(b"")
    code, _, err = run(capsys, "predict", "--checkpoint", ckpt, only_broken, "--out", tmp_path / "out2", "--device", "cpu", "--no-progress")
    assert code == 1 and "none of the images could be read" in err


def test_console_entry_point_runs_as_a_program():
    cmd = [sys.executable, "-c", "import sys; from hrda.cli import main; sys.exit(main())"]
    res = subprocess.run(cmd + ["--version"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0 and res.stdout.startswith("hrda ")
    res = subprocess.run(cmd + ["evaluate", "--released", "x.pth"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "--released needs --config" in res.stderr
    res = subprocess.run([sys.executable, "-c", "from hrda.cli import main; main()", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 0 and "evaluate" in res.stdout


def test_prepare_darkzurich_converts_its_validation_labels(capsys, tmp_path):
    root = tmp_path / "dz"
    for rel, labelled in (("train/night/GOPR01", False), ("val/night/GOPR02", True)):
        (root / "rgb_anon" / rel).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(root / "rgb_anon" / rel / "GOPR_frame_000001_rgb_anon.png")
        if labelled:
            (root / "gt" / rel).mkdir(parents=True)
            Image.fromarray(np.full((8, 16), 26, np.uint8)).save(root / "gt" / rel / "GOPR_frame_000001_gt_labelIds.png")
    code, out, _ = run(capsys, "prepare", "darkzurich", root, "--workers", "0", "--no-progress")
    assert code == 0 and out.startswith("darkzurich: 1 label files converted")
    label = np.array(Image.open(root / "gt" / "val" / "night" / "GOPR02" / "GOPR_frame_000001_gt_labelTrainIds.png"))
    assert (label == 13).all()
    code, _, err = run(capsys, "prepare", "acdc", tmp_path / "nothing", "--workers", "0")
    assert code == 1 and "acdc: the dataset folder" in err
