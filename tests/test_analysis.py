"""Report tables and figures from fixture run folders: seed statistics, results table, figures as small PNGs."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hrda.analysis import (build_report, find_runs, load_run, mean_metrics, plot_attention, plot_per_class_iou,
                           plot_qualitative, plot_training_curves, results_table, save_figure, seed_table,
                           seed_table_markdown)
from hrda.core import CLASSES, colorize

# mIoU of each run = its first number; per-class IoU chosen so the expected table values are easy to check by hand
RUNS = {
    ("hrda", "s0"): 70.0, ("hrda", "s1"): 71.5, ("hrda", "s2"): 73.0,
    ("daformer", "s0"): 66.0, ("daformer", "s1"): 68.0,
    ("source_only", "s0"): 40.0,
}


def ious(miou):
    base = {c: None for c in CLASSES}
    base.update({"road": miou + 20, "pole": miou - 30, "traffic light": miou - 20, "person": miou - 10, "car": miou + 10})
    return base


def write_run(root, experiment, run, miou, eval_miou=None, predictions=None):
    d = root / experiment / run
    d.mkdir(parents=True)
    final = {"mIoU": miou, "aAcc": 90.0, "IoU": ious(miou)}
    evals = [{"iteration": 100, "mIoU": miou - 5, "IoU": ious(miou - 5)}, {"iteration": 200, **final}]
    (d / "metrics.json").write_text(json.dumps({"experiment": experiment, "run": run, "iterations": 200, "wall_time_s": 9,
                                                "final": final, "evals": evals, "config": {},
                                                "provenance": {"git_commit": f"c_{experiment}"}}))
    (d / "log.jsonl").write_text("".join(json.dumps({"iteration": i, "decode.loss_seg": 1.0 / i, "lr": 1e-4}) + "\n"
                                         for i in (50, 100, 150, 200)))
    if eval_miou is not None:
        (d / "eval").mkdir()
        (d / "eval" / "metrics.json").write_text(json.dumps({"experiment": experiment, "run": run, "mIoU": eval_miou,
                                                             "IoU": ious(eval_miou)}))
    if predictions is not None:
        labels = d / "eval" / "predictions" / "labels"
        labels.mkdir(parents=True)
        for name, pred in predictions.items(): Image.fromarray(pred).save(labels / f"{name}.png")
        index = {name: {"image": str(root / "data" / f"{name}.png"), "label": str(root / "data" / f"{name}_gt.png")}
                 for name in predictions}
        (d / "eval" / "predictions" / "index.json").write_text(json.dumps(index))
    return d


@pytest.fixture
def root(tmp_path):
    for (exp, run), miou in RUNS.items(): write_run(tmp_path / "reports", exp, run, miou)
    return tmp_path / "reports"


def test_seed_table_mean_and_sample_std(root):
    runs = find_runs(f"{root}/*/s*")
    table = seed_table(runs).set_index("method")
    assert list(table.index) == ["daformer", "hrda", "source_only"]
    assert table.loc["hrda", "n"] == 3
    assert table.loc["hrda", "mean"] == pytest.approx(71.5)
    assert table.loc["hrda", "std"] == pytest.approx(1.5)  # sample std of 70, 71.5, 73
    assert table.loc["daformer", "mean"] == pytest.approx(67.0)
    assert table.loc["daformer", "std"] == pytest.approx(math.sqrt(2))  # sample std of 66, 68
    assert math.isnan(table.loc["source_only", "std"])
    assert table.loc["hrda", "runs"] == ["hrda/s0", "hrda/s1", "hrda/s2"]
    md = seed_table_markdown(seed_table(runs)).splitlines()
    assert md[2:] == ["| daformer | 2 | 67.00 ± 1.41 | 66.00, 68.00 |", "| hrda | 3 | 71.50 ± 1.50 | 70.00, 71.50, 73.00 |",
                      "| source_only | 1 | 40.00 | 40.00 |"]
    pole = seed_table(runs, "IoU.pole").set_index("method")
    assert pole.loc["hrda", "mean"] == pytest.approx(41.5) and pole.loc["hrda", "std"] == pytest.approx(1.5)


def test_a_runs_full_evaluation_stands_for_it_unless_asked_otherwise(root):
    write_run(root, "hrda", "s3", 60.0, eval_miou=75.0)
    runs = find_runs(root / "hrda" / "*")
    assert seed_table(runs).loc[0, "values"] == [70.0, 71.5, 73.0, 75.0]
    assert seed_table(runs, source="train").loc[0, "values"] == [70.0, 71.5, 73.0, 60.0]
    assert seed_table(runs, source="eval").loc[0, "values"] == [75.0]


def test_results_table_means_fine_class_column_and_bold_best(root):
    runs = find_runs(f"{root}/*/s*")
    lines = results_table(runs).splitlines()
    assert lines[0] == "| method | mIoU | fine mIoU | road | pole | traffic light | person | car |"
    # hrda mean 71.5: road 91.5, pole 41.5, light 51.5, person 61.5, car 81.5; fine = mean(41.5, 51.5, 61.5) = 51.5
    assert lines[3] == "| hrda | **71.5** | **51.5** | **91.5** | **41.5** | **51.5** | **61.5** | **81.5** |"
    assert lines[2] == "| daformer | 67.0 | 47.0 | 87.0 | 37.0 | 47.0 | 57.0 | 77.0 |"
    assert lines[4].startswith("| source_only | 40.0 | 20.0 | 60.0 |")
    assert "**" not in lines[2] + lines[4]
    means = mean_metrics(runs)
    assert means["hrda"]["IoU"]["wall"] is None and means["hrda"]["n"] == 3
    assert results_table(runs, fine_classes=None, classes=["car"]).splitlines()[0] == "| method | mIoU | car |"


def png_size(path):
    with Image.open(path) as im: return im.size


def test_figures_are_small_pngs_written_atomically(root, tmp_path):
    runs = find_runs(f"{root}/*/s*")
    fig = plot_per_class_iou(runs, path=tmp_path / "f" / "iou.png", dpi=60)
    w, h = fig.get_size_inches()
    assert png_size(tmp_path / "f" / "iou.png") == (round(w * 60), round(h * 60))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["road", "pole", "traffic light", "person", "car"]
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights[:5] == pytest.approx([87.0, 37.0, 47.0, 57.0, 77.0])  # daformer's mean IoUs come first
    with pytest.raises(ValueError, match="stay small"):
        save_figure(fig, tmp_path / "f" / "big.png", dpi=100)
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["iou.png"]  # no temporary files left behind
    fig = plot_training_curves(runs[:2])
    loss, miou = fig.axes
    assert loss.lines[0].get_xdata().tolist() == [50, 100, 150, 200]
    assert loss.lines[0].get_ydata().tolist() == pytest.approx([1 / 50, 1 / 100, 1 / 150, 1 / 200])
    assert miou.lines[1].get_ydata().tolist() == [63.0, 68.0]  # daformer/s1: evals at 100 and 200


def test_qualitative_grid_shows_image_truth_and_each_runs_prediction(tmp_path):
    data = tmp_path / "reports" / "data"
    data.mkdir(parents=True)
    gt = np.zeros((16, 32), np.uint8)
    gt[8:] = 13
    Image.fromarray(gt).save(data / "a_gt.png")
    Image.fromarray(colorize(gt)).save(data / "a.png")
    Image.fromarray(gt).save(data / "b_gt.png")
    Image.fromarray(colorize(gt)).save(data / "b.png")
    wrong = np.full_like(gt, 2)
    write_run(tmp_path / "reports", "hrda", "s0", 70.0, eval_miou=70.0, predictions={"a": gt, "b": gt})
    write_run(tmp_path / "reports", "daformer", "s0", 60.0, eval_miou=60.0, predictions={"a": wrong})
    write_run(tmp_path / "reports", "plain", "s0", 50.0)
    runs = find_runs(f"{tmp_path}/reports/*/s0")
    fig = plot_qualitative(runs, path=tmp_path / "q.png", dpi=50)
    titles = ["image", "ground truth", "daformer/s0", "hrda/s0"]
    assert [ax.get_title() for ax in fig.axes] == titles + [""] * 4  # only 'a' is common; its zoomed row below
    np.testing.assert_array_equal(fig.axes[1].images[0].get_array(), colorize(gt))
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), colorize(wrong))
    assert png_size(tmp_path / "q.png")[0] == round(fig.get_size_inches()[0] * 50)
    with pytest.raises(FileNotFoundError, match="--save-predictions"):
        plot_qualitative([load_run(tmp_path / "reports" / "plain" / "s0")])


def test_attention_figure_from_a_real_prediction_folder(tmp_path):
    from hrda.checkpoint import save_checkpoint
    from hrda.config import TrainConfig, config_to_dict, load_config, narrow
    from hrda.predict import predict_folder
    from hrda.segmentor import TINY_MODEL, SegmentorConfig, build_segmentor
    cfg = load_config(TrainConfig, overrides={**TINY_MODEL, "target_scale": None, "test_crop_size": [64, 96],
                                              "test_stride": [32, 32]})
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = build_segmentor(narrow(SegmentorConfig, cfg))
        ckpt = save_checkpoint(tmp_path / "c.pth", 1, config_to_dict(cfg), student=model.state_dict())
        img = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
        Image.fromarray(img).save(tmp_path / "scene.png")
        predict_folder(ckpt, tmp_path / "scene.png", tmp_path / "run" / "predict", show_scales=True, device="cpu",
                       progress=False)
    finally:
        torch.set_num_threads(n)
    fig = plot_attention(tmp_path / "run" / "predict", path=tmp_path / "att.png", dpi=40)
    titles = ["image", "LR (context)", "HR (detail)", "attention (bright: HR)", "fused"]
    assert [ax.get_title() for ax in fig.axes] == titles + [""] * 5  # and the zoomed row
    gray = np.asarray(Image.open(tmp_path / "run/predict/scales/attention_gray/scene.png")) / 255
    np.testing.assert_allclose(fig.axes[3].images[0].get_array(), gray)
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array(), img)


def test_build_report_writes_tables_figures_and_sources(root, tmp_path):
    files = build_report(f"{root}/*/s*", tmp_path / "out", dpi=60)
    assert sorted(files) == ["per_class_iou", "results", "seeds", "seeds_csv", "sources", "training_curves"]
    assert (tmp_path / "out" / "tables" / "seeds.md").read_text().splitlines()[3].startswith("| hrda | 3 | 71.50 ± 1.50 |")
    sources = json.loads((tmp_path / "out" / "sources.json").read_text())
    assert [s["run"] for s in sources["runs"]][:2] == ["daformer/s0", "daformer/s1"]
    assert sources["runs"][0]["git_commit"] == "c_daformer"
    for name in ("per_class_iou", "training_curves"):
        w, h = png_size(files[name])
        assert w <= 80 * 12 and h <= 80 * 6


def test_run_folder_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        find_runs(f"{tmp_path}/nothing/*")
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="hrda train"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "metrics.json").write_text("{}")
    (tmp_path / "r" / "log.jsonl").write_text('{"iteration": 1}\n{broken\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match="log.jsonl:2 is not JSON"):
        load_run(tmp_path / "r")
    (tmp_path / "r" / "log.jsonl").write_text('{"iteration": 1}\n{"iteration": 2, "dec')  # cut by a crash
    assert load_run(tmp_path / "r").log == [{"iteration": 1}]
