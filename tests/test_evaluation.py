"""hrda.evaluation against an independent reference of the mmseg / Cityscapes definitions, plus streaming,
multi-process reduction, evaluation over a dataset, tables and the prediction writers."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT  # noqa: F401  (puts the repository on the path like the other tests)
from hrda.core import CLASSES, class_subset, colorize
from hrda.files import ImageReadError, read_image
from hrda.evaluation import (ConfusionMeter, confusion_matrix, evaluate, iou_acc, load_metrics,
                             logits_to_label, metrics_table, overlay, read_label_png, save_color_png,
                             save_label_png, save_metrics, save_overlay, segmentation_metrics)


def reference_metrics(preds, gts, num_classes, ignore_index=255):
    """mmseg's definition, written independently with per-image histograms summed over the dataset (numpy)."""
    inter = np.zeros(num_classes); area_pred = np.zeros(num_classes); area_gt = np.zeros(num_classes)
    for pred, gt in zip(preds, gts):
        pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
        keep = (gt != ignore_index) & (gt < num_classes)
        pred, gt = pred[keep], gt[keep]
        bins = np.arange(num_classes + 1)
        inter += np.histogram(pred[pred == gt], bins)[0]
        area_pred += np.histogram(pred, bins)[0]
        area_gt += np.histogram(gt, bins)[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (area_pred + area_gt - inter)
        acc = inter / area_gt
    return {"IoU": iou, "Acc": acc, "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc), "aAcc": inter.sum() / area_gt.sum()}


def random_dataset(seed, n=5, num_classes=19):
    g = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n):
        h, w = g.integers(5, 40, size=2)
        gt = g.integers(0, num_classes, size=(h, w))
        gt[g.random((h, w)) < 0.1] = 255
        pred = np.where(g.random((h, w)) < 0.6, np.minimum(gt, num_classes - 1), g.integers(0, num_classes, size=(h, w)))
        preds.append(pred); gts.append(gt)
    return preds, gts


def pct(x):
    return None if math.isnan(x) else round(100 * x, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_independent_reference(seed):
    preds, gts = random_dataset(seed)
    gts[0][gts[0] == 9] = 0; preds[1][preds[1] == 9] = 0  # thin out a class so some IoUs differ from the rest
    ref = reference_metrics(preds, gts, 19)
    cm = sum(confusion_matrix(torch.as_tensor(p), torch.as_tensor(t), 19) for p, t in zip(preds, gts))
    m = segmentation_metrics(cm)
    for key in ("mIoU", "mAcc", "aAcc"):
        assert m[key] == pct(ref[key]), key
    assert m["IoU"] == {c: pct(v) for c, v in zip(CLASSES, ref["IoU"])}
    assert m["Acc"] == {c: pct(v) for c, v in zip(CLASSES, ref["Acc"])}
    assert m["num_pixels"] == sum(int(((t != 255) & (t < 19)).sum()) for t in gts)


def test_empty_union_is_skipped_and_absent_but_predicted_counts_zero():
    gt = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 2, 1, 3]])  # class 2 predicted but absent; class 3 only under the ignore label
    m = segmentation_metrics(confusion_matrix(pred, gt, 4), class_names=["a", "b", "c", "d"])
    assert m["IoU"] == {"a": 50.0, "b": 100.0, "c": 0.0, "d": None}
    assert m["mIoU"] == 50.0  # (0.5 + 1 + 0) / 3, class d skipped
    assert m["Acc"]["c"] is None and m["mAcc"] == 75.0
    json.dumps(m, allow_nan=False)


def test_ignore_label_and_out_of_range_gt_are_not_scored():
    gt = torch.tensor([0, 1, 255, 19, 200, -1])
    pred = torch.tensor([0, 1, 5, 5, 5, 5])
    cm = confusion_matrix(pred, gt, 19)
    assert cm.sum() == 2 and cm[0, 0] == 1 and cm[1, 1] == 1
    assert segmentation_metrics(cm)["IoU"]["pole"] is None
    with pytest.raises(ValueError, match="train ids in 0..18"):
        confusion_matrix(torch.tensor([0, 19]), torch.tensor([0, 1]), 19)


def test_uint8_and_numpy_inputs():
    preds, gts = random_dataset(3, n=1)
    a = confusion_matrix(preds[0].astype(np.uint8), gts[0].astype(np.uint8), 19)
    b = confusion_matrix(torch.as_tensor(preds[0]), torch.as_tensor(gts[0]), 19)
    assert torch.equal(a, b) and a.dtype == torch.int64


