#!/usr/bin/env python
"""Exported models against `hrda predict`: each checkpoint is exported (`hrda.export.export_onnx`), then every target
validation image is predicted by PyTorch (`hrda.predict.predict_image`) and by ONNX Runtime (`hrda.deploy.OnnxSegmenter`),
and the label maps are compared pixel by pixel. Writes export_<name>.{json,md} into reports/perf/.

Usage (from the repository root), after `make demo` (the demo's checkpoints of seed 0):
    .venv/bin/python benchmarks/check_export.py
    .venv/bin/python benchmarks/check_export.py --runs reports/<exp>/<run> --data data/cityscapes --name cityscapes
It prints numbers; its only assertions check that its labels are those the two commands compute.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hrda.deploy import OnnxSegmenter  # noqa: E402
from hrda.export import export_onnx  # noqa: E402
from hrda.files import list_images, portable_path, read_image, write_json, write_text  # noqa: E402
from hrda.predict import load_model, predict_image, prepare_image  # noqa: E402

DEMO_RUNS = ["reports/local/demo/source_only/s0", "reports/local/demo/daformer/s0", "reports/local/demo/hrda/s0"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", default=DEMO_RUNS, help="run folders (checkpoints/latest.pth) or checkpoints")
    p.add_argument("--data", default="data/synth/target", help="a prepared target whose leftImg8bit/val images are predicted")
    p.add_argument("--max-images", type=int, default=0, help="only the first N images (0: all)")
    p.add_argument("--name", default="demo", help="the report's name: export_<name>.md")
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"))
    args = p.parse_args(argv)
    images = [f for f, _ in list_images(ROOT / args.data / "leftImg8bit" / "val")]
    if args.max_images: images = images[:args.max_images]
    rows = []
    for run in args.runs:
        ckpt = ROOT / run / "checkpoints" / "latest.pth" if (ROOT / run).is_dir() else ROOT / run
        loaded = load_model(ckpt, device="cpu")
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            res = export_onnx(loaded, Path(d) / "model.onnx", size=_test_size(loaded, read_image(images[0])))
            export_s = time.perf_counter() - t0
            seg = OnnxSegmenter(res["path"])
            pixels = differ = 0
            max_diff = max_margin = 0.0
            for f in images:
                rgb = read_image(f)
                x = prepare_image(rgb, loaded.config.target_scale)
                with torch.no_grad(): want = upsampled(loaded.model.inference(x), rgb)  # what `hrda predict` takes the argmax of
                got = upsampled(torch.from_numpy(seg.logits(x.numpy())), rgb)
                a, b = got.argmax(1), want.argmax(1)
                assert torch.equal(a[0], torch.from_numpy(seg.predict(rgb)))  # the runner's own labels
                assert torch.equal(b[0], torch.from_numpy(predict_image(loaded.model, rgb, loaded.config.target_scale)))
                top2 = want.topk(2, dim=1).values
                margins = (top2[:, 0] - top2[:, 1])[a != b]
                pixels, differ = pixels + a.numel(), differ + int((a != b).sum())
                max_diff = max(max_diff, float((got - want).abs().max()))
                if len(margins): max_margin = max(max_margin, float(margins.max()))
        rows.append({"run": portable_path(ROOT / run), "architecture": res["metadata"]["hrda.architecture"],
                     "backbone": res["metadata"]["hrda.backbone"], "input_size": res["size"], "images": len(images),
                     "pixels": pixels, "pixels_differing": differ, "labels_equal_pct": round(100 * (1 - differ / pixels), 6),
                     "max_abs_logit_diff": max_diff, "largest_top2_gap_where_differing": max_margin,
                     "export_s": round(export_s, 1)})
        print(rows[-1], flush=True)
    result = {"data": portable_path(ROOT / args.data), "torch": torch.__version__, "rows": rows,
              "command": " ".join(["python benchmarks/check_export.py", *(argv if argv is not None else sys.argv[1:])])}
    out = Path(args.out)
    write_json(out / f"export_{args.name}.json", result)
    lines = [f"# Exported models against `hrda predict` ({result['data']}, every val image)", "",
             f"torch {result['torch']}; ONNX Runtime on the CPU. Command: `{result['command']}`", "",
             "Where a label differs, the gap between PyTorch's two best logits there is at most the last column: ties "
             "to float rounding, which the two runtimes break differently.", "",
             "| run | model | input | images | pixels | pixels whose label differs | labels equal | max abs logit difference "
             "| largest top-2 gap where a label differs | export s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| `{r['run']}` | {r['architecture']} ({r['backbone']}) | {r['input_size'][0]}×{r['input_size'][1]} | {r['images']} "
              f"| {r['pixels']} | {r['pixels_differing']} | {r['labels_equal_pct']} % | {r['max_abs_logit_diff']:.1e} "
              f"| {r['largest_top2_gap_where_differing']:.1e} | {r['export_s']} |" for r in rows]
    write_text(out / f"export_{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def upsampled(logits: torch.Tensor, rgb: np.ndarray) -> torch.Tensor:
    "Logits resized to the image, as `hrda.evaluation.logits_to_label` resizes them before its argmax."
    return torch.nn.functional.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)


def _test_size(loaded, rgb: np.ndarray) -> tuple[int, int]:
    "The (H, W) the model sees `rgb` at: the graph's input size."
    from hrda.predict import input_size
    return input_size(*rgb.shape[:2], loaded.config.target_scale)


if __name__ == "__main__":
    main()
