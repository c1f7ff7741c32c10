#!/usr/bin/env python
"""Forward and forward+backward time and peak memory of a backbone (optionally + a decode head), per backbone and input size.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_model.py                          # CPU, small defaults
    .venv/bin/python benchmarks/bench_model.py --device cuda --backbones mit_b0,mit_b5 --sizes 512,1024 --batch 2
    .venv/bin/python benchmarks/bench_model.py --device cuda --precision bf16 --head daformer

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (tensors only), reset before each configuration.
On the CPU the peak resident set size of the process (Linux `VmHWM`, reset before each configuration through
`/proc/self/clear_refs`; elsewhere `resource.getrusage`, which never resets, so later rows are upper bounds).
This is a benchmark, not a test: it asserts nothing and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hrda.backbones import create_backbone  # noqa: E402
from hrda.core import autocast_dtype, get_device  # noqa: E402
from hrda.heads import create_head  # noqa: E402


def _reset_cpu_peak() -> bool:
    "Reset the peak RSS counter of this process (Linux); False if it cannot be reset."
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_peak_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024 if platform.system() == "Darwin" else 1024)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LastLevel(torch.nn.Module):
    "Stand-in head for `--head none`: the coarsest feature map (it depends on every backbone stage)."
    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return feats[-1]


def bench_one(backbone: str, size: int, batch: int, device: torch.device, dtype: torch.dtype | None,
              repeats: int, warmup: int, head: str) -> dict:
    "Times (ms) and peak memory (MB) of one configuration."
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_cpu_peak()
    g = torch.Generator().manual_seed(0)
    bb = create_backbone(backbone, generator=g).to(device).train()
    if head == "none":  # backbone alone: the "logits" are the last feature map
        hd = LastLevel()
    else:
        hd = create_head(head, bb.out_channels, 19, in_strides=bb.strides, generator=g).to(device).train()
    params = sum(p.numel() for m in (bb, hd) for p in m.parameters())
    x = torch.randn(batch, 3, size, size, generator=g).to(device)

    def step(backward: bool) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = hd(bb(x))
        if backward:
            out.float().logsumexp(1).mean().backward()

    times = {}
    for name, backward in (("fwd", False), ("fwd_bwd", True)):
        ctx = torch.enable_grad() if backward else torch.no_grad()
        with ctx:
            for _ in range(warmup):
                step(backward)
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                step(backward)
                bb.zero_grad(set_to_none=True); hd.zero_grad(set_to_none=True)
            _sync(device)
            times[name] = (time.perf_counter() - t0) / repeats * 1000
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _cpu_peak_mb()
    del bb, hd, x
    return dict(backbone=backbone, params_m=params / 1e6, size=size, batch=batch, **times, peak_mb=peak)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, or auto")
    p.add_argument("--backbones", default="cnn,mit_b0", help="comma-separated backbone names (mit_b0..mit_b5, cnn, timm:<name>)")
    p.add_argument("--sizes", default="128,256", help="comma-separated square input sizes in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--head", default="none", help="decode head on top of the backbone: none (default), daformer, attention, segformer, dlv2")
    p.add_argument("--precision", default="fp32", help="fp32, tf32, bf16 or fp16 (autocast; fp16 only on CUDA)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    device = get_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = autocast_dtype(args.precision, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {where}, precision {args.precision}, head {args.head}, "
          f"{args.repeats} repeats after {args.warmup} warm-up")
    mem = "peak CUDA alloc MB" if device.type == "cuda" else "peak RSS MB"
    header = f"| backbone | params (M) | input | batch | fwd ms | fwd+bwd ms | {mem} |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for backbone in args.backbones.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            try:
                r = bench_one(backbone, size, args.batch, device, dtype, args.repeats, args.warmup, args.head)
            except torch.OutOfMemoryError:
                print(f"| {backbone} | | {size}² | {args.batch} | out of memory | | |")
                continue
            rows.append(r)
            print(f"| {backbone} | {r['params_m']:.2f} | {size}² | {args.batch} | {r['fwd']:.1f} | {r['fwd_bwd']:.1f} "
                  f"| {r['peak_mb']:.0f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
