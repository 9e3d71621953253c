"""Run several ``ctr-ad train`` commands in one ``torchrun`` launch (tests/test_component_parallel.py).

Starting torchrun's processes costs seconds each on a small machine; one launch trains every config
of the test in turn, through the real CLI entry point, in the one process group.

    torchrun --nproc_per_node N tests/component_parallel_driver.py RUNS.json

RUNS.json: a list of argument lists for ``ctr_ad.cli.main`` (``["train", "--data", ...]``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ctr_ad.cli import main

if __name__ == "__main__":
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        code = main(argv)
        if code:
            sys.exit(code)
