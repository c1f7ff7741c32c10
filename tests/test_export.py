"""ONNX export of the whole test-time inference: ONNX Runtime reproduces PyTorch's logits and `hrda predict`'s labels
(HRDA and DAFormer, the demo CNN, MiT-B0, a DINOv2-style ViT and a ViT-Adapter, several outer windows and chunked encoder passes),
`hrda predict --onnx` never imports the model code, and bad requests fail in one line."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from hrda.cli import main
from hrda.export import ExportError, compare_with_torch, export_onnx
from hrda.predict import load_model, tiny_checkpoint

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("overrides", [
    {},                                                               # HRDA on the tiny CNN: 2 outer windows
    {"single_scale": 1.0, "hr_crop_size": None},                      # DAFormer
    {"backbone": "mit_b0", "backbone_kwargs": {}, "head_kwargs": {}, "attention_head_kwargs": {}},
    {"backbone": "vit_tiny14", "backbone_kwargs": {"input_scale": 1.1}, "head": "lightweight",
     "attention_head": "lightweight", "head_kwargs": {}, "attention_head_kwargs": {}},
    {"backbone": "vit_tiny14_adapter", "backbone_kwargs": {"embed_dim": 64, "num_heads": 2, "input_scale": 1.1,
     "conv_inplane": 16}, "head": "pyramid", "head_kwargs": {}, "single_scale": 1.0, "hr_crop_size": None},
], ids=["hrda-cnn", "daformer-cnn", "hrda-mit_b0", "hrda-dinov2", "vfmuda++-adapter"])
def test_onnx_runtime_reproduces_the_logits(tmp_path, overrides):
    torch.manual_seed(0)
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth", **overrides)
    model = load_model(ckpt, device="cpu").model
    res = export_onnx(ckpt, tmp_path / "m.onnx", size=(96, 200), test_batch=3)
    check = compare_with_torch(res["path"], model)
    assert check["max_abs_logit_diff"] < 1e-4 and check["within_tolerance"], check
    meta = res["metadata"]
    assert json.loads(meta["hrda.input_size"]) == [96, 200] and meta["hrda.architecture"] == (
        "daformer" if "single_scale" in overrides else "hrda")


def test_predict_onnx_writes_the_labels_of_hrda_predict_without_the_model_code(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0  # 64x128 at 128x64
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i, (h, w) in enumerate([(64, 128), (100, 200), (32, 64)]):  # every one is 64x128 at the test scale
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "in" / f"{i}.png")
    code = ("import sys; from hrda.cli import main; rc = main(sys.argv[1:]); "
            "print([m for m in ('hrda.segmentor', 'hrda.backbones', 'hrda.predict', 'hrda.mit', 'timm') if m in sys.modules]); "
            "sys.exit(rc)")
    run = subprocess.run([sys.executable, "-c", code, "predict", "--onnx", str(tmp_path / "m.onnx"), str(tmp_path / "in"),
                          "--out", str(tmp_path / "onnx"), "--no-progress"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip().endswith("[]"), run.stdout + run.stderr
    assert main(["predict", "--checkpoint", str(ckpt), str(tmp_path / "in"), "--out", str(tmp_path / "torch"),
                 "--device", "cpu", "--no-progress"]) == 0
    for i in range(3):
        a, b = (np.array(Image.open(tmp_path / kind / "labels" / f"{i}.png")) for kind in ("onnx", "torch"))
        assert a.shape == b.shape and (a == b).all()


def test_bad_export_and_onnx_inputs_fail_in_one_line(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth")
    timm_ckpt = tiny_checkpoint(tmp_path / "timm" / "checkpoints" / "latest.pth", backbone="timm:resnet18", backbone_kwargs={})
    with pytest.raises(ExportError, match="cannot be exported: `hrda export` supports mit_b0"):
        export_onnx(timm_ckpt, tmp_path / "m.onnx")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--size", "64", "160"]) == 0
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "x.png")
    capsys.readouterr()
    assert main(["predict", "--onnx", str(tmp_path / "m.onnx"), str(tmp_path / "x.png"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "takes 64x160: export a model for it with `hrda export ... --size 64 128`" in err
    assert not (tmp_path / "o" / "labels").exists()
    (tmp_path / "cut.onnx").write_bytes((tmp_path / "m.onnx").read_bytes()[:300])
    assert main(["predict", "--onnx", str(tmp_path / "cut.onnx"), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 1
    assert "truncated or not an ONNX model; write it again with `hrda export`" in capsys.readouterr().err
    import onnx
    from onnx import TensorProto, helper
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 3, 64, 128]) for n in ("image", "logits")]
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", io[:1], io[1:])),
              tmp_path / "foreign.onnx")
    assert main(["predict", "--onnx", str(tmp_path / "foreign.onnx"), str(tmp_path / "x.png"), "--out", str(tmp_path / "o")]) == 1
    assert "was not written by `hrda export` (no hrda.* metadata)" in capsys.readouterr().err


@pytest.mark.parametrize("overrides", [{}, {"single_scale": 1.0}, {"fixed_attention": 0.5}], ids=["hrda", "daformer", "fixed-attention"])
def test_encoder_passes_in_chunks_give_todays_labels(overrides):
    "test_batch bounds the inputs per encoder pass (context crops and detail windows); the logits stay those of one pass."
    from hrda.segmentor import tiny_segmentor
    x = torch.randn(2, 3, 200, 330, generator=torch.Generator().manual_seed(0))  # 2 images x 6 outer windows
    model = tiny_segmentor(**overrides).eval()
    with torch.no_grad():
        model.decode_head.conv_seg.weight.mul_(100)  # logits far from ties, as a trained model's are
        whole = model.inference(x)
        for n in (1, 4, 7, 1000):
            model.cfg.test_batch = n
            chunked = model.inference(x)
            torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-5)
            differ = chunked.argmax(1) != whole.argmax(1)  # only where the two best logits tie to float rounding
            top2 = whole.topk(2, dim=1).values
            assert differ.sum() <= 2 and ((top2[:, 0] - top2[:, 1])[differ] < 1e-4).all()


def test_predict_and_evaluate_run_under_bf16_autocast(tmp_path, synth):
    "bf16 where asked: the labels of a trained-looking (sharp) model stay nearly those of fp32."
    ckpt = tiny_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pth", target_scale=None, num_classes=19)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(synth / "target"), "--dataset", "cityscapes",
                 "--device", "cpu", "--no-progress", "--precision", "bf16", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["precision"] == "bf16"
    model = load_model(ckpt, device="cpu").model
    with torch.no_grad(): model.decode_head.conv_seg.weight.mul_(100)
    from hrda.predict import predict_image
    rgb = np.random.default_rng(0).integers(0, 256, (64, 128, 3), dtype=np.uint8)
    a, b = predict_image(model, rgb, precision="bf16"), predict_image(model, rgb)
    assert (a == b).mean() > 0.95
