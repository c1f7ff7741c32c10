#!/usr/bin/env python
"""Train every (run, seed) of experiment grids, skipping finished runs (hrda.grid, nbs/06b_grid.ipynb).
Usage: python experiments/run_grid.py experiments/grid_ablations.yaml [--seeds 0 1 2] [--only ID ...]
                                      [--launcher papermill|hrda] [--nproc N] [--dry-run]
       python experiments/run_grid.py experiments/synth_hrda.yaml --seeds 0 1 2   (a plain experiment: one run)
Run folders: reports/<grid>/<id>/s<seed> (plain experiments: reports/<experiment>/s<seed>).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from hrda.grid import grid_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(grid_cli())
