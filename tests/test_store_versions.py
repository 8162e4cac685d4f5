"""Store versions: a documented history, every earlier version read, older files upgraded in place.

`build_mixed_store` (used by test_store_readers and test_compact too) builds what an upgrade
finds: trials written as version 1 without `grad_accum`, as version 1 with it (the last code that
called itself version 1 wrote it already), and as version 2 with provenance values; the first
file in name order is a version-1 one, which is what makes schema-inferring readers go wrong.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import load_results
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store
from sweeper.store import (
    ADDED_COLUMNS,
    PROVENANCE_COLUMNS,
    STORE_HISTORY,
    STORE_VERSION,
    TABLES,
    TRIALS_SCHEMA,
    Store,
    version_schema,
)

ROOT = Path(__file__).resolve().parents[1]

MIXED = SyntheticConfig(
    name="mixed",
    optimizers={"scion": PlantedOptimizer(0.0, -7.0), "adamw": PlantedOptimizer(-1.0, -7.0)},
    widths=(64, 128),
    seeds=(0, 1),
    log2_lr=(-10.0, -4.0, 1.0),
    steps=40,
    log_every=10,
    eval_every=20,
    diverge_octaves=2.0,
    coord_check=2,
    failed_every=5,
)

# What a version-2 trainer records (sweeper.train.provenance), as test values.
PROVENANCE = {
    "sweeper_version": "0.1.0",
    "torch_version": "2.4.0",
    "ray_version": "2.40.0",
    "python_version": "3.11.7",
    "cpu_model": "Test CPU",
    "gpu_name": None,
    "git_commit": "ab" * 20,
    "git_dirty": False,
}

# Files in name order cycle through these: the first one is a version-1 file.
KINDS = ("v1", "v1+grad_accum", "v2")


def _with(tbl: pa.Table, name: str, values: list) -> pa.Table:
    i = tbl.schema.get_field_index(name)
    return tbl.set_column(i, tbl.schema.field(i), pa.array(values, tbl.schema.field(i).type))


def _as_version(tbl: pa.Table, kind: str) -> pa.Table:
    """The trials file that `kind` of code would have written for these rows."""
    if kind == "v2":
        for name, value in PROVENANCE.items():
            tbl = _with(tbl, name, [value] * len(tbl))
        return tbl
    fields = list(version_schema("trials", 1))
    if kind == "v1+grad_accum":
        at = TRIALS_SCHEMA.get_field_index("grad_accum")
        fields.insert(at, TRIALS_SCHEMA.field("grad_accum"))
    tbl = _with(tbl, "store_version", [1] * len(tbl))
    schema = pa.schema(fields, metadata={"sweeper_store_version": "1"})
    return pa.Table.from_arrays([tbl[f.name] for f in schema], schema=schema)


def full(tbl: pa.Table, schema: pa.Schema = TRIALS_SCHEMA) -> pa.Table:
    """A test's own oracle: `tbl` with every column of `schema`, the missing ones null."""
    return pa.table(
        {
            f.name: tbl[f.name] if f.name in tbl.column_names else pa.nulls(len(tbl), f.type)
            for f in schema
        }
    )


def build_mixed_store(root: Path, config: SyntheticConfig = MIXED) -> tuple[Store, pa.Table]:
    """(the store, the trials table every reader must give, sorted by trial_id)."""
    path = write_synthetic_store(root, config)
    expected = []
    for i, file in enumerate(sorted((path / "trials").glob("*.parquet"))):
        tbl = _as_version(pq.read_table(file), KINDS[i % len(KINDS)])
        pq.write_table(tbl, file)
        expected.append(full(tbl))
    return Store(root, config.name), sort(pa.concat_tables(expected))


def sort(tbl: pa.Table) -> pa.Table:
    keys = [k for k in ("trial_id", "step", "layer_index") if k in tbl.column_names]
    return tbl.sort_by([(k, "ascending") for k in keys])


def frame(tbl: pa.Table) -> pd.DataFrame:
    return sort(tbl).to_pandas()


def assert_same(got: pa.Table, expected: pa.Table) -> None:
    pd.testing.assert_frame_equal(frame(got), frame(expected))


def file_schemas(store: Store, table: str = "trials") -> dict[str, list[str]]:
    return {p.name: pq.read_schema(p).names for p in Path(store.path, table).glob("*.parquet")}


# --------------------------------------------------------------------------- the history


def test_every_version_is_documented_with_the_columns_it_added():
    assert sorted(STORE_HISTORY) == list(range(1, STORE_VERSION + 1))
    assert STORE_VERSION == 2  # grad_accum and provenance came in while the version stayed 1
    assert set(ADDED_COLUMNS) <= set(range(2, STORE_VERSION + 1))
    for version, added in ADDED_COLUMNS.items():
        for table, columns in added.items():
            assert set(columns) <= set(TABLES[table].names)
            assert not set(columns) & set(version_schema(table, version - 1).names)
            assert set(columns) <= set(version_schema(table, version).names)
            for column in columns:
                assert column in STORE_HISTORY[version], (version, column)
    assert {"grad_accum", *PROVENANCE_COLUMNS} == set(ADDED_COLUMNS[2]["trials"])
    assert version_schema("steps", 1).names == TABLES["steps"].names
    with pytest.raises(ValueError, match="1..2"):
        version_schema("trials", 3)


