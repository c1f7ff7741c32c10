"""Bad inputs through the `hrda` command: each gets one line on stderr, the documented exit code, and writes nothing.

Every case id here is a row of the failure table in the command-line docs (nbs/09_cli.ipynb); a test checks that
the two lists agree."""
import json
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import hrda.cli as cli
from hrda.predict import tiny_checkpoint
from conftest import ROOT


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    "A training checkpoint of the tiny model (untrained weights: the errors come before any prediction matters)."
    return tiny_checkpoint(tmp_path_factory.mktemp("runs") / "exp" / "s0" / "checkpoints" / "latest.pth")


def cityscapes_val(root, label=None, label_mode=None, label_size=(32, 64)):
    "A two-image Cityscapes val tree; `label` replaces the train-id labels (e.g. raw label ids or 16-bit values)."
    g = np.random.default_rng(0)
    for i, city in enumerate(("aachen", "bonn")):
        stem = f"{city}/{city}_{i:06d}_000019"
        img = g.integers(0, 256, (32, 64, 3), dtype=np.uint8)
        gt = np.zeros(label_size, np.uint8) if label is None else np.full(label_size, label, np.uint16 if label_mode else np.uint8)
        for sub, arr in ((f"leftImg8bit/val/{stem}_leftImg8bit.png", img), (f"gtFine/val/{stem}_gtFine_labelTrainIds.png", gt)):
            (root / sub).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / sub)
    return root


def snapshot(*folders):
    "Every file under `folders` with its size and modification time."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def setup_case(case, tmp_path, ckpt, synth):
    "The command line of a case id, after writing the bad input it needs under tmp_path/inputs."
    inp, out = tmp_path / "inputs", tmp_path / "out"
    inp.mkdir()
    train = ["train", "--config", ROOT / "experiments" / "synth_hrda.yaml", "--set", f"out_dir={out}"]
    evaluate = ["evaluate", "--device", "cpu", "--no-progress", "--out", out]
    predict = ["predict", "--checkpoint", ckpt, "--device", "cpu", "--no-progress"]
    if case == "train-iters-zero": return train + ["iters=0"]
    if case == "train-lr-negative": return train + ["lr=-1"]
    if case == "train-batch-zero": return train + ["batch_size=0"]
    if case == "train-unknown-key": return train + ["itres=3"]
    if case == "train-set-not-yaml": return train + ["lr=[1"]
    if case == "train-config-not-yaml":
        (inp / "bad.yaml").write_text("experiment: x\n  crop_size: [1\n")
        return ["train", "--config", inp / "bad.yaml", "--set", f"out_dir={out}"]
    if case == "train-cuda-without-gpu":
        if torch.cuda.is_available(): pytest.skip("this machine has CUDA")
        return train + ["device=cuda"]
    if case == "train-num-classes-below-labels":
        return train + [f"source_root={synth / 'source'}", f"target_root={synth / 'target'}", "num_classes=5"]
    if case == "train-resume-from-missing":
        return train[:-2] + ["--resume-from", inp / "nothing.pth", "--set", f"out_dir={out}"]
    if case == "checkpoint-empty":
        (inp / "empty.pth").write_bytes(b"")
        return evaluate + ["--checkpoint", inp / "empty.pth"]
    if case == "checkpoint-truncated":
        (inp / "cut.pth").write_bytes(ckpt.read_bytes()[:300])
        return evaluate + ["--checkpoint", inp / "cut.pth"]
    if case == "checkpoint-other-architecture":
        return evaluate + ["--checkpoint", ckpt, "--set", "backbone_kwargs={widths: [4, 8, 12, 16], depths: [1, 1, 1, 1]}"]
    if case == "labels-raw-label-ids": return evaluate + ["--checkpoint", ckpt, "--data", cityscapes_val(inp, label=26)]
    if case == "labels-16-bit": return evaluate + ["--checkpoint", ckpt, "--data", cityscapes_val(inp, label=300, label_mode="I;16")]
    if case == "labels-size-mismatch": return evaluate + ["--checkpoint", ckpt, "--data", cityscapes_val(inp, label_size=(16, 64))]
    if case == "evaluate-max-images-negative": return evaluate + ["--checkpoint", ckpt, "--max-images", "-1"]
    if case == "evaluate-out-not-writable":
        (inp / "file").write_text("x")
        return ["evaluate", "--device", "cpu", "--checkpoint", ckpt, "--out", inp / "file" / "eval"]
    if case in ("predict-scale-zero", "predict-scale-0x0", "predict-scale-negative"):
        return predict + [inp, "--out", out, "--scale", {"predict-scale-zero": "0", "predict-scale-0x0": "0x0",
                                                         "predict-scale-negative": "-0.5"}[case]]
    if case == "predict-no-images": return predict + [inp, "--out", out]
    if case == "predict-out-not-writable":
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(inp / "a.png")
        return predict + [inp, "--out", inp / "a.png" / "out"]
    raise KeyError(case)


