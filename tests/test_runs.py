"""papermill drives the templates in nbs/runs/: parameters take effect and are documented."""
import json
import shutil
import subprocess

import nbformat
import papermill as pm
import pytest

from conftest import BIN, ROOT

TEMPLATES = sorted((ROOT / "nbs" / "runs").glob("*.ipynb"))


def parameters_cell(path):
    cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name} must have exactly one cell tagged 'parameters'"
    return cells[0]


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_smoke_run(template, tmp_path):
    out = tmp_path / "run"
    pm.execute_notebook(str(template), str(tmp_path / template.name), parameters={"out_dir": str(out)},
                        kernel_name="python3", cwd=str(template.parent), progress_bar=False)
    assert any(out.iterdir()), f"{template.name} wrote nothing into out_dir"


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda p: p.name)
def test_template_parameters_are_typed_and_explained(template):
    params = pm.inspect_notebook(str(template))
    assert "out_dir" in params
    for name, p in params.items():
        assert p["inferred_type_name"] not in (None, "None"), f"{template.name}: parameter {name} has no type"
        assert p["help"], f"{template.name}: parameter {name} has no help comment"


def test_help_notebook_lists_parameters():
    template = ROOT / "nbs" / "runs" / "environment.ipynb"
    res = subprocess.run([str(BIN / "papermill"), "--help-notebook", str(template)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert 'seed: int (default 0)' in res.stdout and "seed of the determinism check" in res.stdout
    assert 'precision: str (default "fp32")' in res.stdout


def test_cli_overrides_take_effect(tmp_path):
    template = ROOT / "nbs" / "runs" / "environment.ipynb"
    cmd = [str(BIN / "papermill"), str(template), str(tmp_path / "out.ipynb"), "-k", "python3", "--no-progress-bar",
           "-p", "out_dir", str(tmp_path / "env"), "-p", "seed", "3", "-p", "matmul_size", "48", "-p", "repeats", "2"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=template.parent)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "env" / "environment.json").read_text())
    assert (record["seed"], record["matmul_size"], record["deterministic"]) == (3, 48, True)


def test_parameters_tag_survives_nbdev_clean(tmp_path):
    shutil.copy2(ROOT / "settings.ini", tmp_path / "settings.ini")
    shutil.copytree(ROOT / "nbs" / "runs", tmp_path / "nbs" / "runs")
    res = subprocess.run([str(BIN / "nbdev_clean")], cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for template in (tmp_path / "nbs" / "runs").glob("*.ipynb"):
        parameters_cell(template)
