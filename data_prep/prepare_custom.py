#!/usr/bin/env python
"""Prepare a dataset of your own (images, label PNGs of ids and a YAML mapping of label value to train id).
Usage: python data_prep/prepare_custom.py IMAGES_DIR LABELS_DIR MAPPING.yaml OUT_ROOT [--ignore-unknown] [--copy-images]

A thin wrapper around hrda.convert.prepare_cli; see data_prep/README.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # also runs from a clone without `pip install -e .`

from hrda.convert import prepare_cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(prepare_cli("custom"))
