"""The GPU benchmark scripts run on the CPU at tiny sizes and write their report (numbers are not asserted)."""
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_train_step  # noqa: E402

TINY = ["backbone=cnn", "crop_size=[128,128]", "hr_crop_size=[64,64]", "batch_size=2", "fd_lambda=0.005",
        "head_kwargs={channels: 16, embed_dims: 16}", "attention_head_kwargs={channels: 16, embed_dims: 16}",
        "test_crop_size=[128,128]", "test_stride=[64,64]"]


def test_train_step_benchmark_writes_its_report(tmp_path):
    result = bench_train_step.main(["--device", "cpu", "--iters", "1", "--warmup", "1", "--infer-size", "64", "128",
                                    "--infer-repeats", "1", "--profile", "--out", str(tmp_path), "--set", *TINY])
    saved = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert saved["settings"]["backbone"] == "cnn" and saved["settings"]["crop_size"] == [128, 128]
    train, infer = saved["train"][0], saved["inference"][0]
    assert train["s_per_iter"] > 0 and train["images_per_s"] > 0 and train["tflop_per_iter"] > 0
    assert infer["size"] == [64, 128] and infer["s_per_image"] > 0
    md = (tmp_path / "bench_cpu.md").read_text()
    assert "| fp32 | eager | False | False | False | - |" in md and "Where the time goes" in md and "aten::" in train["profile"]
    assert result["train"][0]["student_params"] == train["student_params"]


def test_train_step_benchmark_measures_the_replayed_step(tmp_path):
    result = bench_train_step.main(["--device", "cpu", "--iters", "1", "--warmup", "1", "--no-flops", "--no-inference",
                                    "--variants", "fp32+replay", "--out", str(tmp_path), "--set", *TINY])
    assert result["train"][0]["step_mode"] == "replay" and result["train"][0]["s_per_iter"] > 0
    assert "| fp32 | replay | False |" in (tmp_path / "bench_cpu.md").read_text()
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_train_step.main(["--device", "cpu", "--variants", "fp32+graph+replay+x", "--out", str(tmp_path)])


def test_train_step_benchmark_measures_activation_checkpointing(tmp_path):
    mit = ["backbone=mit_b0", "crop_size=[64,64]", "hr_crop_size=[32,32]", "fd_lambda=0.0", "test_crop_size=[64,64]",
           "test_stride=[32,32]"]
    result = bench_train_step.main(["--device", "cpu", "--iters", "1", "--warmup", "0", "--no-flops", "--checkpointing",
                                    "--infer-size", "64", "64", "--infer-repeats", "1", "--out", str(tmp_path), "--set", *mit])
    assert [r["checkpointing"] for r in result["train"]] == [False, True]
    assert "| fp32 | eager | False | True | False | - |" in (tmp_path / "bench_cpu.md").read_text()


def test_train_step_benchmark_measures_named_variants_and_rejects_unknown_ones(tmp_path):
    args = ["--device", "cpu", "--iters", "1", "--warmup", "0", "--no-flops", "--no-inference", "--out", str(tmp_path)]
    result = bench_train_step.main([*args, "--variants", "fp32", "bf16", "--set", *TINY])
    assert [(r["precision"], r["compile"], r["checkpointing"]) for r in result["train"]] == [("fp32", False, False),
                                                                                            ("bf16", False, False)]
    assert result["inference"] == [] and len(json.loads((tmp_path / "bench_cpu.json").read_text())["train"]) == 2
    with pytest.raises(SystemExit, match="unknown variant 'bf16\\+fast'"):
        bench_train_step.main([*args, "--variants", "bf16+fast", "--set", *TINY])


def test_depthwise_conv_benchmark_writes_its_table(tmp_path):
    import bench_dwconv
    rows = bench_dwconv.main(["--device", "cpu", "--repeats", "1", "--batches", "2", "--shapes", "3", "--out", str(tmp_path)])
    assert [(r["where"], r["dtype"], r["pass"]) for r in rows][:2] == [("MiT stage 4", "fp32", "forward"),
                                                                     ("MiT stage 4", "fp32", "forward+backward")]
    assert all(r[k] > 0 for r in rows for k in ("channels_last_ms", "nchw_ms", "nchw+cudnn_ms"))
    md = (tmp_path / "dwconv_cpu.md").read_text()
    assert "| MiT stage 4 | 2 | 2048 | 16 | bf16 | forward+backward |" in md and "--shapes 3" in md


