"""``ctr-ad export``: a trained bundle in a format other serving stacks read (ONNX).

Writes the graph to ``--out``, ``features.json`` (the feature encoding) and ``<name>.README.md``
(the inputs and outputs) beside it, and prints a JSON summary with the parity check against PyTorch.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="RUN_DIR, RUN_DIR/bundle or a pipeline's published/ directory")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="output format (default onnx)")
    parser.add_argument("--out", required=True, help="the graph file to write, e.g. exported/model.onnx")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.onnx_export import export_onnx

    summary = export_onnx(args.bundle, args.out)
    print(json.dumps(summary))
    return 0
