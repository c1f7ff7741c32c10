#!/usr/bin/env python
"""Images per second of the full test-time inference, by path: PyTorch with every input in one encoder pass (as
before), in chunks of --test-batch inputs, in chunks under bf16 autocast, with --compile also in chunks with
torch.compile on the networks, and the exported ONNX graph on ONNX Runtime; with the peak memory of each PyTorch path
(resident set on the CPU, allocated memory on a GPU), its first call apart, and the ONNX graph's agreement with
PyTorch. Writes inference_<device>.{json,md} into reports/perf/.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_inference.py                 # the demo network at 256x512, MiT-B0 HRDA at 1024x2048
    .venv/bin/python benchmarks/bench_inference.py --models mit_b5 --device cuda --precision bf16

Models have random weights (the cost does not depend on them; the ONNX check compares the same weights). Each path
runs in a fresh process, so its peak memory is its own. This is a benchmark: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name -> (experiment file, overrides, input size (H, W))
    "demo": ("synth_hrda.yaml", [], (256, 512)),
    "mit_b0": ("gta2cs_hrda.yaml", ["backbone=mit_b0"], (1024, 2048)),
    "mit_b5": ("gta2cs_hrda.yaml", [], (1024, 2048)),
}


def build(name: str, test_batch: int):
    import torch
    from hrda.config import TrainConfig, load_config, narrow
    from hrda.segmentor import SegmentorConfig, build_segmentor
    experiment, overrides, size = MODELS[name]
    cfg = load_config(TrainConfig, ROOT / "experiments" / experiment, ["pretrained=null", f"test_batch={test_batch}", *overrides])
    torch.manual_seed(0)
    return build_segmentor(narrow(SegmentorConfig, cfg)).eval(), size


def measure_torch(name: str, test_batch: int, precision: str, device: str, repeats: int, compile: bool = False) -> dict:
    "Seconds per image and peak memory of `EncoderDecoder.inference` (run in this process); the first call apart."
    import resource
    import torch
    from hrda.core import autocast_dtype
    model, size = build(name, test_batch)
    if compile:  # the networks, not the slide: one graph per input shape (a chunk, the last chunk, the context pass)
        for part in ("backbone", "decode_head", "attention_head"):
            if hasattr(model, part): setattr(model, part, torch.compile(getattr(model, part), dynamic=False))
    dev = torch.device(device)
    model = model.to(dev)
    amp = autocast_dtype(precision, dev)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        t0 = time.perf_counter()
        model.inference(x); sync()  # warm-up (and cuDNN / allocator set-up, compilation)
        first = time.perf_counter() - t0
        if dev.type == "cuda": torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(repeats): model.inference(x)
        sync()
    s = (time.perf_counter() - t0) / repeats
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"s_per_image": round(s, 3), "images_per_s": round(1 / s, 3), "peak_mem_mb": round(peak, 1),
            "first_call_s": round(first, 1)}


def measure_onnx(name: str, test_batch: int, repeats: int, threads: int) -> dict:
    "Export (timed), ONNX Runtime seconds per image on the CPU, and the graph's agreement with PyTorch."
    from hrda.export import compare_with_torch, export_onnx
    from hrda.predict import LoadedModel
    from hrda.config import TrainConfig, load_config
    import numpy as np
    import onnxruntime as ort
    model, size = build(name, test_batch)
    loaded = LoadedModel(model, load_config(TrainConfig, ROOT / "experiments" / MODELS[name][0], MODELS[name][1]),
                         {"path": f"random {name}"})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = export_onnx(loaded, Path(d) / f"{name}.onnx", size=size, test_batch=test_batch)["path"]
        export_s = time.perf_counter() - t0
        mb = Path(path).stat().st_size / 2**20
        check = compare_with_torch(path, model, threads=threads)
        opts = ort.SessionOptions()
        if threads: opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
        sess.run(None, {"image": x})
        t0 = time.perf_counter()
        for _ in range(repeats): sess.run(None, {"image": x})
        s = (time.perf_counter() - t0) / repeats
    return {"s_per_image": round(s, 3), "images_per_s": round(1 / s, 3), "export_s": round(export_s, 1),
            "onnx_mb": round(mb, 1), **{k: check[k] for k in ("max_abs_logit_diff", "labels_equal", "pixels_differing",
                                                            "within_tolerance")}}


def child(args: argparse.Namespace) -> None:
    "One measurement in this process (called by `main` through a subprocess); prints its JSON."
    if args.path == "onnx": out = measure_onnx(args.model, args.test_batch, args.repeats, args.threads)
    else: out = measure_torch(args.model, args.test_batch, args.precision, args.device, args.repeats, args.path == "compile")
    print("RESULT " + json.dumps(out))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["demo", "mit_b0"], choices=list(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="bf16", help="the autocast dtype of the chunked low-precision path")
    p.add_argument("--test-batch", type=int, default=2, help="inputs per encoder pass of the chunked paths")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: its default)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--compile", action="store_true", help="also the chunked path with torch.compile on the networks")
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"))
    p.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.model, args.path = args.child
        return child(args)
    import torch
    from hrda.files import write_json, write_text
    paths = [("one pass (as before)", "torch", 0, "fp32"), (f"chunks of {args.test_batch}", "torch", args.test_batch, "fp32"),
             (f"chunks of {args.test_batch}, {args.precision}", "torch", args.test_batch, args.precision)]
    if args.compile: paths.append((f"chunks of {args.test_batch}, torch.compile", "compile", args.test_batch, "fp32"))
    if not args.no_onnx and args.device == "cpu": paths.append((f"ONNX Runtime, chunks of {args.test_batch}", "onnx", args.test_batch, "fp32"))
    given = list(argv if argv is not None else sys.argv[1:])
    if "--out" in given: del given[given.index("--out"):given.index("--out") + 2]
    result = {"device": args.device if args.device != "cpu" else f"cpu ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads)", "torch": torch.__version__, "rows": [],
              "command": " ".join(["python benchmarks/bench_inference.py", *given])}
    for model in args.models:
        for label, kind, chunk, precision in paths:
            cmd = [sys.executable, __file__, "--child", model, kind, "--test-batch", str(chunk), "--precision", precision,
                   "--device", args.device, "--repeats", str(args.repeats), "--threads", str(args.threads)]
            run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [l for l in run.stdout.splitlines() if l.startswith("RESULT ")]
            row = {"model": model, "size": list(MODELS[model][2]), "path": label,
                   **(json.loads(line[-1][7:]) if line else {"error": (run.stderr.strip().splitlines() or ["failed"])[-1][:200]})}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    tag = "cpu" if args.device == "cpu" else "cuda"
    write_json(out / f"inference_{tag}.json", result)
    lines = [f"# Test-time inference by path on {result['device']}", "", f"torch {result['torch']}", "",
             f"Command: `{result['command']}`", "",
             "| model | image | path | s / image | images / s | peak memory (MB) | first call s | ONNX vs PyTorch: max abs logit diff | labels equal | export s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if "error" in r: lines.append(f"| {r['model']} | {r['size'][0]}×{r['size'][1]} | {r['path']} | failed: {r['error']} | | | | | | |"); continue
        lines.append(f"| {r['model']} | {r['size'][0]}×{r['size'][1]} | {r['path']} | {r['s_per_image']} | {r['images_per_s']} "
                     f"| {r.get('peak_mem_mb', '')} | {r.get('first_call_s', '')} | {r.get('max_abs_logit_diff', '') if 'max_abs_logit_diff' not in r else format(r['max_abs_logit_diff'], '.1e')} "
                     f"| {'' if 'labels_equal' not in r else format(100 * r['labels_equal'], '.4f') + ' %'} | {r.get('export_s', '')} |")
    write_text(out / f"inference_{tag}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