# --------------------------------------------------------------------------- reading


def test_store_read_gives_every_column_of_a_mixed_store(tmp_path):
    store, expected = build_mixed_store(tmp_path)
    kinds = {tuple(names) for names in file_schemas(store).values()}
    assert (
        len(kinds) == 3
        and "grad_accum"
        not in pq.read_schema(min(Path(store.path, "trials").glob("*.parquet"))).names
    )
    got = store.read("trials")
    assert got.schema.names == TRIALS_SCHEMA.names
    assert_same(got, expected)
    kinds = [KINDS[i % len(KINDS)] for i in range(len(expected))]
    by_version = frame(got).groupby("store_version")
    assert by_version["git_commit"].count().to_dict() == {1: 0, 2: kinds.count("v2")}
    assert frame(got)["grad_accum"].isna().sum() == kinds.count("v1")


def test_the_analysis_of_a_mixed_store_is_that_of_the_store_it_came_from(tmp_path):
    original = load_results(write_synthetic_store(tmp_path / "a", MIXED))
    store, _ = build_mixed_store(tmp_path / "b")
    for stage in ("mixed", "upgraded"):
        res = load_results(store.path)
        # (finished_at: the two stores were written a moment apart)
        pd.testing.assert_frame_equal(
            res.trials.drop(columns="finished_at"),
            original.trials.drop(columns="finished_at"),
            obj=stage,
        )
        pd.testing.assert_frame_equal(res.steps, original.steps, obj=stage)
        pd.testing.assert_frame_equal(res.coord, original.coord, obj=stage)
        assert res.varying == original.varying and res.notes == original.notes
        store.prepare()


def test_a_store_that_version_1_wrote_reads_whole():
    # Six trials of a real store written by store version 1 (the quickstart of 2026-11-25).
    store = Store(ROOT / "tests" / "data", "store_v1")
    files = list(Path(store.path, "trials").glob("*.parquet"))
    assert {pq.read_schema(f).metadata[b"sweeper_store_version"] for f in files} == {b"1"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trials = store.read("trials")
    assert len(trials) == 6 and trials.schema.names == TRIALS_SCHEMA.names
    assert set(trials["store_version"].to_pylist()) == {1}
    for column in PROVENANCE_COLUMNS:
        assert trials[column].null_count == len(trials)
    assert len(load_results(store.path).trials) == 6


# --------------------------------------------------------------------------- upgrading


def test_prepare_upgrades_older_files_in_place_keeping_every_value(tmp_path):
    store, expected = build_mixed_store(tmp_path)
    steps_before = store.read("steps")
    store.prepare()
    assert set(map(tuple, file_schemas(store).values())) == {tuple(TRIALS_SCHEMA.names)}
    assert_same(store.read("trials"), expected)  # store_version 1 kept: it says who wrote the row
    assert_same(store.read("steps"), steps_before)
    assert not list(Path(store.path, ".incoming").iterdir())
    # plain readers, without any option, now see every column
    plain = pd.read_parquet(Path(store.path, "trials"))
    assert list(plain.columns) == TRIALS_SCHEMA.names and len(plain) == len(expected)
    assert store.maintain().upgraded == 0  # once only


def test_upgrade_leaves_damaged_foreign_and_newer_files_alone(tmp_path):
    store, _ = build_mixed_store(tmp_path)
    trials = Path(store.path, "trials")
    old = sorted(trials.glob("*.parquet"))
    old[0].write_bytes(old[0].read_bytes()[:100])  # damaged
    newer = _with(pq.read_table(old[3]), "store_version", [3])
    newer = newer.append_column("from_the_future", pa.array([1.0]))
    pq.write_table(newer, old[3])  # an unknown column: written by a later version
    foreign = Path(store.path, "steps", "notes.parquet")
    pq.write_table(pa.table({"x": [1]}), foreign)
    before = {p: p.read_bytes() for p in (old[0], old[3], foreign)}
    older = sum(1 for i in range(len(old)) if KINDS[i % len(KINDS)] != "v2")
    assert store.maintain().upgraded == older - 2
    assert {p: p.read_bytes() for p in before} == before


def test_a_failed_upgrade_is_one_store_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    from sweeper.store import StoreError

    store, expected = build_mixed_store(tmp_path)
    before = {p.name: p.read_bytes() for p in Path(store.path, "trials").iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(StoreError, match="No space left on device"):
        store.prepare()
    assert {p.name: p.read_bytes() for p in Path(store.path, "trials").iterdir()} == before
    monkeypatch.undo()
    store.prepare()
    assert_same(store.read("trials"), expected)
