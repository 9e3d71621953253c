"""One style for every config file: strict pydantic models read from YAML, errors naming the key.

Training configs, experiment and pipeline files, ingest options and the service's API models all
derive from :class:`StrictModel`, so an unknown key (a typo such as ``embeding_dim``) is an error that
names it, never a silently ignored setting. :func:`load_yaml_mapping` + :func:`validate_model` turn a
file into a model and every problem into one :class:`~ctr_ad.errors.UserError` line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ctr_ad.errors import UserError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Unknown keys are errors; fields may be given by name or by alias (``lambda`` / ``lam``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming every bad key of a pydantic validation error (unknown keys included)."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {err['msg']} (got {err.get('input')!r})")
    return "; ".join(parts)


def load_yaml_mapping(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The top-level mapping of a YAML file (an empty file is ``{}``); UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data


def validate_model(model: type[M], data: Any, origin: str) -> M:
    """``model.model_validate(data)`` with a UserError that names ``origin`` and every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserError(f"{origin}: {describe_validation_error(exc)}") from None


def load_model(model: type[M], path: str | Path, what: str = "config") -> M:
    """Read and validate a YAML file in one call."""
    return validate_model(model, load_yaml_mapping(path, what), str(path))
