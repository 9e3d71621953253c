"""Vocabulary counting in bounded memory (spilled, hash-partitioned counts) and per-field caps."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from ctr_ad.errors import UserError
from ctr_ad.features import FeatureProcessor
from ctr_ad.ingest.command import parse_max_vocab
from ctr_ad.ingest.reader import read_raw
from ctr_ad.ingest.run import run_ingest
from ctr_ad.schema import CRITEO_CATEGORICAL
from ctr_ad.vocabulary import CategoryCounter

REPO = Path(__file__).resolve().parents[1]
CRITEO = REPO / "data" / "criteo-kaggle-8k"
CRITEO_FILES = [CRITEO / "train.tsv", CRITEO / "dev.tsv", CRITEO / "test.tsv"]
OBD = REPO / "data" / "open-bandit" / "random-all.csv"
OUTPUTS = ("train.parquet", "valid.parquet", "test.parquet", "features.json", "quarantine.jsonl")
SMALL_BLOCKS = 1 << 17  # ~14 blocks for the 8k Criteo rows: many spilled runs to merge


@pytest.fixture(scope="module")
def criteo_train() -> pl.DataFrame:
    frame, quarantined = read_raw([CRITEO / "train.tsv"], "criteo")
    assert quarantined == []
    return frame


def expected_vocab(values: list[str | None], min_count: int, cap: int | None) -> list[str]:
    """The vocabulary rule written out in plain Python: count >= min_count, most frequent first,
    ties by value (ascending), the first ``cap``."""
    counts = Counter(v for v in values if v is not None)
    kept = sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], v))
    return kept[:cap] if cap is not None else kept


def count_blocks(counter: CategoryCounter, frame: pl.DataFrame, rows: int) -> CategoryCounter:
    for start in range(0, frame.height, rows):
        counter.add(frame.slice(start, rows))
    return counter


class SpillSpy:
    """Counts real spills (the real method runs) so a test can prove the spilled path was taken."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = CategoryCounter._spill

        def spill(counter: CategoryCounter) -> None:
            self.calls += 1
            real(counter)

        monkeypatch.setattr(CategoryCounter, "_spill", spill)


# ------------------------------------------------------------------------------ counting
def test_spilled_counts_give_the_in_memory_vocabularies_on_real_rows(criteo_train, tmp_path):
    caps = {"C3": 40, "C12": 7, "C16": 1, "C20": 3}  # C20 has 3 values: a cap at its size changes nothing
    in_memory = count_blocks(CategoryCounter(CRITEO_CATEGORICAL), criteo_train, 500)
    spilled = count_blocks(CategoryCounter(CRITEO_CATEGORICAL, tmp_path / "spill", 0), criteo_train, 500)
    assert in_memory.spilled_runs == 0 and spilled.spilled_runs == 15  # budget 0: one run per block
    for min_count, field_caps in ((1, {}), (2, caps), (5, {})):
        a = in_memory.vocabularies(min_count, field_caps)
        b = spilled.vocabularies(min_count, field_caps)
        assert a == b
        for f in ("C3", "C12", "C16", "C20", "C26"):
            assert a[f] == expected_vocab(criteo_train[f].to_list(), min_count, field_caps.get(f)), f
    assert len(expected_vocab(criteo_train["C3"].to_list(), 2, None)) > 40  # so the cap of 40 really cut


def test_cap_keeps_the_most_frequent_and_breaks_ties_by_value(tmp_path):
    # counts: z 4, b 3, y 3, a 3, c 2, x 1 -> order z, a, b, y, c, x
    values = ["z"] * 4 + ["b", "y", "a"] * 3 + ["c"] * 2 + ["x"]
    frame = pl.DataFrame({"f": values, "g": ["same"] * len(values)})
    for counter in (CategoryCounter(["f", "g"]), CategoryCounter(["f", "g"], tmp_path / "s", 0)):
        count_blocks(counter, frame, 3)
        assert counter.vocabularies(1) == {"f": ["z", "a", "b", "y", "c", "x"], "g": ["same"]}
        assert counter.vocabularies(1, {"f": 2})["f"] == ["z", "a"]  # a, b, y tie at 3: a wins
        assert counter.vocabularies(1, {"f": 3})["f"] == ["z", "a", "b"]
        assert counter.vocabularies(3, {"f": 10})["f"] == ["z", "a", "b", "y"]  # min_count first, then cap
        assert counter.vocabularies(1, {"f": 1, "g": 1}) == {"f": ["z"], "g": ["same"]}
        counter.close()