def test_synthia_subsets_and_readme_conversion():
    g = torch.Generator().manual_seed(5)
    cm = torch.randint(0, 30, (19, 19), generator=g) + torch.diag(torch.randint(100, 900, (19,), generator=g))
    iou = iou_acc(cm)[0]
    m = segmentation_metrics(cm, decimals=8)
    assert m["mIoU16"] == pytest.approx(100 * iou[list(class_subset(16))].mean().item(), abs=1e-6)
    assert m["mIoU13"] == pytest.approx(100 * iou[list(class_subset(13))].mean().item(), abs=1e-6)
    assert m["mIoU16"] != pytest.approx(m["mIoU"] * 19 / 16, abs=1e-3)  # the conversion needs the 3 IoUs to be 0
    for name in ("terrain", "truck", "train"):
        cm[:, CLASSES.index(name)] = 0  # a Synthia model never predicts them; they still occur in Cityscapes gt
    m = segmentation_metrics(cm, decimals=8)
    assert m["mIoU16"] == pytest.approx(m["mIoU"] * 19 / 16, abs=1e-5)
    assert segmentation_metrics(cm, class_ids=class_subset(13))["mIoU"] == segmentation_metrics(cm)["mIoU13"]
    assert "mIoU16" not in segmentation_metrics(cm[:5, :5])  # only for the 19 Cityscapes classes


def test_streaming_equals_one_shot_and_merge():
    preds, gts = random_dataset(7, n=6)
    one_shot = segmentation_metrics(sum(confusion_matrix(torch.as_tensor(p), torch.as_tensor(t), 19)
                                        for p, t in zip(preds, gts)))
    meter = ConfusionMeter(19)
    for p, t in zip(preds, gts):
        meter.update(torch.as_tensor(p)[None], torch.as_tensor(t)[None])  # (1, H, W) batches of different sizes
    assert meter.compute() == one_shot
    a, b = ConfusionMeter(19), ConfusionMeter(19)
    for i, (p, t) in enumerate(zip(preds, gts)):
        (a if i % 2 else b).update(p, t)
    assert ConfusionMeter(19).load_state(a.state() + b.state()).compute() == one_shot
    assert a.merge(b).compute() == one_shot
    assert ConfusionMeter(19).merge(a.state().tolist()).compute() == one_shot
    s = a.state(); s += 1
    assert a.compute() == one_shot  # state() is a copy
    with pytest.raises(ValueError, match="19-class meter"):
        a.load_state(torch.zeros(4, 4))


