"""Declared schemas of users' own click logs (``ctr-ad ingest --source table --schema FILE``).

A :class:`TableSchema` says which column of a CSV, TSV or Parquet log is the label and how to read
it, which columns are categorical or numeric features, which one (optional) orders the rows in time,
and which ones to ignore. It compiles to a :class:`~ctr_ad.schema.SourceSpec`, the structure that
describes the built-in sources too, so a declared log goes through the same reader, validation,
quarantine, counting and writing as Criteo. The schema is stored in ``features.json`` and
``manifest.json``: ``ctr-ad predict`` and the service read a bundle's logs and requests with it, and
instances are keyed by the log's own column names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from ctr_ad.schema import SourceSpec
from ctr_ad.strict import StrictModel, load_yaml_mapping, validate_model

TABLE_SOURCE = "table"
#: Names the reader and the model-ready frames use for their own columns.
RESERVED_NAMES = frozenset({"label"})
RESERVED_PREFIX = "_"
MISSING_SUFFIX = "__missing"


class LabelSpec(StrictModel):
    """The label column and how its values become 0/1."""

    column: str = Field(min_length=1, description="the column holding the click outcome")
    reading: Literal["binary", "boolean", "threshold", "values"] = Field(
        "binary", description="binary: 0/1 (also 0.0/1.0); boolean: true/false (any case); threshold: "
        "a number, 1 when >= threshold; values: the strings listed in positive/negative")
    threshold: float | None = Field(None, description="reading threshold: values >= this are clicks")
    positive: list[str] | None = Field(None, description="reading values: strings meaning a click")
    negative: list[str] | None = Field(None, description="reading values: strings meaning no click")

    @model_validator(mode="after")
    def _reading_keys(self) -> LabelSpec:
        if (self.reading == "threshold") != (self.threshold is not None):
            raise ValueError("'threshold' is needed with reading: threshold, and only with it")
        listed = self.positive is not None or self.negative is not None
        if self.reading == "values":
            if not self.positive or not self.negative:
                raise ValueError("reading: values needs non-empty 'positive' and 'negative' lists")
            both = sorted(set(self.positive) & set(self.negative))
            if both:
                raise ValueError(f"value(s) {both} are listed as both positive and negative")
        elif listed:
            raise ValueError("'positive'/'negative' are only read with reading: values")
        return self


class TimeSpec(StrictModel):
    """The column that orders rows in time (for ``--split time``)."""

    column: str = Field(min_length=1)
    format: str | None = Field(None, description="strftime format (e.g. '%Y%m%d%H'); omitted: a number "
                               "(epoch seconds or any increasing number) or an ISO-8601 date-time")


class TableSchema(StrictModel):
    """A user's click log: see docs/ingest-your-own-log.md."""

    format: Literal["auto", "csv", "tsv", "parquet"] = Field(
        "auto", description="auto: Parquet by its magic bytes, else TSV for *.tsv[.gz]/*.tab, else CSV")
    separator: str | None = Field(None, min_length=1, max_length=1,
                                  description="field separator of a text log (overrides format)")
    header: bool | Literal["auto"] = Field(
        True, description="true: the first line names the columns; false: no header (columns: gives the "
        "order); auto: a first line equal to the declared columns is a header")
    columns: list[str] | None = Field(None, description="every column of the log, in file order "
                                      "(needed without a header)")
    label: LabelSpec
    categorical: list[str] = Field(default_factory=list)
    numeric: list[str] = Field(default_factory=list)
    numeric_prefix: str | None = Field(None, min_length=1,
                                       description="header columns starting with this are numeric too")
    numeric_transform: Literal["standard", "log1p"] = Field(
        "standard", description="standard: z-score; log1p: clip negatives to 0, log1p, then z-score")
    time: TimeSpec | None = None
    ignore: list[str] = Field(default_factory=list, description="columns read but not used")
    other_columns: Literal["error", "ignore"] = Field(
        "error", description="a header column the schema does not name: an error, or ignored")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        # `label: clicked` and `time: ts` are accepted for {column: ...}.
        if isinstance(data, dict):
            data = dict(data)
            for key in ("label", "time"):
                if isinstance(data.get(key), str):
                    data[key] = {"column": data[key]}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TableSchema:
        if not self.categorical and not self.numeric and not self.numeric_prefix:
            raise ValueError("declare at least one feature in 'categorical' or 'numeric'")
        roles = [("label", [self.label.column]), ("categorical", self.categorical), ("numeric", self.numeric),
                 ("time", [self.time.column] if self.time else []), ("ignore", self.ignore)]
        seen: dict[str, str] = {}
        for role, names in roles:
            for name in names:
                if name in seen:
                    raise ValueError(f"column {name!r} is listed twice ({seen[name]} and {role})")
                seen[name] = role
        for name in [*self.categorical, *self.numeric]:
            if name in RESERVED_NAMES or name.startswith(RESERVED_PREFIX) or name.endswith(MISSING_SUFFIX):
                raise ValueError(f"feature name {name!r} is reserved (no 'label', no leading '_', no "
                                 f"'{MISSING_SUFFIX}' suffix); rename the column")
        for role, name in (("label", self.label.column), ("time", self.time.column if self.time else "")):
            if name.startswith(RESERVED_PREFIX):  # the reader's own columns start with '_'
                raise ValueError(f"{role} column {name!r}: names starting with '_' are reserved")
        if self.header is not True and not self.columns:
            raise ValueError(f"header: {self.header} needs 'columns' (the file's columns in order)")
        if self.columns is not None:
            if len(set(self.columns)) != len(self.columns):
                raise ValueError("'columns' has duplicate names")
            unknown = [n for n in seen if n not in self.columns]
            if unknown:
                raise ValueError(f"column(s) {unknown} are not in 'columns'")
            undeclared = [c for c in self.columns if c not in seen and not self._prefixed(c)]
            if undeclared and self.other_columns == "error":
                raise ValueError(f"column(s) {undeclared} have no role; add them to 'ignore'")
        if self.numeric_prefix and self.header is False:
            raise ValueError("numeric_prefix needs a header (the columns are found by name)")
        return self

    def _prefixed(self, name: str) -> bool:
        return bool(self.numeric_prefix) and name.startswith(self.numeric_prefix or "")

    @property
    def text_separator(self) -> str | None:
        """The separator fixed by the schema, or None (chosen per file by its name)."""
        if self.separator:
            return self.separator
        return {"csv": ",", "tsv": "\t"}.get(self.format)

    def to_spec(self) -> SourceSpec:
        """The SourceSpec this schema compiles to (separator resolved per file by the reader)."""
        header = {True: "required", False: "none", "auto": "optional"}[self.header]
        return SourceSpec(
            name=TABLE_SOURCE,
            separator=self.text_separator or ",",
            header=header,
            columns=tuple(self.columns or ()),
            label=self.label.column,
            dense=tuple(self.numeric),
            categorical=tuple(self.categorical),
            ignored=tuple(self.ignore),
            dense_transform="log1p" if self.numeric_transform == "log1p" else "standard",
            dense_prefix=self.numeric_prefix,
            table=self,
        )

    def document(self) -> dict[str, Any]:
        """The schema as stored in features.json and manifest.json (defaults written out)."""
        return self.model_dump(mode="json")

    @classmethod
    def of(cls, data: dict[str, Any], origin: str = "schema") -> TableSchema:
        """Validate ``data``; every problem is one UserError line naming the key."""
        return validate_model(cls, data, origin)

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TableSchema:
        """Read a schema file, with ``overrides`` (from command-line flags) replacing its keys."""
        data = load_yaml_mapping(path, "schema file") if path is not None else {}
        return cls.of({**data, **(overrides or {})}, origin=str(path) if path is not None else "schema flags")
