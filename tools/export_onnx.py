#!/usr/bin/env python3
"""Command-line entry point of ``visionattn.train.export_onnx`` (also installed as ``visionattn-export-onnx``); see its docstring."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a clone runs without installing the package
from visionattn.train.export_onnx import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
