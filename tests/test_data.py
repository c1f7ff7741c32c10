"""Label conversion and data loading on small datasets written in the exact on-disk formats of the downloads:
GTA palette/L PNGs of Cityscapes label ids, Synthia 16-bit 3-channel PNGs, Cityscapes leftImg8bit/gtFine trees."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
import hrda.convert as convert
from hrda.convert import (DataPrepError, format_summary, load_label_mapping, prepare_cityscapes, prepare_cli,
                          prepare_custom, prepare_gta, prepare_synthia)
from hrda.core import make_generator
from hrda.datasets import (PipelineConfig, RareClassSampler, RCSConfig, SegDataset, UDADataset, ValDataset,
                           crop_box_cat_max, load_class_stats, random_crop_box, rcs_class_probs, rescale_size)

# The label mappings of the original conversion scripts, written out independently of the package.
EXPECTED_CS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
           27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
EXPECTED_SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
                18: 14, 19: 15, 20: 16, 12: 17, 11: 18}


def expected_train_ids(ids, table):
    return np.vectorize(lambda v: table.get(int(v), 255), otypes=[np.uint8])(ids)


def expected_counts(train):
    values, counts = np.unique(train, return_counts=True)
    return {str(int(v)): int(n) for v, n in zip(values, counts) if v != 255}


def street_ids(h, w, seed, extra=()):
    "A label map of Cityscapes ids: road below, building and sky above, a car and a person, some unlabeled pixels."
    rng = np.random.default_rng(seed)
    ids = np.full((h, w), 23, np.uint8)  # sky
    ids[h // 4: h // 2] = 11  # building
    ids[h // 2:] = 7  # road
    y, x = int(rng.integers(h // 2, h - 6)), int(rng.integers(0, w - 8))
    ids[y:y + 5, x:x + 8] = 26  # car
    ids[h // 2 - 4: h // 2, 2:4] = 24  # person
    ids[-1, :3] = 0  # unlabeled
    for k, v in enumerate(extra): ids[0, k] = v
    return ids


def palette_png(ids, path):
    "A palette ('P') PNG whose indices are the ids, with a colour palette, as GTA ships its labels."
    im = Image.fromarray(ids).convert("P")
    im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def write_gta(root, n=3, h=24, w=40, extra=None):
    "GTA layout: images/<id>.png RGB, labels/<id>.png palette PNGs (the first as an 'L' PNG) of Cityscapes ids."
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(1)
    out = {}
    for i in range(1, n + 1):
        name = f"{i:05d}.png"
        ids = street_ids(h, w, i, (extra or {}).get(i, ()))
        cv2.imwrite(str(root / "images" / name), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        if i == 1: Image.fromarray(ids).save(root / "labels" / name)
        else: palette_png(ids, root / "labels" / name)
        out[name] = ids
    return out


def write_synthia(root, n=2, h=19, w=32):
    "Synthia layout: RGB/<id>.png, GT/LABELS/<id>.png 16-bit 3-channel PNGs written by OpenCV (class id = last channel)."
    (root / "RGB").mkdir(parents=True)
    (root / "GT" / "LABELS").mkdir(parents=True)
    out = {}
    for i in range(n):
        name = f"{i:07d}.png"
        cls = np.full((h, w), 1, np.uint16)  # sky
        cls[h // 2:] = 3  # road
        cls[h // 2:, :5] = 4  # sidewalk
        cls[2:6, 10:20] = 10  # pedestrian
        cls[-3:, -6:] = 8  # car
        cls[0, 0] = 13 + i  # parking-slot / road-work: not among the 19 classes
        arr = np.zeros((h, w, 3), np.uint16)
        arr[..., 2] = cls  # BGR order: the last array channel is the first stored channel
        arr[..., 1] = 3  # instance channel: would read as 'road' everywhere if taken by mistake
        arr[..., 0] = 1000 + i
        assert cv2.imwrite(str(root / "GT" / "LABELS" / name), arr)
        cv2.imwrite(str(root / "RGB" / name), np.full((h, w, 3), 90, np.uint8))
        out[name] = cls
    return out


CS_FILES = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}, "test": {"berlin": 1}}


def write_cityscapes(root, h=16, w=32):
    "Cityscapes layout with *_gtFine_labelIds.png (and the polygon JSONs beside them, as in the download)."
    out = {}
    for split, cities in CS_FILES.items():
        for city, n in cities.items():
            (root / "leftImg8bit" / split / city).mkdir(parents=True)
            (root / "gtFine" / split / city).mkdir(parents=True)
            for k in range(n):
                name = f"{city}_{k:06d}_000019"
                ids = street_ids(h, w, len(out)) if split != "test" else np.zeros((h, w), np.uint8)
                img = np.dstack([np.full((h, w), 10 * k, np.uint8), np.full((h, w), 100, np.uint8), np.full((h, w), 200, np.uint8)])
                cv2.imwrite(str(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"), img)
                gt = root / "gtFine" / split / city
                Image.fromarray(ids).save(gt / f"{name}_gtFine_labelIds.png")
                (gt / f"{name}_gtFine_polygons.json").write_text('{"imgHeight": %d, "imgWidth": %d, "objects": []}' % (h, w))
                out[f"{split}/{city}/{name}"] = ids
    return out


def read_png(path):
    with Image.open(path) as im:
        assert im.mode == "L", f"{path} is {im.mode}"
        return np.asarray(im)


# ---------------------------------------------------------------- conversion


def test_gta_conversion_values_and_stats(tmp_path):
    root = tmp_path / "gta"
    labels = write_gta(root)
    assert convert.GTA_TO_TRAINID == EXPECTED_CS
    summary = prepare_gta(root, workers=0, progress=False)
    stats = json.loads((root / "sample_class_stats.json").read_text())
    expected_stats, pixels = [], {}
    for name, ids in labels.items():
        out = root / "labels" / name.replace(".png", "_labelTrainIds.png")
        train = read_png(out)
        np.testing.assert_array_equal(train, expected_train_ids(ids, EXPECTED_CS))
        assert train[ids == 26].tolist() == [13] * 40 and set(train[ids == 0].tolist()) == {255}
        expected_stats.append({**expected_counts(train), "file": str(out)})
        for c, n in expected_counts(train).items(): pixels[int(c)] = pixels.get(int(c), 0) + n
    assert stats == expected_stats
    assert json.loads((root / "sample_class_stats_dict.json").read_text()) == {
        s["file"]: {k: v for k, v in s.items() if k != "file"} for s in expected_stats}
    with_class = json.loads((root / "samples_with_class.json").read_text())
    assert sorted(with_class, key=int) == list(with_class) == ["0", "2", "10", "11", "13"]
    assert with_class["13"] == [[s["file"], 40] for s in expected_stats]
    assert summary["pixels_per_class"] == dict(sorted(pixels.items()))
    assert summary["ignored_pixels"] == 3 * 3 and summary["converted"] == 3 and summary["unknown_values"] == {}
    # a second run converts the same 3 inputs: the outputs (ending in 's.png') are never taken as inputs
    assert prepare_gta(root, workers=0, progress=False)["converted"] == 3
    assert len(list((root / "labels").glob("*.png"))) == 6


def test_gta_unknown_ids_are_ignored_and_reported(tmp_path):
    root = tmp_path / "gta"
    write_gta(root, n=2, extra={2: (34, 200, 255)})
    summary = prepare_gta(root, workers=0, progress=False)
    src = str(root / "labels" / "00002.png")
    assert summary["unknown_values"] == {src: [34, 200]}  # 255 is a known 'ignore' id
    assert read_png(root / "labels" / "00002_labelTrainIds.png")[0, :3].tolist() == [255, 255, 255]
    text = format_summary(summary)
    assert f"{src}: [34, 200]" in text and "car" in text and "(ignored)" in text


def test_synthia_16bit_last_channel(tmp_path):
    root = tmp_path / "synthia"
    labels = write_synthia(root)
    assert cv2.imread(str(root / "GT/LABELS/0000000.png"), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    assert convert.SYNTHIA_TO_TRAINID == EXPECTED_SYNTHIA
    summary = prepare_synthia(root, workers=0, progress=False)
    for name, cls in labels.items():
        train = read_png(root / "GT/LABELS" / name.replace(".png", "_labelTrainIds.png"))
        np.testing.assert_array_equal(train, expected_train_ids(cls, EXPECTED_SYNTHIA))
    assert train[-1, -1] == 13 and train[3, 12] == 11 and train[-1, 0] == 1 and train[0, 5] == 10 and train[0, 0] == 255
    assert summary["unknown_values"] == {} and summary["stats_files"] == 2
    assert sorted(json.loads((root / "samples_with_class.json").read_text()), key=int) == ["0", "1", "10", "11", "13"]


def test_cityscapes_tree_splits_and_train_only_stats(tmp_path):
    root = tmp_path / "cityscapes"
    labels = write_cityscapes(root)
    summary = prepare_cityscapes(root, workers=0, progress=False)
    assert summary["converted"] == 6 and summary["stats_files"] == 3
    for key, ids in labels.items():
        split, city, name = key.split("/")
        train = read_png(root / "gtFine" / split / city / f"{name}_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(train, expected_train_ids(ids, EXPECTED_CS))
    stats = json.loads((root / "sample_class_stats.json").read_text())
    assert [s["file"] for s in stats] == [str(root / "gtFine/train" / f) for f in (
        "aachen/aachen_000000_000019_gtFine_labelTrainIds.png", "aachen/aachen_000001_000019_gtFine_labelTrainIds.png",
        "bochum/bochum_000000_000019_gtFine_labelTrainIds.png")]
    assert (root / "train.txt").read_text().splitlines() == [
        "aachen/aachen_000000_000019", "aachen/aachen_000001_000019", "bochum/bochum_000000_000019"]
    assert (root / "val.txt").read_text().splitlines() == ["frankfurt/frankfurt_000000_000019", "frankfurt/frankfurt_000001_000019"]
    assert (root / "test.txt").read_text() == "berlin/berlin_000000_000019\n"


def test_custom_dataset_mapping_errors_and_reader(tmp_path):
    imgs, labs = tmp_path / "src/img", tmp_path / "src/ann"
    for sub in ("a", "b/c"):
        (imgs / sub).mkdir(parents=True)
        (labs / sub).mkdir(parents=True)
        cv2.imwrite(str(imgs / sub / "frame.jpg"), np.full((10, 14, 3), 128, np.uint8))
        lab = np.zeros((10, 14), np.uint8)
        lab[5:] = 1
        lab[5:, 7:] = 2
        lab[0, 0] = 5
        Image.fromarray(lab).save(labs / sub / "frame_mask.png")
    mapping = tmp_path / "map.yaml"
    mapping.write_text("mapping: {0: 255, 1: 0, 2: 13}\nimage_suffix: .jpg\nlabel_suffix: _mask.png\n")
    with pytest.raises(DataPrepError, match=r"frame_mask.png: label values \[5\] are not in the mapping") as e:
        prepare_custom(imgs, labs, mapping, tmp_path / "out", workers=0, progress=False)
    assert "--ignore-unknown" in str(e.value) and "2 of 2 label files could not be converted" in str(e.value)
    mapping.write_text("mapping: {0: 255, 1: 0, 2: 13, 5: 255}\nimage_suffix: .jpg\nlabel_suffix: _mask.png\n")
    out = tmp_path / "out"
    summary = prepare_custom(imgs, labs, mapping, out, workers=0, progress=False)
    assert summary["pixels_per_class"] == {0: 2 * 35, 13: 2 * 35} and summary["num_classes"] == 14
    train = read_png(out / "labels/b/c/frame_labelTrainIds.png")
    assert train[0].tolist() == [255] * 14 and train[9].tolist() == [0] * 7 + [13] * 7
    assert (out / "images/b/c/frame.jpg").is_symlink() and (out / "images/b/c/frame.jpg").resolve() == (imgs / "b/c/frame.jpg").resolve()
    ds = SegDataset(out, "custom", pipeline=PipelineConfig(scale=None, crop_size=(8, 8), cat_max_ratio=0.75))
    assert len(ds) == 2 and ds[0]["gt"].shape == (8, 8) and set(ds[0]["gt"].unique().tolist()) <= {0, 13, 255}
    val = ValDataset(out, "custom", scale=None)
    assert val[1]["name"] == "frame" and val[1]["gt"].shape == (10, 14)
    # copies instead of links; a missing label is named with the path it was expected at
    prepare_custom(imgs, labs, mapping, tmp_path / "copy", workers=0, progress=False, copy_images=True)
    assert (tmp_path / "copy/images/a/frame.jpg").is_file() and not (tmp_path / "copy/images/a/frame.jpg").is_symlink()
    (labs / "a/frame_mask.png").unlink()
    with pytest.raises(DataPrepError, match="1 of 2 images have no label") as e:
        prepare_custom(imgs, labs, mapping, out, workers=0, progress=False)
    assert f"expected {labs / 'a/frame_mask.png'}" in str(e.value)


@pytest.mark.parametrize("text,message", [
    ("classes: [a]\n", "expected a non-empty `mapping:`"),
    ("mapping: {0: 0}\nlabel_sufix: .png\n", "unknown keys ['label_sufix']"),
    ("mapping: {'1': 0}\n", "mapping key '1' is not a non-negative integer"),
    ("mapping: {1: 300}\n", "`1: 300` is not a train id"),
    ("mapping: {1: 2}\nclasses: [a, b]\n", "`classes` must list a name for each train id 0..2"),
])
def test_mapping_yaml_errors(tmp_path, text, message):
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(DataPrepError) as e:
        load_label_mapping(tmp_path / "m.yaml")
    assert message in str(e.value) and str(tmp_path / "m.yaml") in str(e.value)


def test_layout_and_file_errors(tmp_path):
    with pytest.raises(DataPrepError, match="does not exist. Expected layout:\nROOT/images/<id>.png"):
        prepare_gta(tmp_path / "missing", progress=False)
    write_gta(tmp_path / "data" / "gta", n=2)
    with pytest.raises(DataPrepError, match=r"did you mean ROOT=.*data/gta\?"):
        prepare_gta(tmp_path / "data", progress=False)
    (tmp_path / "empty/labels").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="holds no label files named <id>.png"):
        prepare_gta(tmp_path / "empty", progress=False, check_images=False)
    with pytest.raises(DataPrepError, match="GT/LABELS does not exist"):
        prepare_synthia(tmp_path / "data" / "gta", progress=False)
    # Cityscapes with only the polygon files, and without split folders
    cs = tmp_path / "cs"
    write_cityscapes(cs)
    for f in cs.rglob("*_labelIds.png"): f.unlink()
    with pytest.raises(DataPrepError, match="only polygon files are there"):
        prepare_cityscapes(cs, progress=False)
    (tmp_path / "cs2/gtFine").mkdir(parents=True)
    with pytest.raises(DataPrepError, match="has none of the split folders"):
        prepare_cityscapes(tmp_path / "cs2", progress=False, check_images=False)


def test_bad_files_are_all_named_and_the_rest_converted(tmp_path):
    root = tmp_path / "gta"
    write_gta(root, n=4)
    cv2.imwrite(str(root / "images/00002.png"), np.zeros((20, 40, 3), np.uint8))  # wrong size
    (root / "images/00003.png").unlink()  # no image
    Image.new("RGB", (40, 24)).save(root / "labels/00004.png")  # a colour label
    with pytest.raises(DataPrepError) as e:
        prepare_gta(root, workers=0, progress=False)
    msg = str(e.value)
    assert "3 of 4 label files could not be converted" in msg
    assert f"{root / 'labels/00002.png'}: the label is 40x24 but its image {root / 'images/00002.png'} is 40x20" in msg
    assert f"its image {root / 'images/00003.png'} is missing" in msg and "--no-image-check" in msg
    assert f"{root / 'labels/00004.png'}: a RGB colour label" in msg
    assert (root / "labels/00001_labelTrainIds.png").is_file() and not (root / "sample_class_stats.json").exists()


def test_rerun_after_interrupted_conversion(tmp_path, monkeypatch):
    root, clean = tmp_path / "gta", tmp_path / "clean"
    write_gta(root, n=6)
    write_gta(clean, n=6)
    prepare_gta(clean, workers=0, progress=False)
    calls = {"n": 0}
    real_save = Image.Image.save

    def flaky_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3: raise KeyboardInterrupt  # Ctrl-C while the third output is being written
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_gta(root, workers=0, progress=False)
    monkeypatch.undo()
    assert sorted(p.name for p in (root / "labels").glob("*_labelTrainIds.png")) == [
        "00001_labelTrainIds.png", "00002_labelTrainIds.png"]
    assert not list(root.rglob("*.tmp")) and not (root / "sample_class_stats.json").exists()
    # a hard kill leaves temporary files behind, and a truncated output of another tool may be there
    (root / "labels/.00004_labelTrainIds.png.k3j2h1g0.tmp").write_bytes(b"\x89PNG half")
    (root / ".sample_class_stats.json.a1b2c3d4.tmp").write_text("[{")
    (root / "labels/00003_labelTrainIds.png").write_bytes(b"\x89PNG\r\n")
    summary = prepare_gta(root, workers=0, progress=False)
    assert summary["converted"] == 6 and summary["stale_temps_removed"] == 2 and not list(root.rglob("*.tmp"))
    for i in range(1, 7):
        name = f"labels/{i:05d}_labelTrainIds.png"
        np.testing.assert_array_equal(read_png(root / name), read_png(clean / name))
    stats = json.loads((root / "sample_class_stats.json").read_text())
    clean_stats = json.loads((clean / "sample_class_stats.json").read_text())
    assert [{k: v for k, v in s.items() if k != "file"} for s in stats] == \
           [{k: v for k, v in s.items() if k != "file"} for s in clean_stats]


def test_parallel_workers_match_serial(tmp_path):
    root = tmp_path / "gta"
    write_gta(root, n=5)
    serial = prepare_gta(root, workers=0, progress=False)
    files = {n: (root / n).read_text() for n in convert.STATS_FILES}
    parallel = prepare_gta(root, workers=2, progress=False)
    assert parallel == serial and files == {n: (root / n).read_text() for n in convert.STATS_FILES}


def test_command_line_tools(tmp_path, capsys):
    write_gta(tmp_path / "gta", n=2)
    res = subprocess.run([sys.executable, str(ROOT / "data_prep/prepare_gta.py"), str(tmp_path / "gta"),
                          "--workers", "2", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "gta: 2 label files converted" in res.stdout and "road" in res.stdout
    res = subprocess.run([sys.executable, str(ROOT / "data_prep/prepare_cityscapes.py"), str(tmp_path / "gta")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("error: cityscapes: the folder") and "Traceback" not in res.stderr
    write_synthia(tmp_path / "syn", n=1)
    assert prepare_cli("synthia", [str(tmp_path / "syn"), "--workers", "0", "--no-progress"]) == 0
    assert "synthia: 1 label files converted" in capsys.readouterr().out


# ---------------------------------------------------------------- reading and the training pipeline


@pytest.fixture
def gta_root(tmp_path):
    root = tmp_path / "gta"
    write_gta(root, n=4, h=41, w=61)
    prepare_gta(root, workers=0, progress=False)
    return root


def test_rescale_rounding():
    assert rescale_size(1914, 1052, (2560, 1440)) == (2560, 1407)
    assert rescale_size(1914, 1052, (1440, 2560)) == (2560, 1407)  # the bounds may be given in either order
    assert rescale_size(61, 41, (90, 60)) == (89, 60)  # 61 * 60/41 = 89.27 -> int(89.77) = 89
    assert rescale_size(1280, 760, (2560, 1520)) == (2560, 1520)


def test_pipeline_resize_normalise_flip(gta_root):
    cfg = PipelineConfig(scale=(90, 60), crop_size=(60, 89), flip_prob=0.0)
    ds = SegDataset(gta_root, "gta", pipeline=cfg)
    s = ds.load(1, make_generator(0))
    assert s["meta"]["img_shape"] == (60, 89) and s["meta"]["crop_box"] == (0, 60, 0, 89) and s["meta"]["flip"] is False
    bgr = cv2.imread(str(gta_root / "images/00002.png"))
    rgb = cv2.resize(bgr, (89, 60), interpolation=cv2.INTER_LINEAR)[..., ::-1].astype(np.float32)
    mean, std = np.array([123.675, 116.28, 103.53], np.float32), np.array([58.395, 57.12, 57.375], np.float32)
    np.testing.assert_allclose(s["img"].permute(1, 2, 0).numpy(), (rgb - mean) / std, rtol=1e-5, atol=1e-5)
    label = read_png(gta_root / "labels/00002_labelTrainIds.png")
    np.testing.assert_array_equal(s["gt"].numpy(), cv2.resize(label, (89, 60), interpolation=cv2.INTER_NEAREST))
    assert s["img"].dtype == torch.float32 and s["gt"].dtype == torch.int64 and "valid_pseudo_mask" not in s
    flipped = SegDataset(gta_root, "gta", pipeline=PipelineConfig((90, 60), (60, 89), flip_prob=1.0)).load(1, make_generator(0))
    assert torch.equal(flipped["img"], s["img"].flip(-1)) and torch.equal(flipped["gt"], s["gt"].flip(-1))
    # an image smaller than the crop is padded: image 0, label 255
    padded = SegDataset(gta_root, "gta", pipeline=PipelineConfig(None, (48, 64), flip_prob=0.0)).load(0, make_generator(0))
    assert padded["img"].shape == (3, 48, 64) and (padded["gt"][41:] == 255).all() and (padded["gt"][:, 61:] == 255).all()
    assert padded["img"][:, 41:].abs().sum() == 0


def test_same_index_same_sample(gta_root):
    cfg = PipelineConfig(scale=(90, 60), crop_size=(24, 24), cat_max_ratio=0.75)
    a, b = SegDataset(gta_root, "gta", pipeline=cfg, seed=3), SegDataset(gta_root, "gta", pipeline=cfg, seed=3)
    for i in (0, 5, 11):
        assert torch.equal(a[i]["img"], b[i]["img"]) and a[i]["meta"] == b[i]["meta"]
    boxes = {a[i]["meta"]["crop_box"] for i in range(12)} | {SegDataset(gta_root, "gta", pipeline=cfg, seed=4)[0]["meta"]["crop_box"]}
    assert len(boxes) > 6


def test_cat_max_ratio():
    label = np.full((32, 40), 0, np.uint8)
    label[:, 20:] = 13  # car in the right half
    label[:4] = 255
    ok = lambda b: (lambda c: len(c[c > 0]) > 1 and c.max() / c[c > 0].sum() < 0.75)(
        np.bincount(label[b[0]:b[1], b[2]:b[3]].ravel(), minlength=256)[:255])
    for seed in range(30):  # the first of at most 11 draws that passes, else the 11th
        draws = [random_crop_box(32, 40, (16, 16), g) for g in [make_generator(seed)] for _ in range(11)]
        expected = next((b for b in draws if ok(b)), draws[-1])
        assert crop_box_cat_max(label, (16, 16), 0.75, make_generator(seed)) == expected
        assert crop_box_cat_max(label, (16, 16), 1.0, make_generator(seed)) == draws[0]
    boxes = [crop_box_cat_max(label, (16, 16), 0.75, make_generator(s)) for s in range(200)]
    plain = [random_crop_box(32, 40, (16, 16), make_generator(s)) for s in range(200)]
    assert sum(map(ok, boxes)) > 170 and sum(map(ok, plain)) < 90  # 7 of 25 offsets pass: 97% vs 28% expected


def test_target_crop_ignores_labels_and_margin_mask(tmp_path):
    root = tmp_path / "cs"
    write_cityscapes(root)
    prepare_cityscapes(root, workers=0, progress=False)
    cfg = PipelineConfig(scale=None, crop_size=(16, 32), flip_prob=0.0, pseudo_margins=(2, 5, 3, 1))
    tgt = SegDataset(root, "cityscapes", pipeline=cfg, role="target")
    s = tgt.load(0, make_generator(0))
    expected = np.ones((16, 32), np.float32)
    expected[:2], expected[-5:], expected[:, :3], expected[:, -1:] = 0, 0, 0, 0
    np.testing.assert_array_equal(s["valid_pseudo_mask"].numpy(), expected)
    flipped = SegDataset(root, "cityscapes", pipeline=PipelineConfig(None, (16, 32), flip_prob=1.0, pseudo_margins=(2, 5, 3, 1)),
                         role="target").load(0, make_generator(0))
    np.testing.assert_array_equal(flipped["valid_pseudo_mask"].numpy(), expected[:, ::-1])
    halved = SegDataset(root, "cityscapes", pipeline=PipelineConfig((16, 8), (8, 16), flip_prob=0.0, pseudo_margins=(2, 4, 2, 2)),
                        role="target").load(0, make_generator(0))
    assert halved["valid_pseudo_mask"].sum() == (8 - 1 - 2) * (16 - 1 - 1)
    # the target crop is a plain random crop: the same boxes as random_crop_box, whatever the labels hold
    small = SegDataset(root, "cityscapes", pipeline=PipelineConfig(None, (8, 8)), role="target")
    for seed in range(10):
        assert small.load(seed % 3, make_generator(seed))["meta"]["crop_box"] == random_crop_box(16, 32, (8, 8), make_generator(seed))
    with pytest.raises(ValueError, match="which UDA must not read"):
        SegDataset(root, "cityscapes", pipeline=PipelineConfig(None, (8, 8), cat_max_ratio=0.75), role="target")


def test_validation_dataset(tmp_path):
    root = tmp_path / "cs"
    labels = write_cityscapes(root)
    prepare_cityscapes(root, workers=0, progress=False)
    val = ValDataset(root, "cityscapes", "val", scale=(16, 8))
    v = val[1]
    assert len(val) == 2 and v["name"] == "frankfurt_000001_000019" and v["img"].shape == (3, 8, 16)
    np.testing.assert_array_equal(v["gt"].numpy(), expected_train_ids(labels["val/frankfurt/frankfurt_000001_000019"], EXPECTED_CS))
    assert v["img"][0, 0, 0].item() == pytest.approx((200 - 123.675) / 58.395, abs=1e-4)  # BGR 200 in blue -> R channel first
    assert ValDataset(root, "cityscapes", "val", scale=None)[0]["img"].shape == (3, 16, 32)



def test_validation_labels_that_are_not_train_ids_or_do_not_fit_their_image_are_errors(tmp_path):
    root = tmp_path / "cs"
    labels = write_cityscapes(root)
    prepare_cityscapes(root, workers=0, progress=False)
    name = "frankfurt_000001_000019"
    trainids = root / "gtFine" / "val" / "frankfurt" / f"{name}_gtFine_labelTrainIds.png"
    Image.fromarray(labels[f"val/frankfurt/{name}"]).save(trainids)  # raw label ids where train ids belong
    val = ValDataset(root, "cityscapes", "val", scale=None)
    with pytest.raises(ValueError, match=r"pixels have values .* outside the train ids 0..18.*hrda prepare cityscapes"):
        val[1]
    assert ValDataset(root, "cityscapes", "val", scale=None, num_classes=None)[1]["gt"].shape == (16, 32)  # unchecked
    Image.fromarray(np.zeros((8, 32), np.uint8)).save(trainids)
    with pytest.raises(ValueError, match="is 32x8 but its image .* is 32x16"):
        val[1]
    Image.fromarray(np.zeros((16, 32), np.uint16)).save(trainids)
    with pytest.raises(OSError, match="a 16-bit label"):
        val[1]

# ---------------------------------------------------------------- rare class sampling and pairs


def write_stats(root, stats):
    root.mkdir(parents=True, exist_ok=True)
    convert.write_class_stats(root, [(f, c) for f, c in stats])


def test_rcs_probabilities_and_frequencies(tmp_path):
    files = [f"/data/elsewhere/labels/{i:05d}_labelTrainIds.png" for i in range(6)]
    stats = [(files[0], {0: 9000, 13: 4000}), (files[1], {0: 9000, 13: 2000}), (files[2], {0: 7000, 18: 3500}),
             (files[3], {0: 8000, 11: 3100, 18: 100}), (files[4], {0: 9000, 11: 4000}), (files[5], {0: 5000, 2: 2900})]
    write_stats(tmp_path, stats)
    totals = {0: 47000, 13: 6000, 18: 3600, 11: 7100, 2: 2900}
    classes, probs = rcs_class_probs(load_class_stats(tmp_path), 0.01)
    assert classes == sorted(totals, key=totals.get)
    f = np.array([totals[c] for c in classes], np.float64) / sum(totals.values())
    z = np.exp((1 - f) / 0.01 - ((1 - f) / 0.01).max())
    np.testing.assert_allclose(probs.numpy(), z / z.sum(), rtol=1e-9)
    # sampling with a milder temperature: class frequencies match the probabilities (chi-square, 3 dof, p ~ 4e-5)
    labels = [f"/prepared/gta/labels/{i:05d}_labelTrainIds.png" for i in range(6)]  # matched by basename
    sampler = RareClassSampler(tmp_path, labels, RCSConfig(temperature=0.5, min_pixels=3000))
    assert sampler.dropped == [2] and sampler.samples == {18: [2], 13: [0], 11: [3, 4], 0: [0, 1, 2, 3, 4, 5]}
    g, n = make_generator(7), 20000
    draws = [sampler.sample(g) for _ in range(n)]
    observed = np.array([sum(c == k for c, _ in draws) for k in sampler.classes])
    expected = sampler.probs.numpy() * n
    _, p_all = rcs_class_probs(load_class_stats(tmp_path), 0.5)
    keep = [classes.index(c) for c in sampler.classes]
    np.testing.assert_allclose(sampler.probs.numpy(), p_all.numpy()[keep] / p_all.numpy()[keep].sum())
    assert ((observed - expected) ** 2 / expected).sum() < 23.5
    files_of_11 = [i for c, i in draws if c == 11]
    assert set(files_of_11) == {3, 4} and abs(files_of_11.count(3) / len(files_of_11) - 0.5) < 0.05


def test_rcs_missing_stats_names_the_command(tmp_path, gta_root):
    with pytest.raises(FileNotFoundError, match=r"sample_class_stats.json is missing.*`python data_prep/prepare_gta.py "):
        RareClassSampler(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="prepare_cityscapes.py"):
        load_class_stats(tmp_path, "cityscapes")
    src = SegDataset(gta_root, "gta", pipeline=PipelineConfig((90, 60), (24, 24)))
    (gta_root / "sample_class_stats.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"python data_prep/prepare_gta.py {gta_root}`"):
        UDADataset(src, rcs=RCSConfig())


def test_rcs_reloads(gta_root):
    src = SegDataset(gta_root, "gta", pipeline=PipelineConfig((90, 60), (24, 24), cat_max_ratio=0.75))
    real, loaded = src.load, []

    def spy(i, g):
        s = real(i, g)
        loaded.append((i, s["gt"].clone(), s["meta"]["crop_box"]))
        return s

    src.load = spy
    # car covers 40 px at the original size, so min_pixels 30 keeps every file; the crop must hold > 15 px of the class
    uda = UDADataset(src, rcs=RCSConfig(temperature=1.0, min_pixels=30, min_crop_ratio=0.5), seed=0)
    n_loads = []
    for i in range(30):
        loaded.clear()
        item = uda[i]
        c = item["meta"]["rcs_class"]
        counts = [int((gt == c).sum()) for _, gt, _ in loaded]
        assert len({k for k, _, _ in loaded}) == 1 and torch.equal(loaded[-1][1], item["gt"])  # the same file reloaded
        assert all(n <= 15 for n in counts[:-1]) and (counts[-1] > 15 or len(counts) == 11)
        n_loads.append(len(counts))
    assert max(n_loads) > 1 and min(n_loads) == 1
    loaded.clear()
    UDADataset(src, rcs=RCSConfig(min_pixels=30, min_crop_ratio=1e9), seed=0)[0]  # never enough: 1 load + 10 reloads
    assert len(loaded) == 11 and len({b for _, _, b in loaded}) > 3  # each reload draws a new crop
    loaded.clear()
    UDADataset(src, rcs=RCSConfig(min_pixels=30, min_crop_ratio=0.0), seed=0)[0]
    assert len(loaded) == 1


def test_uda_pairs_deterministic_and_worker_independent(gta_root, tmp_path):
    cs = tmp_path / "cs"
    write_cityscapes(cs)
    prepare_cityscapes(cs, workers=0, progress=False)
    src = SegDataset(gta_root, "gta", pipeline=PipelineConfig((90, 60), (24, 24), cat_max_ratio=0.75))
    tgt = SegDataset(cs, "cityscapes", pipeline=PipelineConfig((32, 16), (16, 16), pseudo_margins=(1, 3, 1, 1)), role="target")
    rcs = RCSConfig(temperature=0.5, min_pixels=30, min_crop_ratio=0.5)
    uda = UDADataset(src, tgt, rcs, seed=5)
    item = uda[3]
    assert set(item) == {"img", "gt", "meta", "target_img", "valid_pseudo_mask", "target_meta"}  # no target labels
    assert "label_path" not in item["target_meta"]
    oracle = UDADataset(src, SegDataset(cs, "cityscapes", pipeline=PipelineConfig((32, 16), (16, 16), pseudo_margins=(1, 3, 1, 1)),
                                        role="target", labels=True), rcs, seed=5)[3]  # a mode that asks for them
    assert oracle["target_gt"].shape == (16, 16) and (oracle["target_gt"] != 255).any()
    assert torch.equal(oracle["target_img"], item["target_img"])  # reading the labels changes no draw
    assert item["valid_pseudo_mask"].shape == (16, 16) and item["target_img"].shape == (3, 16, 16)
    again = UDADataset(src, tgt, rcs, seed=5)[3]
    assert all(torch.equal(item[k], again[k]) for k in ("img", "gt", "target_img", "valid_pseudo_mask"))
    assert item["meta"] == again["meta"] and item["target_meta"] == again["target_meta"]
    other = [UDADataset(src, tgt, rcs, seed=6)[3], uda[4]]
    assert all(not torch.equal(item["img"], o["img"]) or not torch.equal(item["target_img"], o["target_img"]) for o in other)
    # the target of item i does not depend on RCS
    assert torch.equal(UDADataset(src, tgt, None, seed=5)[3]["target_img"], item["target_img"])
    # a DataLoader with 2 workers over a sequential sampler gives exactly the items of direct indexing
    loader = torch.utils.data.DataLoader(uda, batch_size=2, num_workers=2, shuffle=False,
                                         sampler=torch.utils.data.SequentialSampler(range(6)))
    batches = list(loader)
    for b, batch in enumerate(batches):
        direct = torch.utils.data.default_collate([uda[2 * b], uda[2 * b + 1]])
        for k in ("img", "gt", "target_img", "valid_pseudo_mask"):
            assert torch.equal(batch[k], direct[k])
    source_only = UDADataset(src, seed=5)[0]
    assert set(source_only) == {"img", "gt", "meta"} and source_only["meta"]["rcs_class"] == -1
