"""Inference from checkpoints: full-size predictions of any image, prediction folders, evaluation files."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hrda.checkpoint import CheckpointError, save_checkpoint
from hrda.core import CLASSES, colorize
from hrda.files import read_image, write_yaml
from hrda.config import config_to_dict, load_config
from hrda.evaluation import logits_to_label, read_label_png
from hrda.predict import evaluate_checkpoint, load_model, predict_folder, predict_image, prepare_image
from hrda.released import save_mmseg_checkpoint
from hrda.segmentor import build_segmentor
from hrda.config import TrainConfig, narrow
from hrda.segmentor import TINY_MODEL, SegmentorConfig, tiny_segmentor

TINY = {**TINY_MODEL, "target_scale": [256, 128], "device": "cpu"}  # the shared tiny model, tested at 256x128


def tiny_models(seed=0, **kw):
    cfg = load_config(TrainConfig, overrides={**TINY, **kw})
    model_keys = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SegmentorConfig)}
    return cfg, tiny_segmentor(seed, **model_keys), tiny_segmentor(seed + 1, **model_keys)


def write_checkpoint(path, seed=0, with_teacher=True, **kw):
    cfg, student, teacher = tiny_models(seed, **kw)
    return save_checkpoint(path, 7, config_to_dict(cfg), student=student.state_dict(),
                           teacher=teacher.state_dict() if with_teacher else None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny models run fastest on one thread; the setting is restored afterwards."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A randomly initialised tiny HRDA model saved as a training checkpoint in <run>/checkpoints/latest.pth."
    return write_checkpoint(tmp_path_factory.mktemp("runs") / "exp" / "s0" / "checkpoints" / "latest.pth")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(ckpt, device="cpu")


def rgb(h, w, seed=0):
    small = np.random.default_rng(seed).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def test_prediction_of_a_1000x1999_image_has_exactly_its_size(ckpt, loaded, tmp_path):
    img = rgb(1000, 1999)
    src = save(tmp_path / "in" / "wide.png", img)
    summary = predict_folder(ckpt, src, tmp_path / "out", device="cpu", progress=False)
    assert (summary["images"], summary["predicted"], summary["skipped"]) == (1, 1, [])
    label = read_label_png(tmp_path / "out" / "labels" / "wide.png")
    assert label.shape == (1000, 1999)
    for kind in ("color", "overlay"):
        assert read_image(tmp_path / "out" / kind / "wide.png").shape == (1000, 1999, 3)
    # the model saw the image at the run's test scale (256, 128) and its logits were resized back before the argmax
    x = prepare_image(img, (256, 128))
    assert tuple(x.shape) == (1, 3, 128, 256)
    with torch.no_grad():
        expected = logits_to_label(loaded.model.inference(x), (1000, 1999))[0].numpy()
    np.testing.assert_array_equal(label, expected)
    assert len(np.unique(label)) > 1 and label.max() < len(CLASSES)
    assert summary["items"][0]["size"] == [1000, 1999]


def test_predict_image_at_the_original_scale_and_on_another_device_argument(loaded):
    img = rgb(37, 70, seed=3)
    pred = predict_image(loaded.model, img, scale=None, device="cpu")
    assert pred.shape == (37, 70) and pred.dtype == np.int64
    with torch.no_grad():
        direct = logits_to_label(loaded.model.inference(prepare_image(img)), (37, 70))[0].numpy()
    np.testing.assert_array_equal(pred, direct)


def test_unreadable_images_are_skipped_and_reported(ckpt, tmp_path):
    src = tmp_path / "in"
    save(src / "good.png", rgb(40, 60))
    save(src / "city" / "good2.jpg", rgb(30, 50, seed=1))
    (src / "notes.png").write_text("this is not an image")
    (src / "empty.jpg").write_bytes(b"")
    (src / "cut.png").write_bytes((src / "good.png").read_bytes()[:100])
    (src / "readme.txt").write_text("ignored: not an image suffix")
    summary = predict_folder(ckpt, src, tmp_path / "out", device="cpu", progress=False)
    assert (summary["images"], summary["predicted"]) == (5, 2)
    skipped = {Path(s["input"]).name: s["error"] for s in summary["skipped"]}
    assert sorted(skipped) == ["cut.png", "empty.jpg", "notes.png"]
    assert all("cannot read image" in e for e in skipped.values())
    assert sorted(p.relative_to(tmp_path / "out" / "labels").as_posix()
                  for p in (tmp_path / "out" / "labels").rglob("*.png")) == ["city/good2.png", "good.png"]
    on_disk = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert on_disk["skipped"] == summary["skipped"] and on_disk["predicted"] == 2
    assert not list((tmp_path / "out").rglob("*.tmp"))  # every write was atomic and completed


def test_inputs_sharing_a_name_keep_their_suffix(ckpt, tmp_path):
    "a.png and a.jpg in one folder both get predicted: their outputs are a_png.png and a_jpg.png; b.png stays b.png."
    src = tmp_path / "in"
    save(src / "a.png", rgb(40, 60))
    save(src / "a.jpg", rgb(40, 60, seed=1))
    save(src / "b.png", rgb(40, 60, seed=2))
    summary = predict_folder(ckpt, src, tmp_path / "out", device="cpu", progress=False)
    assert sorted(item["name"] for item in summary["items"]) == ["a_jpg", "a_png", "b"]
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["a_jpg.png", "a_png.png", "b.png"]
    with pytest.raises(ValueError, match="2 inputs would write the same output name 'x_png'"):  # a list from two folders
        predict_folder(ckpt, [src / "a.png", tmp_path / "x.png", tmp_path / "other" / "x.png"], tmp_path / "o2", device="cpu")


def test_server_export_writes_each_servers_format(ckpt, tmp_path):
    "--server cityscapes writes label ids, acdc train ids, each named after its image."
    from hrda.convert import CITYSCAPES_TO_TRAINID
    src = tmp_path / "in"
    save(src / "aachen_000000_000019_leftImg8bit.png", rgb(40, 60))
    cs = predict_folder(ckpt, src, tmp_path / "cs", device="cpu", progress=False, server="cityscapes")
    ac = predict_folder(ckpt, src, tmp_path / "ac", device="cpu", progress=False, server="acdc")
    train_ids = np.array(Image.open(tmp_path / "ac" / "labels" / "aachen_000000_000019_leftImg8bit.png"))
    label_ids = np.array(Image.open(tmp_path / "cs" / "server" / "aachen_000000_000019_leftImg8bit.png"))
    assert np.array_equal(np.array(Image.open(tmp_path / "ac" / "server" / "aachen_000000_000019_leftImg8bit.png")), train_ids)
    back = np.vectorize(lambda i: CITYSCAPES_TO_TRAINID.get(int(i), 255))(label_ids)
    assert np.array_equal(back, train_ids) and cs["items"][0]["files"]["server"] == "server/aachen_000000_000019_leftImg8bit.png"
    with pytest.raises(ValueError, match="no test server format for 'gta'"):
        predict_folder(ckpt, src, tmp_path / "x", device="cpu", progress=False, server="gta")


def test_show_scales_writes_the_four_maps(ckpt, loaded, tmp_path):
    img = rgb(60, 90, seed=2)
    src = save(tmp_path / "scene.png", img)
    summary = predict_folder(ckpt, src, tmp_path / "out", show_scales=True, device="cpu", progress=False)
    files = summary["items"][0]["files"]
    assert {"lr", "hr", "attention", "fused"} <= set(files)
    maps = predict_image(loaded.model, img, (256, 128), return_scales=True)
    for k in ("lr", "hr", "fused"):
        np.testing.assert_array_equal(read_image(tmp_path / "out" / files[k]), colorize(maps[k]))
    heat = read_image(tmp_path / "out" / "scales" / "attention" / "scene.png")
    assert heat.shape == (60, 90, 3)
    gray = read_label_png(tmp_path / "out" / "scales" / "attention_gray" / "scene.png")
    np.testing.assert_array_equal(gray, np.rint(maps["attention"] * 255))
    np.testing.assert_array_equal(maps["fused"], read_label_png(tmp_path / "out" / "labels" / "scene.png"))


def test_show_scales_of_a_single_scale_model_writes_the_fused_map_only(tmp_path):
    path = write_checkpoint(tmp_path / "daformer.pth", single_scale=0.5)
    src = save(tmp_path / "x.png", rgb(32, 48))
    summary = predict_folder(path, src, tmp_path / "out", show_scales=True, device="cpu", progress=False)
    assert sorted(summary["items"][0]["files"]) == ["color", "fused", "label", "overlay"]


def test_teacher_flag_loads_the_ema_weights(ckpt):
    stored = torch.load(ckpt, weights_only=True)
    key = "decode_head.conv_seg.weight"
    student, teacher = load_model(ckpt, device="cpu").model, load_model(ckpt, teacher=True, device="cpu").model
    assert torch.equal(student.state_dict()[key], stored["student"][key])
    assert torch.equal(teacher.state_dict()[key], stored["teacher"][key])
    assert not torch.equal(stored["student"][key], stored["teacher"][key])


def test_released_checkpoint_needs_its_config_and_predicts_like_the_model(tmp_path):
    cfg, student, teacher = tiny_models(seed=5)
    released = save_mmseg_checkpoint(tmp_path / "released.pth", student, teacher, {"iter": 40000})
    yaml_file = write_yaml(tmp_path / "exp.yaml", config_to_dict(cfg))
    with pytest.raises(CheckpointError, match="--config"):
        load_model(released)
    m = load_model(released, config=yaml_file, device="cpu", log=False)
    assert (m.info["kind"], m.info["iteration"]) == ("released", 40000)
    img = rgb(50, 80, seed=4)
    with torch.no_grad():
        expected = logits_to_label(student.eval().inference(prepare_image(img, (256, 128))), (50, 80))[0].numpy()
    np.testing.assert_array_equal(predict_image(m.model, img, (256, 128)), expected)
    ema = load_model(released, config=yaml_file, teacher=True, device="cpu", log=False)
    assert torch.equal(ema.model.state_dict()["decode_head.conv_seg.weight"], teacher.state_dict()["decode_head.conv_seg.weight"])


def test_checkpoint_errors_name_the_problem(tmp_path):
    no_teacher = write_checkpoint(tmp_path / "source_only.pth", with_teacher=False)
    with pytest.raises(CheckpointError, match="drop --teacher"):
        load_model(no_teacher, teacher=True)
    (tmp_path / "cut.pth").write_bytes(no_teacher.read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        predict_folder(no_teacher, tmp_path / "nowhere", tmp_path / "out", progress=False)


def write_cityscapes_val(root, n=3, h=48, w=96):
    "A Cityscapes-layout val split with labels of classes 0, 2 and 255."
    for i in range(n):
        city = ("aachen", "bonn")[i % 2]
        stem = f"{city}/{city}_{i:06d}_000019"
        save(root / "leftImg8bit" / "val" / f"{stem}_leftImg8bit.png", rgb(h, w, seed=10 + i))
        gt = np.zeros((h, w), np.uint8)
        gt[h // 2:] = 2
        gt[:4] = 255
        save(root / "gtFine" / "val" / f"{stem}_gtFine_labelTrainIds.png", gt)
    return root


def test_evaluate_checkpoint_matches_an_independent_count_and_writes_its_files(ckpt, loaded, tmp_path):
    data = write_cityscapes_val(tmp_path / "cs")
    result = evaluate_checkpoint(ckpt, data, "cityscapes", "val", device="cpu", save_predictions=True, progress=False)
    eval_dir = ckpt.parent.parent / "eval"  # <run>/eval by default
    written = json.loads((eval_dir / "metrics.json").read_text())
    assert written["mIoU"] == result["mIoU"] and written["num_images"] == 3
    assert written["checkpoint"]["which"] == "student" and written["checkpoint"]["iteration"] == 7
    assert written["config"]["backbone"] == "cnn" and "torch" in written["provenance"]
    # independent count: per-image predictions at the label size, one confusion matrix over the set
    inter, union = np.zeros(19), np.zeros(19)
    for img_path in sorted((data / "leftImg8bit" / "val").rglob("*.png")):
        gt = read_label_png(str(img_path).replace("leftImg8bit/val", "gtFine/val").replace("_leftImg8bit", "_gtFine_labelTrainIds"))
        pred = predict_image(loaded.model, read_image(img_path), (256, 128))
        valid = gt != 255
        for c in range(19):
            p, g = (pred == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    iou = inter[union > 0] / union[union > 0]
    assert result["mIoU"] == pytest.approx(100 * iou.mean(), abs=0.006)
    table = (eval_dir / "per_class.md").read_text().splitlines()
    assert table[0] == "# gta2cs_hrda/s1 (student)" and "| class | IoU | Acc |" in table
    assert sum(1 for line in table if line.startswith(("| road ", "| sidewalk ", "| bicycle "))) == 3
    index = json.loads((eval_dir / "predictions" / "index.json").read_text())
    assert sorted(index) == ["aachen_000000_000019", "aachen_000002_000019", "bonn_000001_000019"]
    assert read_label_png(eval_dir / "predictions" / "labels" / "bonn_000001_000019.png").shape == (48, 96)
    first = evaluate_checkpoint(ckpt, data, out_dir=tmp_path / "one", max_images=1, device="cpu", progress=False)
    assert first["num_images"] == 1 and (tmp_path / "one" / "metrics.json").is_file()
