#!/usr/bin/env python
"""Seconds per HRDA self-training iteration, images per second, peak memory and model FLOPs; and test-time seconds
per image with the full slide inference. Writes JSON and a markdown table into reports/perf/.

Usage (from the repository root):
    .venv/bin/python benchmarks/bench_train_step.py --device cuda            # paper settings: MiT-B5, 1024/512, 2+2
    .venv/bin/python benchmarks/bench_train_step.py --device cuda --precision fp32 tf32 bf16 --compile --checkpointing --profile
    .venv/bin/python benchmarks/bench_train_step.py --device cpu --set backbone=mit_b0 crop_size=[128,128] \
        hr_crop_size=[64,64] --infer-size 128 256                           # the CPU version at small sizes

One iteration is `hrda.dacs.dacs_step` exactly as training runs it: EMA update, source pass with feature distance
(a frozen ImageNet model, randomly initialised here: only its cost matters), teacher pseudo-labels by the HR slide,
ClassMix, jitter and blur, mixed pass, one AdamW step. Inputs are random tensors of the configured sizes, so no
dataset is needed. This is a benchmark, not a test: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import _cpu_peak_mb, _reset_cpu_peak, _sync  # noqa: E402
from flops import flop_counter  # noqa: E402
from hrda.config import TrainConfig, load_config, narrow  # noqa: E402
from hrda.core import autocast_dtype, get_device, make_generator  # noqa: E402
from hrda.files import write_json, write_text  # noqa: E402
from hrda.dacs import DACSConfig, dacs_step  # noqa: E402
from hrda.features import FrozenFeatureTarget, hold_in_dtype_  # noqa: E402
from hrda.optim import build_optimizer  # noqa: E402
from hrda.replay import ReplayStep  # noqa: E402
from hrda.segmentor import SegmentorConfig, build_segmentor  # noqa: E402


def random_batch(cfg: TrainConfig, device: torch.device, g: torch.Generator) -> dict:
    "A training batch of random images and labels at the configured crop size (labels in blocks, like real ones)."
    b, (h, w) = cfg.batch_size, cfg.crop_size
    coarse = torch.randint(cfg.num_classes, (b, 1, h // 32 + 1, w // 32 + 1), generator=g).float()
    gt = torch.nn.functional.interpolate(coarse, scale_factor=32, mode="nearest")[:, 0, :h, :w].long()
    return {"img": torch.randn(b, 3, h, w, generator=g).to(device), "gt": gt.to(device),
            "target_img": torch.randn(b, 3, h, w, generator=g).to(device),
            "valid_pseudo_mask": torch.ones(b, h, w).to(device),
            "source_classes": torch.unique(gt).tolist()}  # listed on the host, as the training loader does


def compile_regions(model: torch.nn.Module) -> None:
    """Compile the repeated regions of `model` in place: each MiT block's attention and Mix-FFN (one graph per stage and
    input shape, shared by the stage's blocks), else the whole backbone. Stochastic depth stays outside the graphs."""
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = [m for m in model.backbone.modules() if hasattr(m, "attn") and hasattr(m, "mlp")]
    for blk in blocks:
        blk.attn.compile(dynamic=False)
        blk.mlp.compile(dynamic=False)
    if not blocks:
        model.backbone = torch.compile(model.backbone)


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _cpu_peak_mb()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_cpu_peak()


def dwconv_on_contiguous(on: bool) -> None:
    "Experiment: Mix-FFN's depthwise conv on a contiguous (NCHW) copy of its input instead of the channels-last view."
    from hrda import mit
    if not hasattr(mit.DWConv, "_view_forward"): mit.DWConv._view_forward = mit.DWConv.forward
    mit.DWConv.forward = (lambda self, x, h, w: self.dwconv(mit.tokens_to_map(x, h, w).contiguous())
                                .flatten(2).transpose(1, 2)) if on else mit.DWConv._view_forward


