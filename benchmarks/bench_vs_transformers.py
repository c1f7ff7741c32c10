#!/usr/bin/env python
"""Side-by-side timing of this MiT and the `transformers` SegFormer encoder of the same size, with the same weights,
the same input and the same thread count; also checks that both give the same features.

`transformers` is an optional peer, never a dependency of hrda: install it into a separate folder and put that on
PYTHONPATH, for example
    pip install --target /tmp/hf transformers==4.46.3 && \
    PYTHONPATH=/tmp/hf .venv/bin/python benchmarks/bench_vs_transformers.py --sizes mit_b0 mit_b2 --input 512
Writes reports/perf/mit_vs_transformers_<device>.{json,md}. A benchmark, not a test: it prints numbers.
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
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import _sync  # noqa: E402
from hrda.backbones import create_backbone
from hrda.mit import MIT_CONFIGS, to_huggingface_keys  # noqa: E402
from hrda.core import get_device
from hrda.files import write_json, write_text  # noqa: E402


def hf_encoder(name: str):
    "The transformers SegformerModel of MiT size `name`, or an error that says how to install the peer."
    try:
        from transformers import SegformerConfig, SegformerModel
    except ImportError as e:
        raise SystemExit(f"transformers is not importable ({e}); install it into a separate folder and add it to "
                         "PYTHONPATH (see this script's docstring)") from None
    c = MIT_CONFIGS[name]
    cfg = SegformerConfig(hidden_sizes=list(c["embed_dims"]), depths=list(c["depths"]), num_attention_heads=[1, 2, 5, 8],
                          sr_ratios=[8, 4, 2, 1], mlp_ratios=[4, 4, 4, 4], drop_path_rate=0.0,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SegformerModel(cfg)


def timed(fn, repeats: int, device) -> float:
    "Median seconds of `fn()` over `repeats` calls, after one warm-up call."
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compare(name: str, size: int, batch: int, device, repeats: int) -> dict:
    "Forward and forward+backward median times of both encoders, and the largest feature difference."
    ours = create_backbone(name, drop_path_rate=0.0).to(device).eval()
    theirs = hf_encoder(name)
    missing, unexpected = theirs.load_state_dict(to_huggingface_keys(ours.state_dict(), prefix="encoder."), strict=False)
    if missing or unexpected:
        raise SystemExit(f"weight transfer failed: missing {missing[:5]}, unexpected {unexpected[:5]}")
    theirs = theirs.to(device).eval()
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        a = ours(x)
        b = theirs(pixel_values=x, output_hidden_states=True).hidden_states
    diff = max((p - q).abs().max().item() for p, q in zip(a, b))
    row = {"backbone": name, "input": size, "batch": batch, "max_feature_diff": diff}
    for label, model, call in (("hrda", ours, lambda: ours(x)),
                               ("transformers", theirs, lambda: theirs(pixel_values=x, output_hidden_states=True).hidden_states)):
        with torch.no_grad():
            row[f"{label}_fwd_ms"] = round(1000 * timed(call, repeats, device), 2)
        model.train()
        row[f"{label}_fwd_bwd_ms"] = round(1000 * timed(lambda: sum(f.float().mean() for f in call()).backward(), repeats, device), 2)
        model.eval()
    row["fwd_speedup"] = round(row["transformers_fwd_ms"] / row["hrda_fwd_ms"], 2)
    row["fwd_bwd_speedup"] = round(row["transformers_fwd_bwd_ms"] / row["hrda_fwd_bwd_ms"], 2)
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["mit_b0"], help="MiT sizes, e.g. mit_b0 mit_b5")
    p.add_argument("--input", type=int, default=256, help="square input side in pixels")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=str(ROOT / "reports" / "perf"))
    args = p.parse_args(argv)
    if args.threads: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    import transformers
    rows = [compare(n, args.input, args.batch, device, args.repeats) for n in args.sizes]
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "machine": platform.machine(), "rows": rows,
              "command": " ".join(["python benchmarks/bench_vs_transformers.py", *(argv if argv is not None else sys.argv[1:])])}
    md = [f"# MiT: hrda vs transformers {transformers.__version__} ({device}, {result['threads']} threads, torch {torch.__version__})",
          "", f"Command: `{result['command']}`", "",
          "| backbone | input | batch | hrda fwd ms | transformers fwd ms | speed-up | hrda fwd+bwd ms | transformers fwd+bwd ms | speed-up | max feature diff |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['backbone']} | {r['input']} | {r['batch']} | {r['hrda_fwd_ms']} | {r['transformers_fwd_ms']} | {r['fwd_speedup']} "
           f"| {r['hrda_fwd_bwd_ms']} | {r['transformers_fwd_bwd_ms']} | {r['fwd_bwd_speedup']} | {r['max_feature_diff']:.1e} |" for r in rows]
    write_json(Path(args.out) / f"mit_vs_transformers_{device.type}.json", result)
    write_text(Path(args.out) / f"mit_vs_transformers_{device.type}.md", "\n".join(md) + "\n")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
