"""Every reader sees every column of every trial, once: Store.read, the analysis, and the README's
examples for pandas, pyarrow, polars and DuckDB, on stores that mix versions, before and after an
upgrade, compacted or not, with temporary and half-written files in `.incoming/`.
"""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_store_versions import MIXED, _as_version, build_mixed_store, full

from analysis import load_results
from sweeper.compact import compact
from sweeper.store import PROVENANCE_COLUMNS, STEPS_SCHEMA, TRIALS_SCHEMA, Store

ROOT = Path(__file__).resolve().parents[1]

# The README's reader examples ("The store"), verbatim. Until the README holds them, the test
# runs this copy; then FROM_README = True makes it run the README's own block instead.
FROM_README = True
README_READERS = """\
import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds

from sweeper.store import TABLES, Store

trials = pd.read_parquet("results/quickstart/trials", schema=TABLES["trials"])
steps = ds.dataset("results/quickstart/steps", schema=TABLES["steps"]).to_table()
trials_pl = pl.scan_parquet(
    "results/quickstart/trials/*.parquet",
    schema=pl.from_arrow(TABLES["trials"].empty_table()).schema,
    missing_columns="insert",
).collect()
best = duckdb.sql(
    "select optimizer, width, min(final_val_loss) as best_loss "
    "from read_parquet('results/quickstart/trials/*.parquet', union_by_name = true) "
    "group by all order by all"
).df()
same = Store("results", "quickstart").read("trials")  # what `sweep report` reads
"""

# The same readers without any option: right only when every file has one schema.
PLAIN_READERS = """\
import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds

trials = pd.read_parquet("results/quickstart/trials")
steps = ds.dataset("results/quickstart/steps").to_table()
trials_pl = pl.read_parquet("results/quickstart/trials/*.parquet")
best = duckdb.sql(
    "select optimizer, width, min(final_val_loss) as best_loss "
    "from 'results/quickstart/trials/*.parquet' group by all order by all"
).df()
"""


def readme_block() -> str:
    """The first Python block of the README's "The store" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## The store\n") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```", start)]


def readers() -> str:
    return readme_block() if FROM_README else README_READERS


def run(code: str) -> dict:
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    return namespace


def canon(df: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by trial, values as plain Python objects (None for every kind of null), so
    that frames from different readers (numpy, nullable, Arrow dtypes) compare by value."""
    df = df.sort_values(list(df.columns[:1])).reset_index(drop=True)
    out = {}
    for column in df.columns:
        values = df[column].astype(object)
        out[column] = [None if pd.isna(v) else v for v in values]
    return pd.DataFrame(out)


def assert_sees_every_trial_and_column(ns: dict, store: Store, expected: pa.Table) -> None:
    want = canon(expected.to_pandas())
    for name in ("trials", "trials_pl", "same"):
        got = ns[name]
        got = got.to_pandas() if not isinstance(got, pd.DataFrame) else got
        assert list(got.columns) == TRIALS_SCHEMA.names, name
        pd.testing.assert_frame_equal(canon(got), want, check_dtype=False, obj=name)
    steps = ns["steps"]
    assert steps.schema.names == STEPS_SCHEMA.names
    pd.testing.assert_frame_equal(
        canon(steps.to_pandas().sort_values(["trial_id", "step"], kind="stable")),
        canon(store.read("steps").to_pandas().sort_values(["trial_id", "step"], kind="stable")),
    )
    best = expected.to_pandas().groupby(["optimizer", "width"], as_index=False)
    best = best["final_val_loss"].min().rename(columns={"final_val_loss": "best_loss"})
    pd.testing.assert_frame_equal(
        ns["best"].reset_index(drop=True), best, check_dtype=False, obj="duckdb"
    )
    res = load_results(store.path)
    assert len(res.trials) == len(expected) and res.trials["trial_id"].is_unique


@pytest.fixture
def mixed(tmp_path, monkeypatch) -> tuple[Store, pa.Table]:
    """A mixed-version store at results/quickstart, with `.incoming/` as a crash leaves it: a
    torn temporary file, a whole one, and a compaction that stopped before its commit."""
    store, expected = build_mixed_store(
        tmp_path / "results", dataclasses.replace(MIXED, name="quickstart")
    )
    incoming = Path(store.path, ".incoming")
    incoming.mkdir(exist_ok=True)
    (incoming / f".tmp-{uuid.uuid4().hex}.parquet").write_bytes(b"PAR1 torn")
    pq.write_table(store.read("trials"), incoming / f".tmp-{uuid.uuid4().hex}.parquet")
    staged = incoming / f"compact-{uuid.uuid4().hex}"
    staged.mkdir()
    pq.write_table(store.read("steps"), staged / "steps.parquet")
    (staged / "trials.parquet").write_bytes(b"PAR1 half-written")
    monkeypatch.chdir(tmp_path)
    return store, expected


def test_readme_readers_see_every_column_of_a_mixed_store(mixed):
    store, expected = mixed
    assert_sees_every_trial_and_column(run(readers()), store, expected)


def test_after_an_upgrade_readers_need_no_options(mixed):
    store, expected = mixed
    with store.lock():
        store.prepare()
    assert not list(Path(store.path, ".incoming").iterdir())
    for code in (readers(), PLAIN_READERS):
        ns = run(code)
        ns["same"] = store.read("trials")
        assert_sees_every_trial_and_column(ns, store, expected)


def test_readme_readers_on_a_compacted_store_beside_older_files(mixed):
    """Compacted parts, then own files that an older sweeper wrote since (failed trials)."""
    store, expected = mixed
    result = compact(store)
    assert result.trials_merged and result.trials_left
    own = sorted(Path(store.path, "trials").glob("[0-9a-f]*.parquet"))
    assert own and any(p.name.startswith("part-") for p in Path(store.path, "trials").iterdir())
    downgraded = []
    for file in own:
        tbl = _as_version(pq.read_table(file), "v1")
        pq.write_table(tbl, file)
        downgraded.append(tbl["trial_id"][0].as_py())
    expected = expected.to_pandas()
    is_old = expected["trial_id"].isin(downgraded)
    for column in ("grad_accum", *PROVENANCE_COLUMNS):
        expected.loc[is_old, column] = None
    expected.loc[is_old, "store_version"] = 1
    expected = full(pa.Table.from_pandas(expected, schema=TRIALS_SCHEMA, preserve_index=False))
    assert_sees_every_trial_and_column(run(readers()), store, expected)


def test_prepare_removes_old_temporary_files_that_duckdb_and_polars_would_read(mixed):
    """Before version 2 temporary files were written beside the tables; pandas and pyarrow skip
    dot-files but the DuckDB and polars globs do not."""
    import duckdb

    store, expected = mixed
    with store.lock():
        store.prepare()
    torn = Path(store.path, "trials", f".tmp-{uuid.uuid4().hex}.parquet")
    torn.write_bytes(b"PAR1 torn")
    with pytest.raises(duckdb.Error):
        duckdb.sql("select count(*) from 'results/quickstart/trials/*.parquet'").fetchall()
    with store.lock():
        store.prepare()
    assert not torn.exists()
    assert_sees_every_trial_and_column(run(readers()), store, expected)