def test_sync_finder_says_it_needs_a_gpu(monkeypatch):
    import find_syncs
    monkeypatch.setattr(find_syncs.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        find_syncs.main([])


def test_operator_counter_finds_the_host_reads_it_is_told_of(monkeypatch):
    "count_ops counts every operator of a step and attributes a planted .item() to its line of hrda code."
    import count_ops
    import hrda.dacs
    cfg_args = ["--crop", "64", "--set", *[a for a in TINY if not a.startswith(("crop_size", "hr_crop_size"))]]
    base = count_ops.main(cfg_args)
    assert base["operators"] > 1000 and base["host_reads"] <= 10  # only host-side draws: crop offsets, coins, jitter order
    assert base["data_dependent"] == 0  # ClassMix draws from label values the loader lists on the host
    real = hrda.dacs.pseudo_label
    def reads_more(*args, **kwargs):
        out = real(*args, **kwargs)
        for _ in range(5): out[0].sum().item()  # five planted host reads
        return out
    monkeypatch.setattr(hrda.dacs, "pseudo_label", reads_more)
    assert count_ops.main(cfg_args)["host_reads"] == base["host_reads"] + 5


def test_replayed_steps_device_part_reads_nothing_back(monkeypatch):
    "With the draws made first, the part of the step a CUDA graph records reads no value back and has only fixed shapes."
    import count_ops
    import hrda.dacs
    cfg_args = ["--crop", "64", "--step-mode", "replay", "--set",
                *[a for a in TINY if not a.startswith(("crop_size", "hr_crop_size"))], "mic_lambda=1.0", "mic_block_size=16"]
    out = count_ops.main(cfg_args)
    assert out["step"]["operators"] > 1000 and out["step"].get("host reads", 0) == 0
    assert out["step"].get("data-dependent shapes", 0) == 0
    real = hrda.dacs.pseudo_label
    monkeypatch.setattr(hrda.dacs, "pseudo_label", lambda *a, **k: (lambda out: (out[0].sum().item(), out)[1])(real(*a, **k)))
    assert count_ops.main(cfg_args)["step"]["host reads"] == 1  # a planted read inside the step is seen there


def test_flop_counter_counts_grouped_convolution_gradients_once():
    "Each gradient of a convolution costs its forward, grouped or not (torch 2.14 counts a grouped one `groups` times)."
    import torch
    from flops import conv_flops, flop_counter
    for conv, x in ((torch.nn.Conv2d(64, 64, 3, padding=1, groups=64), torch.randn(2, 64, 8, 8, requires_grad=True)),
                    (torch.nn.Conv2d(32, 48, 3, padding=1, groups=4), torch.randn(2, 32, 8, 8, requires_grad=True)),
                    (torch.nn.ConvTranspose2d(16, 8, 2, 2), torch.randn(2, 16, 8, 8, requires_grad=True))):
        with flop_counter() as counter:
            y = conv(x)
            forward = counter.get_total_flops()
            y.sum().backward()
        transposed = isinstance(conv, torch.nn.ConvTranspose2d)
        assert forward == conv_flops(x.shape, conv.weight.shape, y.shape, transposed) == 2 * x.shape[0] * (
            x.shape[2] * x.shape[3] if transposed else y.shape[2] * y.shape[3]) * conv.weight.numel()
        assert counter.get_total_flops() == 3 * forward  # the input's and the weight's gradient


def test_cost_benchmark_counts_an_experiment_on_the_meta_device(tmp_path):
    import bench_cost
    result = bench_cost.main(["--experiments", "synth_hrda", "--ops-crop", "64", "--infer-size", "128", "256",
                              "--out", str(tmp_path)])
    row = result["rows"][0]
    assert row["hrda"] and row["tflop_per_iter"] > 0 and row["operators_per_iter"] > 0 and row["test_encoder_passes"] > 0
    assert "| synth_hrda |" in (tmp_path / "cost_cpu.md").read_text() and str(tmp_path) not in result["command"]


def test_inference_benchmark_measures_each_path_in_its_own_process(tmp_path):
    import bench_inference
    result = bench_inference.main(["--models", "demo", "--no-onnx", "--out", str(tmp_path)])
    rows = result["rows"]
    assert [r["path"] for r in rows] == ["one pass (as before)", "chunks of 2", "chunks of 2, bf16"]
    assert all(r["s_per_image"] > 0 and r["peak_mem_mb"] > 0 for r in rows), rows
    assert "| demo | 256×512 | chunks of 2 |" in (tmp_path / "inference_cpu.md").read_text()
