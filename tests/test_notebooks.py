"""Every notebook in nbs/ runs top to bottom in a fresh process (nbdev_test), as the docs show it."""
import subprocess

import pytest

from conftest import BIN, ROOT
from hrda.devtools import list_notebooks

NOTEBOOKS = [p.relative_to(ROOT).as_posix() for p in list_notebooks(ROOT)]


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs(notebook):
    res = subprocess.run([str(BIN / "nbdev_test"), "--path", notebook, "--do_print"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, f"nbdev_test --path {notebook} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
