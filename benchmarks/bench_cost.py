#!/usr/bin/env python
"""The cost of a training iteration and of a test image, per experiment, without a GPU: parameters, FLOPs at the
paper's batch and crops (counted on the meta device: shapes only, no memory, no arithmetic), encoder passes per test
image, and the operators and host reads of one iteration (counted on the CPU at a scaled-down crop: the count does not
depend on the crop, only on the structure). Writes cost_cpu.{json,md} into reports/perf/.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_cost.py          # MiT-B5 HRDA beside VFM-UDA's DINOv2-B and HRDA on DINOv2-B
    .venv/bin/python benchmarks/bench_cost.py --experiments gta2cs_hrda vfmuda_gta2cs_vitl --ops-crop 64

FLOPs count 2 per multiply-add of matrix products, attention and convolutions (torch's FlopCounterMode, with the
backward of grouped convolutions corrected: benchmarks/flops.py); element-wise work, normalisation, the bilinear
sampling of deformable attention (VFM-UDA++'s adapter) and the optimiser are not counted. This is a benchmark: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train_step import make_step  # noqa: E402
from count_ops import count  # noqa: E402
from flops import autocast_off_on_meta, flop_counter  # noqa: E402
from hrda.config import TrainConfig, load_config, narrow  # noqa: E402
from hrda.files import write_json, write_text  # noqa: E402
from hrda.segmentor import SegmentorConfig, build_segmentor  # noqa: E402

DEFAULT = ["gta2cs_hrda", "mic_gta2cs_hrda", "vfmuda_gta2cs_vitb", "vfmuda_gta2cs_vitl", "vfmudapp_gta2cs_vitl", "hrda_gta2cs_dinov2b",
           "mic_hrda_gta2cs_dinov2b"]


def experiment_config(name: str, overrides: list[str]) -> TrainConfig:
    "An experiment of experiments/ with random weights (the counts do not depend on them)."
    return load_config(TrainConfig, ROOT / "experiments" / f"{name}.yaml", ["pretrained=null", *overrides])


def iteration_tflop(cfg: TrainConfig) -> float:
    "TFLOP of one `dacs_step` (iteration 2: the EMA teacher is past its first copy) at the configured batch and crops."
    with autocast_off_on_meta():
        step, _ = make_step(cfg, torch.device("meta"), "fp32")
        step(0), step(1)
        with flop_counter() as counter: step(2)
    return counter.get_total_flops() / 1e12


def test_image_cost(cfg: TrainConfig, size: tuple[int, int]) -> tuple[float, int]:
    "(TFLOP, encoder passes) of the full test inference of one image of `size` (outer slide, HR slide, fusion)."
    with torch.device("meta"):
        model = build_segmentor(narrow(SegmentorConfig, cfg)).eval()
    passes = []
    model.backbone.register_forward_hook(lambda m, i, o: passes.append(i[0].shape[0]))  # images per backbone call
    with torch.no_grad(), flop_counter() as counter:
        model.inference(torch.empty(1, 3, *size, device="meta"))
    return counter.get_total_flops() / 1e12, sum(passes)


def scaled(cfg: TrainConfig, crop: int) -> TrainConfig:
    "The same run with the context crop scaled to `crop` (the detail crop and test windows by the same factor)."
    f = crop / cfg.crop_size[0]
    keep = lambda hw: None if hw is None else [max(1, round(v * f)) for v in hw]
    return load_config(TrainConfig, overrides={**{k: v for k, v in vars(cfg).items()}, "crop_size": [crop, crop],
                                               "hr_crop_size": keep(cfg.hr_crop_size)})


def measure(name: str, overrides: list[str], ops_crop: int, infer_size: tuple[int, int]) -> dict:
    cfg = experiment_config(name, overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        params = sum(p.numel() for p in build_segmentor(narrow(SegmentorConfig, cfg)).parameters())
    tflop = iteration_tflop(cfg)
    test_tflop, passes = test_image_cost(cfg, infer_size)
    ops = count(scaled(cfg, ops_crop))
    return {"experiment": name, "backbone": cfg.backbone, "hrda": cfg.single_scale is None, "params_m": round(params / 1e6, 2),
            "batch": cfg.batch_size, "crop": list(cfg.crop_size), "hr_crop": cfg.hr_crop_size and list(cfg.hr_crop_size),
            "tflop_per_iter": round(tflop, 2), "tflop_per_image_pair": round(tflop / cfg.batch_size, 2),
            "operators_per_iter": sum(ops.ops.values()), "host_reads_per_iter": sum(ops.reads.values()),
            "test_tflop_per_image": round(test_tflop, 2), "test_encoder_passes": passes, "test_size": list(infer_size)}


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["# Training and test cost per experiment (counted, not timed)", "",
             f"torch {result['torch']}, python {result['python']}; operators counted at a {result['ops_crop']}-px context "
             f"crop on the CPU ({result['cpu']}), FLOPs at each experiment's own batch and crops on the meta device (matrix "
             f"products, attention and convolutions; not the element-wise work, norms, deformable sampling or optimiser).", "",
             f"Command: `{result['command']}`", "",
             "| experiment | encoder | multi-resolution | parameters (M) | batch (source + target) | context crop | detail crop "
             "| TFLOP / iteration | TFLOP / image pair | operators / iteration | host reads / iteration "
             f"| TFLOP / {result['test_size'][0]}×{result['test_size'][1]} test image | encoder passes / test image |",
             "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        hr = f"{r['hr_crop'][0]}²" if r["hr_crop"] else "-"
        lines.append(f"| {r['experiment']} | {r['backbone']} | {'HRDA' if r['hrda'] else 'one scale'} | {r['params_m']} "
                     f"| {r['batch']} + {r['batch']} | {r['crop'][0]}² | {hr} | {r['tflop_per_iter']} | {r['tflop_per_image_pair']} "
                     f"| {r['operators_per_iter']} | {r['host_reads_per_iter']} | {r['test_tflop_per_image']} | {r['test_encoder_passes']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", nargs="+", default=DEFAULT, help="names of experiments/*.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides applied to every experiment")
    p.add_argument("--ops-crop", type=int, default=64, help="context crop of the CPU operator count")
    p.add_argument("--infer-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"))
    args = p.parse_args(argv)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out" in given: del given[given.index("--out"):given.index("--out") + 2]  # the command, not this machine's folder
    result = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
              "ops_crop": args.ops_crop, "test_size": args.infer_size, "rows": [],
              "command": " ".join(["python benchmarks/bench_cost.py", *given])}
    for name in args.experiments:
        row = measure(name, args.set, args.ops_crop, tuple(args.infer_size))
        result["rows"].append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out = Path(args.out)
    write_json(out / "cost_cpu.json", result)
    write_text(out / "cost_cpu.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
