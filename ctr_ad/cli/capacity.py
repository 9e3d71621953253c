"""``ctr-ad capacity``: a model's parameter count on ingested data, and K' components sized to match it.

Prints one JSON object: the config's ensemble (components, parameters), the equal-budget ensemble of
``--components`` (its embedding dimension, MLP widths, parameters and their ratio to the original) and
the experiment arm that trains it, ready to paste into an experiment config's ``arms``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctr_ad.cli.train import add_override_argument
from ctr_ad.config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="directory written by `ctr-ad ingest`")
    parser.add_argument("--config", help="training YAML config (default: built-in defaults)")
    add_override_argument(parser, "--set model.components=4")
    parser.add_argument("--components", type=int, required=True, help="K' of the equal-budget ensemble")


def run(args: argparse.Namespace) -> int:
    from ctr_ad.capacity import equal_budget, parameter_count
    from ctr_ad.dataset import verify_data_dir
    from ctr_ad.features import FeatureProcessor
    from ctr_ad.layout import DataDir

    verify_data_dir(args.data)
    features = FeatureProcessor.load(DataDir(args.data).features)
    cards, fields, n_dense = features.cardinalities, features.categorical_columns, len(features.dense_columns)
    base = load_config(args.config, args.overrides).model
    narrow = equal_budget(base, args.components, len(cards), n_dense)
    before, after = parameter_count(base, cards, n_dense, fields), parameter_count(narrow, cards, n_dense, fields)
    overrides = {
        "model.components": narrow.components,
        "model.embedding_dim": narrow.embedding_dim,
        "model.mlp": narrow.mlp,
    }
    mapping = json.dumps(overrides).replace('"', "")  # a YAML flow mapping: {model.components: 8, ...}
    arm = f"{{name: k{narrow.components}-narrow, role: recipe, set: {mapping}}}"
    print(
        json.dumps(
            {
                "data": str(args.data),
                "base": {
                    "components": base.components,
                    "embedding_dim": base.embedding_dim,
                    "mlp": base.mlp,
                    "parameters": before,
                },
                "equal_budget": {
                    "components": narrow.components,
                    "embedding_dim": narrow.embedding_dim,
                    "mlp": narrow.mlp,
                    "parameters": after,
                    "ratio": round(after / before, 4),
                },
                "arm": arm,
            }
        )
    )
    return 0