def start_variant(device: torch.device, cudnn_benchmark: bool, layout: str) -> None:
    "Before a measurement: reset the peak-memory counter and set the variant's cuDNN autotuning and layout experiment."
    reset_peak(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    dwconv_on_contiguous(layout == "dwconv")


def make_step(cfg: TrainConfig, device: torch.device, precision: str, compile: bool = False,
              checkpointing: bool = False, step_mode: str = "eager") -> tuple:
    """(step(t), student): one `dacs_step` at iteration t on a fixed random batch, with fresh models and optimiser;
    step_mode 'replay' or 'graph' runs it as `hrda.replay.ReplayStep` (then `step.replay` is that object)."""
    amp = autocast_dtype(precision, device)
    if device.type == "cuda" and precision != "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    student = build_segmentor(narrow(SegmentorConfig, cfg)).to(device)
    teacher = copy.deepcopy(student).requires_grad_(False)
    imnet = build_segmentor(narrow(SegmentorConfig, cfg)).to(device).requires_grad_(False).eval() if cfg.fd_lambda > 0 else None
    if imnet is not None: hold_in_dtype_(imnet, amp)  # as the training loop does
    target = None  # VFM-UDA++'s frozen DINOv2 (random weights: the cost does not depend on them)
    if cfg.feature_distill_lambda > 0: target = hold_in_dtype_(FrozenFeatureTarget(cfg.feature_target, cfg.feature_target_size).to(device), amp)
    if checkpointing:  # only the student trains; MiT backbones recompute block activations in backward
        if not hasattr(student.backbone, "grad_checkpoint"):
            raise SystemExit(f"--checkpointing needs a MiT backbone, not {cfg.backbone}")
        student.backbone.grad_checkpoint = True
    if compile:
        for m in (student, teacher) + ((imnet,) if imnet is not None else ()):
            compile_regions(m)
    optimizer = build_optimizer(student, cfg.lr, cfg.weight_decay, capturable=step_mode != "eager", rule=cfg.optim_groups,
                                backbone_lr_mult=cfg.backbone_lr_mult, layer_decay=cfg.layer_decay)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    g = make_generator(0)
    dcfg = narrow(DACSConfig, cfg)
    batch = random_batch(cfg, device, make_generator(0, "batch"))
    if step_mode == "eager":
        return (lambda t: dacs_step(student, teacher, imnet, optimizer, batch, t, g, dcfg, amp, scaler, feature_target=target)), student
    replay = ReplayStep(student, teacher, imnet, optimizer, dcfg, amp, scaler, graph=step_mode == "graph", warmup=GRAPH_WARMUP)
    step = lambda t: replay(batch, t, g)
    step.replay = replay
    return step, student


GRAPH_WARMUP = 2  # eager iterations of a graph step before its capture (the capture is the next one)


def bench_train(cfg: TrainConfig, device: torch.device, precision: str, compile: bool, iters: int, warmup: int,
                count_flops: bool, profile: bool = False, checkpointing: bool = False, cudnn_benchmark: bool = False,
                layout: str = "", step_mode: str = "eager") -> dict:
    "Seconds per iteration, images per second, peak memory and FLOPs of `dacs_step` under `precision`."
    start_variant(device, cudnn_benchmark, layout)
    step, student = make_step(cfg, device, precision, compile, checkpointing, step_mode)
    if step_mode == "graph": warmup, count_flops = max(warmup, GRAPH_WARMUP + 1), False  # timed: replays only
    t0 = time.perf_counter()
    for t in range(warmup):
        step(t)
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in range(warmup, warmup + iters):
        step(t)
    _sync(device)
    s_iter = (time.perf_counter() - t0) / iters
    peak = peak_mb(device)  # of training alone: the FLOP count below holds extra references
    flops = None
    if count_flops:
        counter = flop_counter()  # torch's own count of grouped-conv backward is `groups` times too high
        with counter:
            step(warmup + iters)
        flops = counter.get_total_flops()
    table, busy = profile_table(lambda: step(warmup + iters + 1), device) if profile else (None, {})
    params = sum(p.numel() for p in student.parameters())
    return {"profile": table, **busy, "precision": precision, "step_mode": step_mode, "compile": compile, "checkpointing": checkpointing,
            "cudnn_benchmark": cudnn_benchmark, "layout_experiment": layout, "s_per_iter": round(s_iter, 4),
            "images_per_s": round(2 * cfg.batch_size / s_iter, 2), "peak_mem_mb": round(peak, 1),
            "warmup_s": round(warm_s, 2), "tflop_per_iter": None if flops is None else round(flops / 1e12, 3),
            "achieved_tflops": None if flops is None else round(flops / 1e12 / s_iter, 2), "student_params": params}


def profile_table(fn, device: torch.device, rows: int = 15) -> tuple[str, dict]:
    """The top operators (kernels on a GPU) of one call of `fn` by self time, as the profiler's text table; and the
    call's operator count, its host (CPU) time and, on a GPU, the time the GPU was busy (the sum of kernel times)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    averages = prof.key_averages()
    table = averages.table(sort_by=key, row_limit=rows)
    if device.type == "cuda":  # the host's side too: launches, and the waits of synchronising calls
        table += "\n" + averages.table(sort_by="self_cpu_time_total", row_limit=rows)
    busy = {"profiled_ops": sum(e.count for e in averages if e.key.startswith("aten::")),
            "profiled_cpu_ms": round(sum(e.self_cpu_time_total for e in averages) / 1e3, 1)}
    found = re.search(r"Self CUDA time total: ([0-9.]+)(ms|s|us)", table)
    if found:  # kernels never overlap in this eager, one-stream step, so their sum is the GPU's busy time
        busy["gpu_busy_ms"] = round(float(found[1]) * {"s": 1e3, "ms": 1.0, "us": 1e-3}[found[2]], 1)
    return table, busy


def bench_inference(cfg: TrainConfig, device: torch.device, precision: str, size: tuple[int, int], repeats: int,
                    compile: bool = False, cudnn_benchmark: bool = False, profile: bool = False, layout: str = "") -> dict:
    "Seconds per image of the full test-time inference (outer slide, HR slide, fusion) at `size`."
    start_variant(device, cudnn_benchmark, layout)
    amp = autocast_dtype(precision, device)
    torch.manual_seed(0)
    model = build_segmentor(narrow(SegmentorConfig, cfg)).to(device).eval()
    if compile:
        compile_regions(model)
    img = torch.randn(1, 3, *size, generator=make_generator(0)).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model.inference(img)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model.inference(img)
        _sync(device)
        s_image = (time.perf_counter() - t0) / repeats
        table, busy = profile_table(lambda: model.inference(img), device) if profile else (None, {})
    return {"precision": precision, "compile": compile, "cudnn_benchmark": cudnn_benchmark, "layout_experiment": layout,
            "size": list(size),
            "s_per_image": round(s_image, 4), "peak_mem_mb": round(peak_mb(device), 1), **busy, "profile": table}


def markdown(result: dict) -> str:
    "The results as markdown tables, with the device, versions and command."
    lines = [f"# HRDA speed and memory on {result['device_name']}", "",
             f"torch {result['torch']}, python {result['python']}; settings: {result['settings']}", "",
             f"Command: `{result['command']}`", "",
             "| precision | step | compile | checkpointing | cudnn benchmark | layout experiment | s / iteration | images / s | peak memory (MB) "
             "| TFLOP / iteration | achieved TFLOP/s | GPU busy (ms) | operators |",
             "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["train"]:
        lines.append(f"| {r['precision']} | {r.get('step_mode', 'eager')} | {r['compile']} | {r['checkpointing']} | {r.get('cudnn_benchmark', False)} "
                     f"| {r.get('layout_experiment') or '-'} | {r['s_per_iter']} | {r['images_per_s']} | {r['peak_mem_mb']} | {r['tflop_per_iter']} "
                     f"| {r['achieved_tflops']} | {r.get('gpu_busy_ms', '')} | {r.get('profiled_ops', '')} |")
    lines += ["", "| precision | compile | cudnn benchmark | layout experiment | image size | s / image | peak memory (MB) | GPU busy (ms) |",
              "|---|---|---|---|---|---:|---:|---:|"]
    for r in result["inference"]:
        lines.append(f"| {r['precision']} | {r.get('compile', False)} | {r.get('cudnn_benchmark', False)} "
                     f"| {r.get('layout_experiment') or '-'} | {r['size'][0]}×{r['size'][1]} | {r['s_per_image']} | {r['peak_mem_mb']} | {r.get('gpu_busy_ms', '')} |")
    for kind in ("train", "inference"):
        for r in result[kind]:
            if r.get("profile"):
                what = "one iteration" if kind == "train" else f"one {r['size'][0]}×{r['size'][1]} image"
                lines += ["", f"Where the time goes ({what}; {r['precision']}, compile {r['compile']}, checkpointing "
                              f"{r.get('checkpointing', False)}, cudnn benchmark {r.get('cudnn_benchmark', False)}, layout experiment {r.get('layout_experiment') or '-'}):", "",
                          "```", r["profile"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def variants(args: argparse.Namespace) -> list[tuple[str, bool, bool, bool, str, str]]:
    """(precision, compile, checkpointing, cudnn benchmark, layout experiment, step mode) to measure: `--variants` as
    written, else every combination of the flags."""
    if args.variants:
        out = []
        for v in args.variants:
            precision, *flags = v.split("+")
            if precision not in ("fp32", "tf32", "bf16", "fp16") or set(flags) - {"compile", "ckpt", "cudnn", "nchw", "replay", "graph"}:
                raise SystemExit(f"unknown variant {v!r}: write PRECISION[+compile][+ckpt][+cudnn][+nchw][+replay|+graph], e.g. bf16+graph")
            layout = "dwconv" if "nchw" in flags else ""
            mode = "graph" if "graph" in flags else "replay" if "replay" in flags else "eager"
            out.append((precision, "compile" in flags, "ckpt" in flags, "cudnn" in flags, layout, mode))
        return out
    return [(p, c, k, False, "", "eager") for p in args.precision for c in ([False, True] if args.compile else [False])
            for k in ([False, True] if args.checkpointing else [False])]


def save(result: dict, out: Path, tag: str) -> None:
    "Write the results so far as bench_<tag>.json and .md (each atomically)."
    write_json(out / f"bench_{tag}.json", result)
    write_text(out / f"bench_{tag}.md", markdown(result))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, tf32, bf16 and/or fp16")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile on the backbones")
    p.add_argument("--iters", type=int, default=5, help="timed iterations")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--infer-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    p.add_argument("--infer-repeats", type=int, default=3)
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one more iteration)")
    p.add_argument("--checkpointing", action="store_true", help="also measure with activation checkpointing (MiT)")
    p.add_argument("--profile", action="store_true", help="add the profiler's table of the top operators/kernels")
    p.add_argument("--variants", nargs="+", metavar="PRECISION[+compile][+ckpt][+cudnn][+nchw][+replay|+graph]",
                   help="measure exactly these, e.g. fp32 bf16 bf16+ckpt bf16+compile bf16+cudnn bf16+graph (instead of the "
                        "flags above; cudnn: torch.backends.cudnn.benchmark, which picks convolution kernels by timing them; nchw: "
                        "the experiment of Mix-FFN's depthwise conv on a contiguous copy of its input; replay / graph: the "
                        "step with its draws made first, eagerly or captured as a CUDA graph)")
    p.add_argument("--no-inference", action="store_true", help="skip the test-time inference timing")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="TrainConfig overrides (default: the paper's)")
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"), help="folder for bench_<device>.json/.md")
    args = p.parse_args(argv)
    device = get_device(args.device)
    cfg = load_config(TrainConfig, overrides=["pretrained=null", *args.set])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    result = {"device": str(device), "device_name": name, "torch": torch.__version__, "python": platform.python_version(),
              "command": " ".join(["python benchmarks/bench_train_step.py", *(argv if argv is not None else sys.argv[1:])]),
              "settings": {k: getattr(cfg, k) for k in ("backbone", "crop_size", "hr_crop_size", "batch_size", "fd_lambda")},
              "train": [], "inference": []}
    out, tag = Path(args.out), device.type
    counted = False
    for precision, compile, ckpt, cudnn, layout, mode in variants(args):
        r = bench_train(cfg, device, precision, compile, args.iters, args.warmup,
                        not (args.no_flops or compile or counted), args.profile, ckpt, cudnn, layout, mode)  # FLOPs: once, eager
        counted = counted or r["tflop_per_iter"] is not None
        print({k: v for k, v in r.items() if k != "profile"}, flush=True)
        result["train"].append(r)
        save(result, out, tag)  # after every measurement, so that a run cut short keeps what it measured
        measured = [(i["precision"], i["compile"], i["cudnn_benchmark"], i["layout_experiment"]) for i in result["inference"]]
        if (precision, compile, cudnn, layout) not in measured and not args.no_inference:  # checkpointing: no change
            r = bench_inference(cfg, device, precision, tuple(args.infer_size), args.infer_repeats, compile, cudnn,
                                args.profile, layout)
            print({k: v for k, v in r.items() if k != "profile"}, flush=True)
            result["inference"].append(r)
            save(result, out, tag)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
