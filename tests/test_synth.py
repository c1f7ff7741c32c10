"""The synthetic benchmark: deterministic bytes, the GTA/Cityscapes on-disk formats, and its three measured properties."""
import json
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT  # noqa: F401  (the repository root; imports hrda from the checkout)
from hrda.core import derive_seed
from hrda.synth import (VAL_CITIES, color_stats, generate_benchmark, grid_iou, make_sample, prepare_synth, run_widths, synth_paths)
from hrda.scenes import (FINE_CLASSES, LABEL_IDS, SOURCE_STYLE, SYNTH_CLASSES, SYNTH_TRAIN_IDS, TARGET_STYLE, render_scene, sample_layout, to_train_ids)

SMALL = dict(n_source=3, n_target=3, n_val=2)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    "A small benchmark, generated in this process."
    root = tmp_path_factory.mktemp("synth") / "bench"
    generate_benchmark(root, seed=3, workers=0, **SMALL)
    return root


def test_same_seed_same_bytes_in_any_number_of_processes(bench, tmp_path):
    generate_benchmark(tmp_path / "again", seed=3, workers=2, **SMALL)
    a, b = _files(bench), _files(tmp_path / "again")
    assert len(a) == 2 * sum(SMALL.values()) and a == b


def test_other_seed_other_images(bench, tmp_path):
    generate_benchmark(tmp_path / "other", seed=4, workers=0, **SMALL)
    a, b = _files(bench), _files(tmp_path / "other")
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_on_disk_layout_and_label_values(bench):
    ids = set(LABEL_IDS.values())
    for i in range(SMALL["n_source"]):
        img, lab = synth_paths(bench, "source", i)
        assert img == bench / f"source/images/{i:05d}.png" and lab == bench / f"source/labels/{i:05d}.png"
        with Image.open(img) as im: assert (im.mode, im.size) == ("RGB", (512, 256))
        with Image.open(lab) as im:
            assert im.mode == "P" and im.size == (512, 256)  # like GTA: a palette PNG whose indices are label ids
            assert set(np.unique(np.asarray(im))) <= ids
    for split, n in (("train", SMALL["n_target"]), ("val", SMALL["n_val"])):
        for i in range(n):
            img, lab = synth_paths(bench, split, i)
            assert img.name.endswith("_000019_leftImg8bit.png") and lab.name.endswith("_000019_gtFine_labelIds.png")
            assert img.parent.parent == bench / "target/leftImg8bit" / split and img.parent.name == lab.parent.name
            with Image.open(lab) as im: assert im.mode == "L" and set(np.unique(np.asarray(im))) <= ids
    assert sorted(p.name for p in (bench / "target/leftImg8bit/val").iterdir()) == sorted(VAL_CITIES)
    manifest = json.loads((bench / "synth.json").read_text())
    assert manifest["complete"] and manifest["summary"]["images"] == {"source": 3, "train": 3, "val": 2}
    shares = manifest["summary"]["class_pixel_share"]["source"]
    assert abs(sum(shares.values()) - 1) < 1e-3 and all(shares[c] > 0 for c in SYNTH_CLASSES)


def test_rerun_skips_complete_files_and_rewrites_missing_ones(bench):
    lab = synth_paths(bench, "train", 1)[1]
    before = lab.read_bytes()
    lab.unlink()
    (lab.parent / f".{lab.name}.abc.tmp").write_bytes(b"half")  # an interrupted write is not a complete file
    s = generate_benchmark(bench, seed=3, workers=0, **SMALL)
    assert (s["written"], s["skipped"]) == (1, sum(SMALL.values()) - 1) and lab.read_bytes() == before
    (lab.parent / f".{lab.name}.abc.tmp").unlink()
    with pytest.raises(ValueError, match="n_val: 2 -> 5"):
        generate_benchmark(bench, seed=3, n_source=3, n_target=3, n_val=5)


def test_converters_process_the_tree(tmp_path):
    root = tmp_path / "bench"
    generate_benchmark(root, seed=5, workers=0, **SMALL)
    prepare_synth(root, workers=0)
    for split, n in (("source", 3), ("train", 3), ("val", 2)):
        for i in range(n):
            lab = synth_paths(root, split, i)[1]
            out = lab.with_name(lab.name.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png")
                                if split != "source" else f"{i:05d}_labelTrainIds.png")
            with Image.open(lab) as a, Image.open(out) as b:
                assert b.mode == "L" and np.array_equal(np.asarray(b), to_train_ids(np.asarray(a)))
                assert set(np.unique(np.asarray(b))) <= set(SYNTH_TRAIN_IDS)
    assert len(json.loads((root / "source/sample_class_stats.json").read_text())) == 3
    assert len(json.loads((root / "target/sample_class_stats.json").read_text())) == 3  # train split only
    assert len((root / "target/val.txt").read_text().split()) == 2