CASES = {  # case id: (exit code, what the one line says)
    "train-iters-zero": (2, "iters=0 is out of range: it must be > 0"),
    "train-lr-negative": (2, "lr=-1.0 is out of range: it must be > 0"),
    "train-batch-zero": (2, "batch_size=0 is out of range: it must be > 0"),
    "train-unknown-key": (2, "unknown config key 'itres' in overrides (did you mean 'iters'?)"),
    "train-set-not-yaml": (2, "--set lr=[1 is not valid YAML"),
    "train-config-not-yaml": (2, "bad.yaml is not valid YAML: mapping values are not allowed here at line 2"),
    "train-cuda-without-gpu": (2, "device 'cuda' was requested but CUDA is not available here"),
    "train-num-classes-below-labels": (2, "hold train id 18 (see its class statistics) but num_classes=5"),
    "train-resume-from-missing": (1, "nothing.pth does not exist"),
    "checkpoint-empty": (1, "empty.pth is empty (0 bytes)"),
    "checkpoint-truncated": (1, "cut.pth is truncated or not a torch file"),
    "checkpoint-other-architecture": (1, "does not fit the model its config describes"),
    "labels-raw-label-ids": (1, "They look like Cityscapes label ids (0-33), not train ids"),
    "labels-16-bit": (1, "16-bit"),
    "labels-size-mismatch": (1, "is 64x16 but its image"),
    "evaluate-max-images-negative": (2, "invalid count '-1'"),
    "evaluate-out-not-writable": (1, "is a file, not a folder"),
    "predict-scale-zero": (2, "invalid scale '0'"),
    "predict-scale-0x0": (2, "invalid scale '0x0'"),
    "predict-scale-negative": (2, "invalid scale '-0.5'"),
    "predict-no-images": (1, "no images (.png"),
    "predict-out-not-writable": (1, "is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_line_and_writes_nothing(case, tmp_path, ckpt, synth, capsys):
    argv = [str(a) for a in setup_case(case, tmp_path, ckpt, synth)]
    before = snapshot(tmp_path, ckpt.parent.parent, synth)
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    want_code, message = CASES[case]
    assert code == want_code, f"exit {code}: {err}"
    assert len(err.splitlines()) == 1 and message in err and err.startswith(f"hrda {argv[0]}: error: "), err
    assert snapshot(tmp_path, ckpt.parent.parent, synth) == before, "a file was written or changed"


def test_the_failure_table_in_the_docs_lists_every_case():
    "The docs table and these tests name the same failures (plus the behaviours tested in test_train/test_predict)."
    nb = json.loads((ROOT / "nbs" / "09_cli.ipynb").read_text())
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    rows = set(re.findall(r"`test_bad_inputs\[([\w-]+)\]`", text))
    assert rows == set(CASES), f"missing from the table: {set(CASES) - rows}; not tested: {rows - set(CASES)}"
    for test in re.findall(r"`(test_\w+\.py::test_\w+)`", text):
        file, name = test.split("::")
        assert f"def {name}(" in (ROOT / "tests" / file).read_text(), f"{test} named in the table does not exist"
