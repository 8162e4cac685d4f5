"""A synthetic store for the benchmarks, built once and reused while it holds every trial."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from analysis.synthetic import SyntheticConfig, synthetic_trials, write_synthetic_store


def ensure_store(root: Path, config: SyntheticConfig) -> tuple[Path, float | None, bool]:
    """(the sweep folder `root/<config.name>`, seconds it took to build, reused?).

    The build time is kept beside the store (`<name>.build.json`), so a reused store still
    says what it cost; None when that file is gone."""
    path = root / config.name
    sidecar = root / f"{config.name}.build.json"
    trials = path / "trials"
    if trials.is_dir() and sum(1 for _ in trials.glob("*.parquet")) == len(
        synthetic_trials(config)
    ):
        built = json.loads(sidecar.read_text())["build_s"] if sidecar.exists() else None
        return path, built, True
    if path.exists():
        shutil.rmtree(path)
    t = time.perf_counter()
    write_synthetic_store(root, config)
    build_s = time.perf_counter() - t
    sidecar.write_text(json.dumps({"build_s": build_s}))
    return path, build_s, False
