"""Shared fixtures and the slow/gpu switches of the test suite."""
import os
import shutil
import sys
from pathlib import Path

# pytest-xdist runs two workers on CI's two cores; one thread each (and in the notebook kernels they start)
# avoids oversubscription, which slows small CPU kernels by orders of magnitude.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="also run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        for flag in ("slow", "gpu"):
            if flag in item.keywords and not config.getoption(f"--run-{flag}"):
                item.add_marker(pytest.mark.skip(reason=f"marked {flag}; run with --run-{flag}"))


@pytest.fixture
def repo_copy(tmp_path):
    "A copy of the repository's sources (settings, notebooks, package, README) in a temporary folder."
    dst = tmp_path / "repo"
    dst.mkdir()
    for name in ("settings.ini", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("nbs", "hrda"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    return dst


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    "A tiny synthetic benchmark: 8 source, 8 target-train and 4 target-val images of 64x128, made once per session."
    from hrda.synth import generate_benchmark, prepare_synth
    root = tmp_path_factory.mktemp("synth")
    generate_benchmark(root, n_source=8, n_target=8, n_val=4, size=(64, 128), seed=0, workers=0)
    prepare_synth(root, workers=0)
    return root