def _dist_worker(rank, world, init_file, preds, gts, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        meter = ConfusionMeter(19)
        for p, t in list(zip(preds, gts))[rank::world]:
            meter.update(p, t)
        meter.all_reduce()
        dataset = [{"img": torch.as_tensor(p), "gt": torch.as_tensor(t), "name": str(i)}
                   for i, (p, t) in enumerate(zip(preds, gts))]
        seen = []
        res = evaluate(lambda img: F.one_hot(img[0].long(), 19).permute(2, 0, 1)[None].float(), dataset,
                       device="cpu", progress=False, on_prediction=lambda n, lab, item: seen.append(n))
        torch.save({"cm": meter.state(), "eval": res, "seen": seen}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_all_reduce_across_processes(tmp_path):
    preds, gts = random_dataset(11, n=5)
    torch.multiprocessing.spawn(_dist_worker, args=(2, str(tmp_path / "store"), preds, gts, str(tmp_path / "out")),
                                nprocs=2, join=True)
    full = sum(confusion_matrix(torch.as_tensor(p), torch.as_tensor(t), 19) for p, t in zip(preds, gts))
    r0, r1 = (torch.load(tmp_path / f"out.{r}", weights_only=False) for r in range(2))
    assert torch.equal(r0["cm"], full) and torch.equal(r1["cm"], full)
    # evaluate shards the images over the ranks and all-reduces: each rank returns the metrics of the whole set
    assert sorted(r0["seen"] + r1["seen"]) == [str(i) for i in range(5)] and len(r0["seen"]) == 3
    assert r0["eval"]["IoU"] == r1["eval"]["IoU"] == segmentation_metrics(full)["IoU"]


def test_evaluate_resizes_logits_to_label_size():
    g = torch.Generator().manual_seed(3)
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    torch.nn.init.normal_(conv.weight, generator=g)
    dataset = []
    for k, (h, w) in enumerate([(20, 30), (24, 24), (17, 33)]):
        img = torch.randn(3, h // 2, w // 2, generator=g)  # the test scale is half the label size
        gt = torch.randint(0, 5, (h, w), generator=g)
        gt[:2] = 255
        dataset.append({"img": img, "gt": gt, "name": f"im{k}"})
    predict = lambda img: conv(img).to(torch.bfloat16)  # (1, 5, h/4, w/4), low-precision logits are fine
    got = evaluate(predict, dataset, num_classes=5, device="cpu", progress=False, with_confusion=True)
    preds = [F.interpolate(predict(d["img"][None]).float(), size=d["gt"].shape, mode="bilinear",
                           align_corners=False).argmax(1)[0] for d in dataset]
    ref = reference_metrics([p.numpy() for p in preds], [d["gt"].numpy() for d in dataset], 5)
    assert got["mIoU"] == pct(ref["mIoU"]) and got["aAcc"] == pct(ref["aAcc"])
    assert got["num_images"] == 3 and len(got["confusion_matrix"]) == 5
    assert 0 < got["mIoU"] < 100
    with torch.no_grad():
        assert torch.equal(logits_to_label(predict(dataset[2]["img"][None]), (17, 33))[0], preds[2])
    # data-loading workers give the same result
    assert evaluate(predict, dataset, 5, device="cpu", progress=False, num_workers=1)["IoU"] == got["IoU"]


def test_metrics_table_bolds_best_per_column():
    rows = {"source only": {"mIoU": 40.0, "IoU": {"road": 80.0, "sidewalk": 30.0, "wall": None}},
            "DAFormer": {"mIoU": 68.3, "IoU": {"road": 95.7, "sidewalk": 70.2, "wall": 53.5}},
            "HRDA": {"mIoU": 73.8, "IoU": {"road": 96.4, "sidewalk": 70.2, "wall": 61.6}}}
    lines = metrics_table(rows).splitlines()
    assert lines[0] == "| method | mIoU | road | sidewalk | wall |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| source only | 40.0 | 80.0 | 30.0 | – |"
    assert lines[3] == "| DAFormer | 68.3 | 95.7 | **70.2** | 53.5 |"  # a tie is bold in both rows
    assert lines[4] == "| HRDA | **73.8** | **96.4** | **70.2** | **61.6** |"
    assert "**" not in metrics_table(rows, best_bold=False)
    assert metrics_table(rows, class_names=["wall"], decimals=2).splitlines()[4] == "| HRDA | **73.80** | **61.60** |"
    with pytest.raises(ValueError, match="mIoU16"):
        metrics_table(rows, miou_key="mIoU16")


def test_save_metrics_is_strict_json(tmp_path):
    m = segmentation_metrics(torch.tensor([[3, 1], [0, 0]]), class_names=["a", "b"])
    path = save_metrics(tmp_path / "run" / "metrics.json", {**m, "raw": float("nan"), "cm": torch.eye(2)})
    text = path.read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert load_metrics(path)["IoU"] == {"a": 75.0, "b": 0.0} and load_metrics(path)["raw"] is None
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_prediction_writers_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (31, 47), generator=g)
    label[:3] = 255
    image = np.random.default_rng(0).integers(0, 256, (31, 47, 3), dtype=np.uint8)
    p = save_label_png(label, tmp_path / "city" / "x_label.png")
    with Image.open(p) as im:
        assert im.mode == "L" and im.size == (47, 31)
    assert np.array_equal(read_label_png(p), label.numpy())
    assert np.array_equal(read_image(save_color_png(label, tmp_path / "c.png")), colorize(label))
    ov = read_image(save_overlay(image, label, tmp_path / "o.png", alpha=0.3))
    assert np.array_equal(ov[:3], image[:3])  # ignored pixels keep the image
    expected = np.rint(0.7 * image[3:].astype(float) + 0.3 * colorize(label)[3:]).astype(np.uint8)
    assert np.abs(ov[3:].astype(int) - expected).max() <= 1
    assert np.array_equal(overlay(image, label, alpha=0.0), image)
    assert not list(tmp_path.rglob(".*.tmp"))
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, label, alpha=1.5)


def test_failed_write_keeps_old_file(tmp_path):
    p = save_label_png(torch.zeros(2, 2, dtype=torch.long), tmp_path / "x.png")
    before = p.read_bytes()
    with pytest.raises(ValueError, match="0..255"):
        save_label_png(torch.full((2, 2), 256), p)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        save_label_png(torch.zeros(1, 2, 2), p)
    assert p.read_bytes() == before and [x.name for x in tmp_path.iterdir()] == ["x.png"]


def test_read_image_modes_and_errors(tmp_path):
    Image.fromarray(np.full((4, 5), 7, np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(np.full((4, 5, 4), 9, np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((6, 8, 3), 100, np.uint8)).save(tmp_path / "ok.jpg", quality=95)
    assert read_image(tmp_path / "gray.png").shape == (4, 5, 3)
    assert read_image(tmp_path / "rgba.png")[0, 0].tolist() == [9, 9, 9]
    assert read_image(tmp_path / "ok.jpg").dtype == np.uint8
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    for name in ("cut.jpg", "empty.png", "folder.png", "missing.png"):
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            read_image(tmp_path / name)
    with pytest.raises(OSError):  # the CLI can catch OSError or ImageReadError
        read_image(tmp_path / "cut.jpg")