def test_spill_files_are_removed(criteo_train, tmp_path):
    spill = tmp_path / "spill"
    counter = count_blocks(CategoryCounter(CRITEO_CATEGORICAL, spill, 0), criteo_train, 2000)
    assert sorted(p.name for p in spill.iterdir()) == [f"counts-{r:05d}.arrow" for r in range(4)]
    first = counter.vocabularies(2)
    assert counter.vocabularies(2) == first  # asking twice reads the same runs
    counter.close()
    assert not spill.exists()
    # A processor frees them when its fit is finished.
    spec_fp = FeatureProcessor("criteo", "label", CRITEO_CATEGORICAL, [], "log1p", 2)
    spec_fp._count_spill = (spill, 0)
    for start in range(0, criteo_train.height, 3000):
        spec_fp.partial_fit(criteo_train.slice(start, 3000))
    assert spill.is_dir()
    spec_fp.finish_fit()
    assert not spill.exists() and spec_fp.vocab == first


# ------------------------------------------------------------------------------ ingest
@pytest.mark.parametrize(("inputs", "source", "block_bytes", "kw"), [
    (CRITEO_FILES, "criteo", SMALL_BLOCKS, {"split": "files"}),
    ([OBD], "obd", 1 << 20, {"split": "random", "seed": 3}),  # 5 MB: 5 blocks
    (CRITEO_FILES, "criteo", SMALL_BLOCKS, {"split": "files", "max_vocab": {"C3": 25, "C12": 7, "C20": 3}}),
], ids=["criteo-8k", "open-bandit", "criteo-8k-capped"])
def test_spilled_ingest_is_byte_identical_to_in_memory(inputs, source, block_bytes, kw, tmp_path, monkeypatch,
                                                        criteo_train):
    a = run_ingest(inputs, source, tmp_path / "mem", quiet=True, block_bytes=block_bytes, **kw)
    spy = SpillSpy(monkeypatch)
    b = run_ingest(inputs, source, tmp_path / "spill", quiet=True, block_bytes=block_bytes,
                   count_memory_mib=0, **kw)
    assert spy.calls >= 5  # every block spilled, then the rest before merging
    for name in OUTPUTS:
        assert (tmp_path / "mem" / name).read_bytes() == (tmp_path / "spill" / name).read_bytes(), name
    assert a["fingerprint"] == b["fingerprint"]
    assert a["options"] == b["options"] and "count_memory_mib" not in a["options"]
    caps = kw.get("max_vocab")
    if caps is None:
        assert "max_vocab" not in (tmp_path / "mem" / "features.json").read_text()  # uncapped: no new key
    else:  # the partitioned, capped counts keep the expected top N of the training file
        vocab = FeatureProcessor.load(tmp_path / "spill" / "features.json").vocab
        for f in CRITEO_CATEGORICAL:
            assert vocab[f] == expected_vocab(criteo_train[f].to_list(), 2, caps.get(f)), f
        assert [len(vocab[f]) for f in caps] == [25, 7, 3]
    # Spills (blocks and counts) and staging are gone: the dataset directory holds only its files.
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == sorted([*OUTPUTS, "manifest.json"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "spill"]


def test_capped_ingest_keeps_the_top_n_and_sizes_the_model_tables(criteo_train, tmp_path):
    import torch

    from ctr_ad.config import ModelConfig
    from ctr_ad.model import EnsembleCTR

    caps = {"C3": 25, "C4": 10}
    m = run_ingest(CRITEO_FILES, "criteo", tmp_path / "d", quiet=True, split="files", max_vocab=caps)
    fp = FeatureProcessor.load(tmp_path / "d" / "features.json")
    assert fp.max_vocab == caps and m["options"]["max_vocab"] == caps
    for f in CRITEO_CATEGORICAL:
        assert fp.vocab[f] == expected_vocab(criteo_train[f].to_list(), 2, caps.get(f)), f
    card = dict(zip(CRITEO_CATEGORICAL, m["features"]["cardinalities"], strict=True))
    assert card["C3"] == 25 + 2 and card["C4"] == 10 + 2 and card["C5"] > 12
    train = pl.read_parquet(tmp_path / "d" / "train.parquet")
    assert train["C3"].max() == 26  # indices stay inside the capped table
    # A value seen often enough but past the cap is out-of-vocabulary (index 1), not dropped.
    past_cap = expected_vocab(criteo_train["C3"].to_list(), 2, None)[25]
    rows = criteo_train["C3"] == past_cap
    assert rows.sum() >= 2 and set(train.filter(rows)["C3"].to_list()) == {1}
    # The model's embedding tables follow features.json.
    torch.manual_seed(0)
    model = EnsembleCTR.from_config(ModelConfig(components=1), fp.cardinalities, len(fp.dense_columns))
    assert model.cardinalities == fp.cardinalities
    assert model.embedding.num_embeddings == sum(fp.cardinalities)


def test_cli_caps_every_field_or_per_field_from_yaml(tmp_path):
    caps_file = tmp_path / "caps.yaml"
    caps_file.write_text("max_vocab:\n  C3: 30\n  C12: 5\n")
    for spec, expected in (("20", dict.fromkeys(CRITEO_CATEGORICAL, 20)), (str(caps_file), {"C3": 30, "C12": 5})):
        out = tmp_path / ("all" if spec == "20" else "yaml")
        r = subprocess.run([sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--input",
                            str(CRITEO / "train.tsv"), "--out", str(out), "--max-vocab", spec, "--quiet"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        fp = FeatureProcessor.load(out / "features.json")
        assert fp.max_vocab == expected
        assert all(len(fp.vocab[f]) <= n for f, n in expected.items())
        assert len(fp.vocab["C3"]) == expected["C3"]  # C3 has far more values seen twice in train
        assert len(fp.vocab["C5"]) == (20 if spec == "20" else 31)  # 31 values seen twice in the train split
    assert parse_max_vocab("C3=30, C12=5") == {"C3": 30, "C12": 5} and parse_max_vocab("7") == 7


@pytest.mark.parametrize(("max_vocab", "message"), [
    ({"C99": 10}, "unknown categorical field 'C99'"),
    ({"C3": 0}, "field 'C3': the cap must be a whole number of at least 1 (got 0)"),
    ({"C3": "many"}, "field 'C3': the cap must be"),
    (0, "'max_vocab': Value error, expected a whole number of at least 1"),
])
def test_bad_cap_names_the_field(max_vocab, message, tmp_path):
    with pytest.raises(UserError, match=re.escape(message)):
        run_ingest([CRITEO / "dev.tsv"], "criteo", tmp_path / "d", quiet=True, max_vocab=max_vocab)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("arg", "yaml_text", "message"), [
    ("C3=lots", None, "'C3=lots' is not FIELD=N"),
    ("FILE", "max_vocab: {C3: 10, C77: 5}\n", "unknown categorical field 'C77'"),
])
def test_cli_bad_cap_is_one_line_naming_the_field(arg, yaml_text, message, tmp_path):
    if yaml_text is not None:
        arg = str(tmp_path / "caps.yaml")
        Path(arg).write_text(yaml_text)
    r = subprocess.run([sys.executable, "-m", "ctr_ad.cli", "ingest", "--source", "criteo", "--input",
                        str(CRITEO / "dev.tsv"), "--out", str(tmp_path / "d"), "--max-vocab", arg],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_cap_files_with_a_bad_cap_or_key_are_refused(tmp_path):
    from ctr_ad.ingest.options import IngestOptions

    bad_cap = tmp_path / "bad-cap.yaml"
    bad_cap.write_text("max_vocab: {C5: -1}\n")
    with pytest.raises(UserError, match="field 'C5': the cap must be a whole number of at least 1 \\(got -1\\)"):
        IngestOptions.of({"max_vocab": parse_max_vocab(str(bad_cap))})
    bad_key = tmp_path / "bad-key.yaml"
    bad_key.write_text("max_vocabs: {C5: 10}\n")
    with pytest.raises(UserError, match=r"bad-key\.yaml: expected one key, max_vocab .* got 'max_vocabs'"):
        parse_max_vocab(str(bad_key))



# ------------------------------------------------------------------------------ synthetic profile
def test_criteo1tb_profile_is_seeded_and_has_its_cardinalities():
    from ctr_ad.synthetic import CRITEO_1TB_CARDINALITIES, generate_block

    a = generate_block(7, 0, 10_000, "criteo1tb")
    assert a.equals(generate_block(7, 0, 10_000, "criteo1tb"))
    assert not a.equals(generate_block(8, 0, 10_000, "criteo1tb"))
    default = generate_block(7, 0, 10_000)
    distinct = {f: a[f].drop_nulls().n_unique() for f in CRITEO_CATEGORICAL}
    for f, card in zip(CRITEO_CATEGORICAL, CRITEO_1TB_CARDINALITIES, strict=True):
        assert distinct[f] <= card, f  # never more values than the field has
    # The 40M-value fields add new values at most rows (the default profile's C1 has 1,400 values).
    assert distinct["C1"] > 3_000 and default["C1"].n_unique() <= 1_400
    assert distinct["C6"] == 3 and distinct["C17"] == 4  # the tiny fields are all seen
    with pytest.raises(UserError, match="unknown synthetic profile 'criteo2tb'"):
        generate_block(7, 0, 10, "criteo2tb")


def test_features_file_is_the_indented_json_byte_for_byte(criteo_train):
    """``dumps`` splices the vocabularies in with the C encoder; the file must stay what
    ``json.dumps(indent=1, sort_keys=True)`` writes, or every dataset's fingerprint would change."""
    import json

    fp = FeatureProcessor("criteo", "label", CRITEO_CATEGORICAL, [], "log1p", 2).fit(criteo_train)
    reference = json.dumps(fp.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    assert sum(map(len, fp.vocab.values())) > 1000  # real vocabularies, not a toy
    assert fp.dumps() == reference
    # Quotes, backslashes, control and non-ASCII characters, empty values and an empty vocabulary.
    fp.vocab["C1"] = ['say "hi"', "back\\slash", "tab\tnew\nline", "ü € \u2028", ""]
    fp.vocab["C2"] = []
    assert fp.dumps() == json.dumps(fp.to_dict(), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    assert FeatureProcessor.from_dict(json.loads(fp.dumps())).vocab["C1"][0] == 'say "hi"'
