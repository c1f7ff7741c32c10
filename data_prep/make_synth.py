#!/usr/bin/env python
"""Write the embedded synthetic benchmark (GTA-format source, Cityscapes-format target) and convert its labels.
Usage: python data_prep/make_synth.py data/synth [--seed 0] [--n-source 300] [--n-target 300] [--n-val 60]
                                      [--height 256] [--width 512] [--workers N] [--no-prepare]

A thin wrapper around hrda.synth.synth_cli (nbs/01c_synth.ipynb). Re-running skips the files already written.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from hrda.synth import synth_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(synth_cli())
