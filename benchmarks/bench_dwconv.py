#!/usr/bin/env python
"""Milliseconds of the depthwise 3×3 convolutions of HRDA with MiT-B5 (Mix-FFN's, and the dilated ones of the
DAFormer head's ASPP) by memory layout, dtype and cuDNN autotuning. The training profile shows a few depthwise calls
among the slowest kernels; this finds the layout that avoids them. Prints a table and writes
reports/perf/dwconv_<device>.{json,md}.

Usage: python benchmarks/bench_dwconv.py --device cuda
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hrda.core import get_device
from hrda.files import write_json, write_text  # noqa: E402

# (where, channels, side of the map, dilation) for a 512² input: Mix-FFN's hidden map in each MiT-B5 stage, and the
# DAFormer head's ASPP branches on the 4 × 256 concatenated embeddings; batch 2 (a crop pair) or 18 (the teacher's 9 HR
# windows of 2 images)
SHAPES = [("MiT stage 1", 256, 128, 1), ("MiT stage 2", 512, 64, 1), ("MiT stage 3", 1280, 32, 1),
          ("MiT stage 4", 2048, 16, 1), ("ASPP d=6", 1024, 128, 6), ("ASPP d=12", 1024, 128, 12),
          ("ASPP d=18", 1024, 128, 18)]


def time_ms(fn, device: torch.device, repeats: int) -> float:
    "Median milliseconds of `fn()` over `repeats` calls after two warm-ups."
    for _ in range(2): fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(); fn(); end.record(); torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter(); fn(); times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(batch: int, channels: int, side: int, dilation: int, layout: str, dtype: torch.dtype, backward: bool,
            device: torch.device, repeats: int) -> float:
    "One configuration; `channels_last` is also what MiT's `tokens_to_map` returns (a view of the tokens)."
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    weight = (torch.randn(channels, 1, 3, 3, generator=g) * 0.1).to(device, dtype)
    bias = torch.zeros(channels, device=device, dtype=dtype)
    if backward:
        x.requires_grad_(True); weight.requires_grad_(True)
        grad = torch.randn(batch, channels, side, side, generator=g).to(device, dtype)
        return time_ms(lambda: F.conv2d(x, weight, bias, 1, dilation, dilation, channels).backward(grad), device, repeats)
    with torch.no_grad():
        return time_ms(lambda: F.conv2d(x, weight, bias, 1, dilation, dilation, channels), device, repeats)


def markdown(rows: list[dict], device_name: str, torch_version: str, command: str) -> str:
    "The rows as a markdown table."
    cols = [k for k in rows[0] if k.endswith("_ms")]
    md = [f"# Depthwise 3×3 convolutions of HRDA on {device_name} (torch {torch_version})", "", f"Command: `{command}`", "",
          "`channels_last`: the input in channels-last memory format (MiT's `tokens_to_map` and the head's embeddings "
          "make that layout); `nchw`: contiguous; `+cudnn`: torch.backends.cudnn.benchmark. Median milliseconds.", "",
          "| where | batch | channels | side | dtype | pass | " + " | ".join(cols) + " |",
          "|---|---:|---:|---:|---|---|" + "---:|" * len(cols)]
    md += [f"| {r['where']} | {r['batch']} | {r['channels']} | {r['side']} | {r['dtype']} | {r['pass']} | "
           + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batches", type=int, nargs="+", default=[2, 18])
    p.add_argument("--shapes", type=int, nargs="+", default=list(range(len(SHAPES))),
                   help="indices into SHAPES (0-3: MiT stages, 4-6: ASPP branches)")
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"))
    args = p.parse_args(argv)
    device = get_device(args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    for (shape, batch, dtype, backward) in itertools.product(args.shapes, args.batches, dtypes, (False, True)):
        where, channels, side, dilation = SHAPES[shape]
        row = {"where": where, "batch": batch, "channels": channels, "side": side, "dtype": dtype,
               "pass": "forward+backward" if backward else "forward"}
        for layout, bench in itertools.product(("channels_last", "nchw"), (False, True)):
            torch.backends.cudnn.benchmark = bench
            row[f"{layout}{'+cudnn' if bench else ''}_ms"] = round(
                measure(batch, channels, side, dilation, layout, dtypes[dtype], backward, device, args.repeats), 3)
        print(row, flush=True)
        rows.append(row)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    command = " ".join(["python benchmarks/bench_dwconv.py", *(argv if argv is not None else sys.argv[1:])])
    md = markdown(rows, name, torch.__version__, command)
    out = Path(args.out)
    write_json(out / f"dwconv_{device.type}.json", {"device_name": name, "torch": torch.__version__, "command": command,
                                                   "rows": rows})
    write_text(out / f"dwconv_{device.type}.md", md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
