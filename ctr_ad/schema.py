"""Field specifications of every supported click-log source.

A :class:`SourceSpec` says how a raw file is laid out (separator, header, column order) and which
columns are the label, the dense (numeric) features and the categorical features. Everything
downstream (ingest, batch predict, the service) reads raw data through these specs, so a field name
means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))


@dataclass(frozen=True)
class SourceSpec:
    """How one raw log format is laid out and which of its columns are features."""

    name: str
    separator: str
    #: "none": no header line, columns in ``columns`` order; "required": first line names the
    #: columns; "optional": a first line equal to the header is skipped (Avazu parts).
    header: str
    #: Column order of a headerless file (and the canonical names a header is matched against).
    columns: tuple[str, ...]
    label: str | None
    dense: tuple[str, ...]
    categorical: tuple[str, ...]
    #: Columns read but not used as features (ids, timestamps, propensities).
    ignored: tuple[str, ...] = ()
    #: Header aliases (lower-case) -> canonical column name.
    aliases: dict[str, str] = field(default_factory=dict)
    #: Fewest fields a headerless line may have: Criteo files in the wild strip trailing empty fields.
    min_fields: int | None = None
    #: Dense values must be integers (Criteo's I1..I13); "260.0" is accepted when ``float_ints``.
    integer_dense: bool = False
    float_ints: bool = False
    #: Dense transform: "log1p" (clip negatives to 0, then log1p) or "standard" (identity then z-score).
    dense_transform: str = "log1p"
    #: Header columns starting with this prefix are dense features too (Open Bandit's affinities).
    dense_prefix: str | None = None
    #: The declared schema (``ctr_ad.table_schema.TableSchema``) a ``table`` spec was compiled from.
    table: Any = None

    @property
    def features(self) -> tuple[str, ...]:
        return self.dense + self.categorical


CRITEO = SourceSpec(
    name="criteo",
    separator="\t",
    header="none",
    columns=("label", *CRITEO_DENSE, *CRITEO_CATEGORICAL),
    label="label",
    dense=CRITEO_DENSE,
    categorical=CRITEO_CATEGORICAL,
    # Real Criteo files are seen with trailing empty fields stripped (37 or 38 fields instead of 40).
    # We accept any line that keeps at least the label, the 13 integers and the first categorical.
    min_fields=15,
    integer_dense=True,
)

CRITEO_CSV = SourceSpec(
    name="criteo-csv",
    separator=",",
    header="required",
    columns=("label", *CRITEO_DENSE, *CRITEO_CATEGORICAL),
    label="label",
    dense=CRITEO_DENSE,
    categorical=CRITEO_CATEGORICAL,
    ignored=("Id",),
    aliases={"label": "label", "id": "Id", "clicked": "label"},
    integer_dense=True,
    float_ints=True,
)

AVAZU_COLUMNS = (
    "id", "click", "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)  # fmt: skip

AVAZU = SourceSpec(
    name="avazu",
    separator=",",
    header="optional",
    columns=AVAZU_COLUMNS,
    label="click",
    dense=(),
    # Every Avazu field is an ID, including the integer-coded C14..C21; `hour` (YYMMDDHH) is kept
    # as a category: the sample spans one hour, and a full log would rather use hour-of-day.
    categorical=tuple(c for c in AVAZU_COLUMNS if c not in ("id", "click")),
    ignored=("id",),
)

OBD_USER = ("user_feature_0", "user_feature_1", "user_feature_2", "user_feature_3")

OBD = SourceSpec(
    name="obd",
    separator=",",
    header="required",
    # The affinity columns vary with the campaign (all/men/women): they are taken from the header.
    columns=("", "timestamp", "item_id", "position", "click", "propensity_score", *OBD_USER),
    label="click",
    dense=(),
    categorical=("item_id", "position", *OBD_USER),
    ignored=("", "timestamp", "propensity_score"),
    dense_transform="standard",
    dense_prefix="user-item_affinity_",
)

SOURCES: dict[str, SourceSpec] = {
    "criteo": CRITEO,
    "criteo-csv": CRITEO_CSV,
    "avazu": AVAZU,
    "obd": OBD,
    # The synthetic generator writes Criteo TSV.
    "synthetic": CRITEO,
}


#: A user's own log, read by the schema it declares (``--source table --schema FILE``).
TABLE = "table"


def get_source(name: str) -> SourceSpec:
    try:
        return SOURCES[name]
    except KeyError:
        if name == TABLE:
            raise ValueError("source 'table' needs a declared schema (--schema FILE)") from None
        raise ValueError(f"unknown source {name!r}; choose one of {', '.join(sorted(SOURCES))}") from None
