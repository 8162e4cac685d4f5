"""A search run against a dense store instead of trained: what it would do, in seconds.

The searches choose among the grid's lrs and a trial a search runs is the grid's trial (same
id), so a store holding the whole grid already holds every result a search can ask for. The
replay plans the search's rounds as `sweep run` would and, instead of training each proposed
trial, copies its files from the dense store. On the machine that trained the dense store this
gives exactly the trials and lr*s a real run of the search gives there (training is
deterministic on one machine), without the wall time.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sweeper.search import make_search
from sweeper.spec import expand, parse_spec
from sweeper.store import Store


def replay_search(grid: dict, dense: Path, data_fingerprint: str) -> tuple[Path, int]:
    """Run the search of `grid` (a grid file's content, its `results` the place to write)
    against the sweep folder `dense`. Returns (the search's sweep folder, rounds)."""
    spec = parse_spec(grid)
    store = Store(spec.results, spec.name)
    store.prepare()
    search = make_search(spec, expand(spec, data_fingerprint), store)
    if search is None:
        raise ValueError("the grid has no search")
    rounds = 0
    while trials := search.propose():
        rounds += 1
        for t in trials:
            if not (dense / "trials" / f"{t.trial_id}.parquet").exists():
                raise LookupError(f"{t.optimizer} lr {t.lr:g} (seed {t.seed}) is not in {dense}")
            # steps and coord first, the trials row last: the store's own order of writes
            for table in ("steps", "coord", "trials"):
                src = dense / table / f"{t.trial_id}.parquet"
                if src.exists():
                    (Path(store.path) / table).mkdir(exist_ok=True)
                    shutil.copyfile(src, Path(store.path) / table / src.name)
    return Path(store.path), rounds
