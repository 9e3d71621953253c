"""The options of one ingest, as one validated model shared by the CLI, ``run_ingest`` and pipelines.

Everything here changes what an ingest writes, except ``workers``, ``engine`` and ``count_memory_mib``
(outputs are byte-identical for any worker count, engine or memory budget); the block size is a tuning knob of
:func:`ctr_ad.ingest.run.run_ingest`, not an option.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ctr_ad.strict import StrictModel, validate_model
from ctr_ad.vocabulary import check_caps

SplitMode = Literal["sequential", "random", "files", "time", "days"]


class IngestOptions(StrictModel):
    """How raw logs become splits; see ``ctr-ad ingest --help`` for each option."""

    split: SplitMode = Field("sequential", description="sequential keeps file order (test = latest "
                             "rows); random is seeded; files: one input file per split; time: by the "
                             "declared time column (test = latest times); days: one input file per day "
                             "in day order, train on all but the last day, whose first half (rounded "
                             "up) is test and second half valid, as DLRM/MLPerf split Criteo 1TB's "
                             "day_23 (--valid-frac/--test-frac are then unused)")
    valid_frac: float = Field(0.1, ge=0, lt=1, description="fraction of rows in the valid split")
    test_frac: float = Field(0.1, ge=0, lt=1, description="fraction of rows in the test split")
    min_count: int = Field(2, ge=1, description="categorical values seen fewer times in train map "
                           "to out-of-vocabulary")
    max_vocab: int | dict[str, int] | None = Field(
        None, description="keep at most N values per categorical field (the most frequent; ties: the "
        "smaller value first), the rest map to out-of-vocabulary: N for every field, or per field "
        "FIELD=N,FIELD=N, or a YAML file with max_vocab: {FIELD: N}")
    count_memory_mib: int = Field(16, ge=0, description="memory for the vocabulary counts before "
                                  "they spill to disk, in MiB (0: spill after every block); the outputs "
                                  "are identical for any value")
    seed: int = Field(0, description="seed of the random split")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="fail when more than this fraction "
                                    "of rows is quarantined")
    workers: int = Field(1, ge=1, le=256, description="parallel worker processes; 1 runs the blocks on two "
                         "threads of this process, the fastest on 2 cores (with --engine ray: the local Ray "
                         "instance's CPUs, or the tasks at a time on a cluster; 1 means all CPUs)")
    engine: Literal["local", "ray"] = Field("local", description="where the per-block work runs: local (threads "
                                            "of this process or --workers processes) or ray (Ray tasks on the cluster "
                                            "RAY_ADDRESS names, else a local Ray instance; pip install "
                                            "'ctr-ad[ray]'); the outputs are identical")

    @field_validator("max_vocab", mode="before")
    @classmethod
    def _caps(cls, value: Any) -> Any:
        return check_caps(value)  # one message naming the bad field, not one per union member

    @model_validator(mode="after")
    def _fractions(self) -> IngestOptions:
        if self.valid_frac + self.test_frac >= 1:
            raise ValueError("valid_frac + test_frac must be less than 1")
        return self

    @classmethod
    def of(cls, data: dict[str, Any], origin: str = "ingest options") -> IngestOptions:
        """Validate ``data``; every problem is one UserError line naming the key."""
        return validate_model(cls, data, origin)

    def manifest_options(self) -> dict[str, Any]:
        """The options recorded in manifest.json (those that change the outputs)."""
        return self.model_dump(exclude={"workers", "engine", "count_memory_mib"})
