#!/usr/bin/env python
"""The distillation report of the embedded benchmark: the student's mIoU and images per second beside its teacher's
(and beside the DAFormer baseline of the same seed, the same network trained by self-training), every model
evaluated on all target validation images and timed on the same images, one at a time, on this machine's CPU.
Writes reports/distill/README.md and results.json.

Usage (from the repository root), after `make demo` (the teacher) and the student's run:
    hrda train --config experiments/synth_distill.yaml --set out_dir=reports/local/synth_distill/s0
    python benchmarks/distill_report.py
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hrda.evaluation import summary_line  # noqa: E402
from hrda.files import portable_path, read_image, write_json, write_text  # noqa: E402
from hrda.predict import evaluate_checkpoint, list_images, load_model, predict_image  # noqa: E402

RUNS = {"teacher: HRDA (demo, seed 0)": "reports/local/demo/hrda/s0",
        "student: distilled, one scale (synth_distill)": "reports/local/synth_distill/s0",
        "DAFormer, one scale, self-training (demo, seed 0)": "reports/local/demo/daformer/s0"}


def images_per_second(loaded, images: list[Path], scale) -> float:
    "Label maps of `images` one at a time, as `hrda predict` computes them (after one warm-up image)."
    rgb = [read_image(p) for p in images]
    predict_image(loaded.model, rgb[0], scale)
    t0 = time.perf_counter()
    for x in rgb: predict_image(loaded.model, x, scale)
    return len(rgb) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/synth/target", help="the benchmark's prepared target")
    p.add_argument("--timed-images", type=int, default=20, help="validation images timed per model")
    p.add_argument("--out", default="reports/distill")
    args = p.parse_args(argv)
    out = ROOT / args.out
    rows = []
    val_images = list_images(ROOT / args.data / "leftImg8bit" / "val")[:args.timed_images]
    for label, run in RUNS.items():
        ckpt = ROOT / run / "checkpoints" / "latest.pth"
        loaded = load_model(ckpt, device="cpu")
        metrics = evaluate_checkpoint(loaded, ROOT / args.data, out_dir=out / "eval" / Path(run).parts[-2], progress=False)
        params = sum(p.numel() for p in loaded.model.parameters())
        ips = images_per_second(loaded, [f for f, _ in val_images], loaded.config.target_scale)
        rows.append({"model": label, "run": run, "params_m": round(params / 1e6, 2), "mIoU": metrics["mIoU"],
                     "images_per_s": round(ips, 2), "summary": summary_line(metrics)})
        print(rows[-1], flush=True)
    result = {"rows": rows, "cpu": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "torch": torch.__version__, "timed_images": len(val_images), "data": portable_path(ROOT / args.data),
              "command": "python benchmarks/distill_report.py"}
    write_json(out / "results.json", result)
    teacher, student = rows[0], rows[1]
    lines = ["# Distillation into a one-scale student on the embedded benchmark", "",
             f"Target validation mIoU (%, the benchmark's 12 classes, all 60 images) and label maps per second on "
             f"{result['cpu']} (torch {result['torch']}; {len(val_images)} images, one at a time, as `hrda predict` "
             f"computes them).", "", "| model | run | parameters (M) | mIoU | images / s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | `{r['run']}` | {r['params_m']} | {r['mIoU']:.1f} | {r['images_per_s']} |" for r in rows]
    lines += ["", f"The student keeps {student['mIoU'] / teacher['mIoU'] * 100:.0f} % of its teacher's mIoU at "
              f"{student['images_per_s'] / teacher['images_per_s']:.1f}× its speed.", "",
              f"Rebuilt by `hrda train --config experiments/synth_distill.yaml --set out_dir=reports/local/synth_distill/s0` after `make demo`, "
              f"then `{result['command']}`. Per-model evaluations: `eval/`."]
    write_text(out / "README.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
