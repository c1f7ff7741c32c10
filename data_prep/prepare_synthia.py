#!/usr/bin/env python
"""Convert SYNTHIA-RAND-CITYSCAPES labels (GT/LABELS/<id>.png, 16-bit) to train ids and write the class statistics.
Usage: python data_prep/prepare_synthia.py data/synthia [--workers N] [--no-progress]

A thin wrapper around hrda.convert.prepare_cli; see data_prep/README.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from hrda.convert import prepare_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare_cli("synthia"))