def test_fine_classes_fit_the_full_resolution_grid_but_not_the_half_resolution_one():
    labels = [render_scene(sample_layout(np.random.default_rng(derive_seed(11, i))), SOURCE_STYLE,
                           np.random.default_rng(i))[1] for i in range(16)]
    inter, union = {4: 0, 8: 0}, {4: 0, 8: 0}
    widths = []
    for lab in labels:
        for c in inter:
            i, u = grid_iou(to_train_ids(lab), c)
            inter[c], union[c] = inter[c] + i, union[c] + u
        widths.append(run_widths(lab == LABEL_IDS["pole"])[lab == LABEL_IDS["pole"]])
    w = np.concatenate(widths)
    assert ((w >= 3) & (w <= 6)).mean() > 0.85 and ((w >= 4) & (w <= 5)).mean() > 0.5 and (w <= 2).mean() < 0.05
    drop = dict(zip(SYNTH_CLASSES, 100 * (inter[4] / union[4] - inter[8] / union[8])))
    assert drop["pole"] > 15 and all(drop[c] > 8 for c in FINE_CLASSES), drop
    assert all(drop[c] < 7 for c in ("road", "building", "sky", "car")), drop


def test_domain_gap_keeps_the_relative_look():
    def stats(split, idx):
        acc = [color_stats(*make_sample(0, split, i)) for i in idx]
        sums, hist = sum(a[0] for a in acc), sum(a[1] for a in acc)
        return sums[:, :3] / np.maximum(sums[:, 3:], 1), hist / np.maximum(hist.sum(-1, keepdims=True), 1)
    (ms, hs), (ms2, hs2), (mt, ht) = stats("source", range(0, 16)), stats("source", range(16, 32)), stats("train", range(16))
    tv = lambda p, q: 0.5 * np.abs(p - q).sum(-1).mean(-1)
    between, within = tv(hs, ht), tv(hs, hs2)
    stuff = [SYNTH_CLASSES.index(c) for c in ("road", "sidewalk", "building", "vegetation", "sky", "pole")]
    assert (between[stuff] > 1.3 * within[stuff]).all() and np.median(between / within) > 2, (between, within)
    dist, dist_within = np.linalg.norm(ms - mt, axis=1), np.linalg.norm(ms - ms2, axis=1)
    assert (dist[stuff] > 20).all() and (dist[stuff] > 3 * dist_within[stuff]).all(), (dist, dist_within)
    luma = np.array([0.299, 0.587, 0.114])
    rank = lambda v: np.argsort(np.argsort(v))
    assert np.corrcoef(rank(ms @ luma), rank(mt @ luma))[0, 1] > 0.8


def test_road_and_sidewalk_differ_by_context_only():
    for style in (SOURCE_STYLE, TARGET_STYLE):
        stats = {c: [[], [], []] for c in ("road", "sidewalk")}
        for i in range(12):
            layout = sample_layout(np.random.default_rng(derive_seed(12, i)))
            rgb, lab = render_scene(layout, style, np.random.default_rng(i))
            g = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
            mu = cv2.blur(g, (9, 9)); sd = np.sqrt(np.maximum(cv2.blur(g * g, (9, 9)) - mu * mu, 0))
            for c, acc in stats.items():
                inner = cv2.erode((lab == LABEL_IDS[c]).astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
                acc[0].append(mu[inner]); acc[1].append(sd[inner])
                acc[2].append(np.abs(np.nonzero(inner)[1] + 0.5 - layout.vanish_x) / layout.size[1])
        road, side = ({k: np.median(np.concatenate(v)) for k, v in zip("msx", stats[c])} for c in ("road", "sidewalk"))
        assert abs(road["m"] - side["m"]) < 8 and abs(road["s"] - side["s"]) < 1, (style.name, road, side)
        assert side["x"] > road["x"] + 0.1


def test_riders_are_pedestrians_on_bicycles():
    import dataclasses
    from hrda.scenes import SceneObject
    clean = dataclasses.replace(SOURCE_STYLE, texture={}, grain={}, noise=(0, 0), jitter=0)
    base = sample_layout(np.random.default_rng(4), n_poles=(0, 0), n_persons=(0, 0), n_riders=(0, 0), n_cars=(0, 0))
    s, h = 90.0, 1.15
    walker = SceneObject("person", 200.0, 230.0, s, (h, 0.1, 1))
    rider = SceneObject("rider", 200.0, 230.0 + 0.9 * 0.22 * s, s, (h, 0.1, 1))
    (a, la), (b, lb) = (render_scene(dataclasses.replace(base, objects=(o,)), clean, np.random.default_rng(9))
                        for o in (walker, rider))
    top = slice(0, int(230 - 0.65 * h * s))
    assert np.array_equal(a[top], b[top]) and (la[top] == LABEL_IDS["person"]).sum() > 500
    assert np.array_equal(la[top] == LABEL_IDS["person"], lb[top] == LABEL_IDS["rider"])
    assert (lb == LABEL_IDS["bicycle"]).sum() > 500 and not (la == LABEL_IDS["bicycle"]).any()


def test_generation_speed_is_reported(tmp_path):
    t = time.perf_counter()
    s = generate_benchmark(tmp_path / "speed", n_source=8, n_target=8, n_val=0, seed=0, workers=0)
    per_image = (time.perf_counter() - t) / 16
    print(f"\nsynthetic benchmark: {1000 * per_image:.0f} ms per 512x256 image on one process "
          f"(default 660 images: about {660 * per_image:.0f} s on one core)")
    assert s["written"] == 16
