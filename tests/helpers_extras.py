"""Optional extras in tests: skip with the install command when one is missing, but fail in CI, where
.ci/run installs every extra the tests need (a skipped test there would hide a broken install)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def require_extra(module: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI is set but {module} is not installed: .ci/run must install the [{extra}] extra")
        pytest.skip(f"{module} is not installed (the optional extra: pip install -e '.[{extra}]')",
                    allow_module_level=True)
