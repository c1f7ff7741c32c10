"""Out-of-target evaluation sets: WildDash2, BDD100K and Mapillary Vistas trees in their download formats, converted
to Cityscapes train ids, checked, read by `ValDataset` and scored by `hrda evaluate`."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import hrda.cli as cli
from hrda.convert import DataPrepError
from hrda.datasets import ValDataset, find_samples
from hrda.outoftarget import mapillary_table, prepare_bdd100k, prepare_mapillary, prepare_wilddash2
from hrda.predict import tiny_checkpoint

H, W = 24, 40
RNG = np.random.default_rng(0)

# The 66 class names of Mapillary Vistas v1.2 in the order of its config json (the label values index this list).
MAPILLARY_V12 = (
    "animal--bird animal--ground-animal construction--barrier--curb construction--barrier--fence "
    "construction--barrier--guard-rail construction--barrier--other-barrier construction--barrier--wall "
    "construction--flat--bike-lane construction--flat--crosswalk-plain construction--flat--curb-cut "
    "construction--flat--parking construction--flat--pedestrian-area construction--flat--rail-track "
    "construction--flat--road construction--flat--service-lane construction--flat--sidewalk "
    "construction--structure--bridge construction--structure--building construction--structure--tunnel human--person "
    "human--rider--bicyclist human--rider--motorcyclist human--rider--other-rider marking--crosswalk-zebra "
    "marking--general nature--mountain nature--sand nature--sky nature--snow nature--terrain nature--vegetation "
    "nature--water object--banner object--bench object--bike-rack object--billboard object--catch-basin "
    "object--cctv-camera object--fire-hydrant object--junction-box object--mailbox object--manhole object--phone-booth "
    "object--pothole object--street-light object--support--pole object--support--traffic-sign-frame "
    "object--support--utility-pole object--traffic-light object--traffic-sign--back object--traffic-sign--front "
    "object--trash-can object--vehicle--bicycle object--vehicle--boat object--vehicle--bus object--vehicle--car "
    "object--vehicle--caravan object--vehicle--motorcycle object--vehicle--on-rails object--vehicle--other-vehicle "
    "object--vehicle--trailer object--vehicle--truck object--vehicle--wheeled-slow void--car-mount void--ego-vehicle "
    "void--unlabeled").split()
# VFM-UDA's Mapillary table (github.com/tue-mps/vfm-uda, datasets/utils/mappings.py), written as v1.2 indices.
VFM_UDA_MAPILLARY = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9,
                     27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}


def jpg(path, h=H, w=W):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


def stripes(values, h=H, w=W):
    "An (h, w) array of horizontal bands, one per value, as equal as the height allows."
    return np.repeat(np.asarray(values), np.diff(np.linspace(0, h, len(values) + 1).astype(int)))[:, None].repeat(w, 1)


def files_of(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- WildDash2 (COCO panoptic)
WD_CATEGORIES = (7, 8, 14, 24, 26, 35, 38, 47)  # road, sidewalk, guard rail, person, car, van, road marking, motorcyclist
WD_DEFAULT = {7: 0, 8: 1, 14: 255, 24: 11, 26: 13, 35: 255, 38: 255, 47: 255}  # the Cityscapes id table only
WD_EXTENDED = {**WD_DEFAULT, 35: 13, 38: 0, 47: 12}  # and the dataset authors' policy for WildDash2's own classes


def write_wilddash2(root, names=("at0001_100000", "zw0009_100000")):
    "images/*.jpg, panoptic/*.png (id = R + 256 G + 256² B) and panoptic.json; the category of each pixel, per image."
    images, annotations, truth = [], [], {}
    for k, name in enumerate(names):
        jpg(root / "images" / f"{name}.jpg")
        cats = stripes(np.roll(WD_CATEGORIES, k))
        seg_of = {c: 1 + 40503 * (i + 1) + 7 * k for i, c in enumerate(WD_CATEGORIES)}  # ids above 65535 use all of R, G, B
        ids = np.vectorize(seg_of.get)(cats)
        ids[:, :3], cats[:, :3] = 0, 0  # no segment: unlabelled
        (root / "panoptic").mkdir(parents=True, exist_ok=True)
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(rgb).save(root / "panoptic" / f"{name}.png")
        images.append({"id": name, "file_name": f"{name}.jpg", "height": H, "width": W})
        annotations.append({"image_id": name, "file_name": f"{name}.png",
                            "segments_info": [{"id": seg_of[c], "category_id": c, "iscrowd": 0} for c in WD_CATEGORIES]})
        truth[name] = cats
    categories = [{"id": i, "name": f"class{i}", "isthing": 0} for i in range(81)]
    (root / "panoptic.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return truth


def expected(cats, table):
    return np.vectorize(lambda c: table.get(c, 255))(cats).astype(np.uint8)


@pytest.mark.parametrize("extended", [False, True])
def test_wilddash2_panoptic_labels_become_train_ids(tmp_path, extended):
    truth = write_wilddash2(tmp_path)
    s = prepare_wilddash2(tmp_path, workers=0, progress=False, extended=extended)
    assert s["converted"] == 2
    for name, cats in truth.items():
        got = np.asarray(Image.open(tmp_path / "labelTrainIds" / f"{name}_labelTrainIds.png"))
        assert got.dtype == np.uint8 and np.array_equal(got, expected(cats, WD_EXTENDED if extended else WD_DEFAULT))
    val = ValDataset(tmp_path, "wilddash2", "val", scale=None)
    assert [v["name"] for v in val] == sorted(truth) and val[0]["gt"].shape == (H, W)


def test_wilddash2_runs_again_to_the_same_files_and_clears_stale_temps(tmp_path):
    write_wilddash2(tmp_path)
    prepare_wilddash2(tmp_path, workers=2, progress=False)
    first = files_of(tmp_path)
    (tmp_path / "labelTrainIds" / ".at0001_100000_labelTrainIds.png.tmp").write_bytes(b"half")
    s = prepare_wilddash2(tmp_path, workers=0, progress=False)
    assert s["stale_temps_removed"] == 1 and files_of(tmp_path) == first


def wd_error(root, **kw):
    with pytest.raises(DataPrepError) as e:
        prepare_wilddash2(root, workers=0, progress=False, **kw)
    return str(e.value)


def test_wilddash2_bad_inputs_name_the_fix(tmp_path):
    assert "the dataset folder" in wd_error(tmp_path / "nothing")
    write_wilddash2(tmp_path / "wd")
    err = wd_error(tmp_path)  # the parent of the dataset folder
    assert f"did you mean ROOT={tmp_path / 'wd'}?" in err and "\n" not in err
    root = tmp_path / "wd"
    meta = json.loads((root / "panoptic.json").read_text())
    (root / "panoptic.json").unlink()
    assert "panoptic.json does not exist" in wd_error(root)
    (root / "panoptic.json").write_text(json.dumps({**meta, "categories": meta["categories"][:30]}))
    assert "category ids [35, 38, 47] that its categories list lacks" in wd_error(root)
    bad = json.loads(json.dumps(meta))
    bad["annotations"][0]["segments_info"].pop()  # a segment of the PNG that the json does not list
    (root / "panoptic.json").write_text(json.dumps(bad))
    assert "are not among its segments in panoptic.json" in wd_error(root)
    (root / "panoptic.json").write_text(json.dumps(meta))
    jpg(root / "images" / "zw0009_100000.jpg", H, W + 2)
    assert "but its image" in wd_error(root) and "they must match" in wd_error(root)
    (root / "images" / "zw0009_100000.jpg").unlink()
    assert "its image" in wd_error(root) and "is missing" in wd_error(root)
    assert prepare_wilddash2(root, workers=0, progress=False, check_images=False)["converted"] == 2
    jpg(root / "images" / "zw0009_100000.jpg")
    jpg(root / "images" / "xx0000_100000.jpg")  # an image that panoptic.json does not annotate
    assert "1 of 3 images" in wd_error(root) and "have no label" in wd_error(root)
    (root / "images" / "xx0000_100000.jpg").unlink()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(root / "panoptic" / "at0001_100000.png")
    assert "not an RGB panoptic label" in wd_error(root)
    for p in (root / "panoptic").glob("*.png"): p.unlink()
    assert "holds no PNG files" in wd_error(root)


# ---------------------------------------------------------------- BDD100K (masks of train ids)
def write_bdd100k(root, first_release=False):
    "Two val and one train image with masks of train ids; the masks, by image name."
    images, labels, suffix = (("seg/images", "seg/labels", "_train_id.png") if first_release
                              else ("images/10k", "labels/sem_seg/masks", ".png"))
    masks = {}
    for split, name in (("val", "b1c66a42-6f7d68ca"), ("val", "7d06fefd-f7be05a6"), ("train", "0004a4c0-d4dff0ad")):
        jpg(root / images / split / f"{name}.jpg")
        masks[name] = stripes([0, 10, 13, 18, 255, 5])
        (root / labels / split).mkdir(parents=True, exist_ok=True)
        Image.fromarray(masks[name].astype(np.uint8)).save(root / labels / split / f"{name}{suffix}")
    jpg(root / images / "test" / "ffffffff-00000000.jpg")  # test images have no masks
    return masks


@pytest.mark.parametrize("first_release", [False, True])
def test_bdd100k_masks_are_checked_and_written_as_train_ids(tmp_path, first_release):
    masks = write_bdd100k(tmp_path, first_release)
    s = prepare_bdd100k(tmp_path, workers=0, progress=False)
    assert s["converted"] == 3 and set(s["pixels_per_class"]) == {0, 5, 10, 13, 18}
    pairs = find_samples(tmp_path, "bdd100k", "val")
    assert len(pairs) == 2 and all(lab.endswith("_labelTrainIds.png") for _, lab in pairs)
    for img, lab in pairs:
        assert np.array_equal(np.asarray(Image.open(lab)), masks[img.rsplit("/", 1)[1][:-4]])
    first = files_of(tmp_path)
    prepare_bdd100k(tmp_path, workers=0, progress=False)
    assert files_of(tmp_path) == first  # the outputs are never taken as inputs
    assert ValDataset(tmp_path, "bdd100k", "val", scale=None)[0]["gt"].unique().tolist() == [0, 5, 10, 13, 18, 255]


def bdd_error(root):
    with pytest.raises(DataPrepError) as e:
        prepare_bdd100k(root, workers=0, progress=False)
    return str(e.value)


def test_bdd100k_bad_inputs_name_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "labels/sem_seg/masks does not exist" in bdd_error(tmp_path / "empty")
    root = tmp_path / "bdd100k"
    write_bdd100k(root)
    assert f"did you mean ROOT={root}?" in bdd_error(tmp_path)
    masks = root / "labels/sem_seg/masks/val"
    Image.fromarray(stripes([0, 19, 40]).astype(np.uint8)).save(masks / "b1c66a42-6f7d68ca.png")
    assert "label values [19, 40] are not train ids" in bdd_error(root)
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(masks / "b1c66a42-6f7d68ca.png")  # a colormap, not a mask
    assert "RGB colour label" in bdd_error(root)
    Image.fromarray(np.zeros((H + 1, W), np.uint8)).save(masks / "b1c66a42-6f7d68ca.png")
    assert "they must match" in bdd_error(root)
    (masks / "b1c66a42-6f7d68ca.png").unlink()
    assert "1 of 2 images in" in bdd_error(root) and "move these out" in bdd_error(root)
    for p in masks.iterdir(): p.unlink()
    assert "holds no *.png masks" in bdd_error(root)


# ---------------------------------------------------------------- Mapillary Vistas (palette PNGs + config json)
def test_the_v1_2_table_by_name_is_vfm_udas_index_table():
    from hrda.outoftarget import mapillary_train_id
    assert len(MAPILLARY_V12) == 66
    table = {i: mapillary_train_id(n) for i, n in enumerate(MAPILLARY_V12)}
    assert {i: t for i, t in table.items() if t != 255} == VFM_UDA_MAPILLARY


def write_mapillary(root, layout="v2.0 download"):
    "Palette label PNGs indexing the config's names: the v1.2-only layout or the v2.0 download with both versions."
    v12 = MAPILLARY_V12
    v20 = ["construction--flat--road", "marking--continuous--solid", "marking--discrete--crosswalk-zebra",
           "object--traffic-light--pedestrians", "human--person--individual", "object--vehicle--vehicle-group",
           "void--unlabeled"]
    values = {"1.2": [13, 24, 23, 48, 19, 55, 65], "2.0": list(range(7))}
    truth = {"1.2": [0, 0, 255, 6, 11, 13, 255], "2.0": [0, 0, 255, 6, 11, 255, 255]}
    versions = ["1.2"] if layout == "v1.2 download" else ["1.2", "2.0"]
    for v in versions:
        names = v12 if v == "1.2" else v20
        config = "config.json" if layout == "v1.2 download" else f"config_v{v}.json"
        (root / config).parent.mkdir(parents=True, exist_ok=True)
        (root / config).write_text(json.dumps({"labels": [{"name": n, "readable": n, "color": [i, i, i],
                                                            "instances": False, "evaluate": True}
                                                           for i, n in enumerate(names)], "version": v}))
        for split, name in (("validation", "--aB3xYz_0Q"), ("training", "0035fkbjWljhaftpVM37-g")):
            labels = root / split / ("labels" if layout == "v1.2 download" else f"v{v}/labels")
            labels.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(stripes(values[v]).astype(np.uint8))
            im.putpalette([c for i in range(len(names)) for c in (i, 255 - i, 3 * i % 256)])
            im.save(labels / f"{name}.png")
            if not (root / split / "images" / f"{name}.jpg").exists(): jpg(root / split / "images" / f"{name}.jpg")
    return {v: stripes(t).astype(np.uint8) for v, t in truth.items() if v in versions}


@pytest.mark.parametrize("layout,version", [("v1.2 download", None), ("v2.0 download", None), ("v2.0 download", "2.0")])
def test_mapillary_labels_become_train_ids_by_class_name(tmp_path, layout, version):
    truth = write_mapillary(tmp_path, layout)
    s = prepare_mapillary(tmp_path, version, workers=0, progress=False)
    assert (s["version"], s["converted"]) == (version or "1.2", 2)
    label = tmp_path / "validation" / "labelTrainIds" / "--aB3xYz_0Q_labelTrainIds.png"
    assert np.array_equal(np.asarray(Image.open(label)), truth[version or "1.2"])
    assert [lab for _, lab in find_samples(tmp_path, "mapillary", "val")] == [str(label)]  # val reads validation/
    first = files_of(tmp_path)
    prepare_mapillary(tmp_path, version, workers=2, progress=False)
    assert files_of(tmp_path) == first


def mv_error(root, version=None):
    with pytest.raises(DataPrepError) as e:
        prepare_mapillary(root, version, workers=0, progress=False)
    return str(e.value)


def test_mapillary_bad_inputs_name_the_fix(tmp_path):
    write_mapillary(tmp_path)
    (tmp_path / "config_v1.2.json").unlink()
    err = mv_error(tmp_path)
    assert "config_v1.2.json or" in err and "config.json is missing" in err and "extract it" in err
    assert "config_v2.0.json" not in err
    labels = tmp_path / "validation" / "v2.0" / "labels" / "--aB3xYz_0Q.png"
    Image.fromarray(stripes([0, 7, 9]).astype(np.uint8)).save(labels)  # 7 classes in this config: 7 and 9 are outside
    assert "label values [7, 9] are not among the 7 classes of config v2.0" in mv_error(tmp_path, "2.0")
    Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(labels)
    assert "they must match" in mv_error(tmp_path, "2.0")
    (tmp_path / "config_v2.0.json").write_text("{\"labels\": [\"road\"]}")
    assert "is not a list of classes with a `name`" in mv_error(tmp_path, "2.0")
    (tmp_path / "config_v2.0.json").write_text("not json")
    assert "cannot read" in mv_error(tmp_path, "2.0")
    assert "the folder" in mv_error(tmp_path / "validation") and "does not exist" in mv_error(tmp_path / "validation")
    with pytest.raises(DataPrepError, match="unknown version"):
        prepare_mapillary(tmp_path, "3.0", workers=0, progress=False)


def test_mapillary_table_counts_the_classes_of_a_config(tmp_path):
    write_mapillary(tmp_path)
    table, n = mapillary_table(tmp_path / "config_v2.0.json")
    assert (table, n) == ({0: 0, 1: 0, 3: 6, 4: 11}, 7)


# ---------------------------------------------------------------- the command line
def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_hrda_prepare_converts_and_reports_one_line_errors(capsys, tmp_path):
    write_wilddash2(tmp_path / "wd")
    code, out, err = run(capsys, "prepare", "wilddash2", tmp_path / "wd", "--workers", "0", "--no-progress")
    assert code == 0 and out.startswith("wilddash2: 2 label files converted") and not err
    code, out, err = run(capsys, "prepare", "mapillary", tmp_path / "wd", "--workers", "0", "--no-progress")
    assert code == 1 and not out and len(err.strip().splitlines()) == 1
    assert err.startswith("hrda prepare mapillary: error: mapillary: the folder")
    code, _, err = run(capsys, "prepare", "mapillary", tmp_path, "--version", "9")
    assert code == 2 and "invalid choice: '9'" in err
    code, out, _ = run(capsys, "prepare", "bdd100k", "--help")
    assert code == 0 and "labels/sem_seg/masks" in out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A tiny untrained checkpoint: the scores are meaningless, the path through evaluation is the point."
    return tiny_checkpoint(tmp_path_factory.mktemp("runs") / "exp" / "s0" / "checkpoints" / "latest.pth")


@pytest.mark.parametrize("dataset", ["wilddash2", "bdd100k", "mapillary"])
def test_hrda_evaluate_scores_a_prepared_out_of_target_set(capsys, tmp_path, ckpt, dataset):
    torch.set_num_threads(1)
    root = tmp_path / dataset
    write = {"wilddash2": write_wilddash2, "bdd100k": write_bdd100k, "mapillary": write_mapillary}[dataset]
    write(root)
    assert run(capsys, "prepare", dataset, root, "--workers", "0", "--no-progress")[0] == 0
    code, out, err = run(capsys, "evaluate", "--checkpoint", ckpt, "--dataset", dataset, "--data", root,
                         "--device", "cpu", "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err
    n = 1 if dataset == "mapillary" else 2
    assert out.startswith(f"{n} images of {root} ({dataset} val): ") and "mIoU" in out
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert (metrics["dataset"], metrics["num_images"]) == (dataset, n) and 0 <= metrics["mIoU"] <= 100
