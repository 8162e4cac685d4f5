"""Calibration of the transfer search on synthetic stores with a known answer.

    .venv/bin/python benchmarks/search_calibration.py [--families N] [--quick] [--work DIR]

The scenarios are calibration.py's planted families (asymmetric loss-vs-lr curves, divergence
cliffs, seed offsets shared across lrs and widths, the optimum anywhere between grid points;
widths 64..512; see calibration.py's docstring), 3 seeds, on a half-octave and a one-octave
grid, with true width slopes 0 and -1. For each, the dense store is written as calibration.py
writes it; the transfer search is replayed against it (benchmarks/replay.py: every trial it
proposes is the dense store's, copied instead of trained) with each target_ci; every store is
reported by the real CLI (`sweep report STORE -o OUT`) and scored against the planted truth
with calibration.py's scoring.

Records per scenario and search: its share of the dense trials; lr* error against the truth and
interval coverage, beside the dense grid's; each cell's distance from the dense grid's lr*
(median, 90th percentile, worst, share within 0.25 octave); slope coverage and verdicts, and
how often the verdict is the dense grid's. Writes benchmarks/results/search_calibration.json
and .md (with --quick: search_calibration-quick.*).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration as cal  # noqa: E402
from machine import machine  # noqa: E402
from replay import replay_search  # noqa: E402

SCENARIOS = tuple(cal.Scenario(step, 3, slope) for step in (0.5, 1.0) for slope in (0.0, -1.0))
TARGETS = (1.0, 0.5, 0.25)  # target_ci of the searches; 1.0: no cell goes past the first level
TRIALS_PER_CELL = 12
NEAR = 0.25  # octaves: "within" the dense grid's lr*


def report(store: Path, out: Path) -> dict:
    proc = subprocess.run(
        [str(cal.SWEEP), "report", str(store), "-o", str(out)],
        capture_output=True,
        text=True,
        env=cal._report_env(None),
    )
    if proc.returncode:
        raise SystemExit(f"sweep report {store}: {proc.stderr or proc.stdout}")
    return json.loads((out / "fits.json").read_text())


def score(fits: dict, by_wd: dict) -> dict[str, Any]:
    cells = cal.score_cells(fits.get("optima") or [], by_wd)
    families = cal.score_families(fits.get("width_transfer") or [], by_wd)
    return {"cells": cells, "families": families}


def compare(search: dict, dense: dict) -> dict[str, Any]:
    """The search's cells and verdicts against the dense grid's, cell by cell."""
    key = lambda c: (c["family"], c["width"])  # noqa: E731
    dense_cells = {key(c): c for c in dense["cells"]["cells"]}
    dist = [
        abs(c["estimate"] - d["estimate"])
        for c in search["cells"]["cells"]
        if (d := dense_cells.get(key(c)))
        and c["estimate"] is not None
        and d["estimate"] is not None
    ]
    dense_verdicts = {f["family"]: f["verdict"] for f in dense["families"]["families"]}
    same = [f["verdict"] == dense_verdicts.get(f["family"]) for f in search["families"]["families"]]
    return {
        "n_cells": len(dist),
        "median": float(np.median(dist)) if dist else None,
        "p90": float(np.quantile(dist, 0.9)) if dist else None,
        "worst": float(max(dist)) if dist else None,
        "within": float(np.mean(np.array(dist) <= NEAR + 1e-9)) if dist else None,
        "same_verdict": float(np.mean(same)) if same else None,
    }


def run_scenario(sc: cal.Scenario, index: int, n_families: int, work: Path) -> dict[str, Any]:
    families = [cal.make_family(sc, i, index) for i in range(n_families)]
    by_wd = {f.weight_decay: f for f in families}
    name = sc.name.replace("+", "p").replace(".", "_")
    root = work / name
    t0 = time.perf_counter()
    dense_path = cal.write_store(root, sc, families, name, rng_seed=index)
    dense_trials = sum(1 for _ in (dense_path / "trials").glob("*.parquet"))
    dense = score(report(dense_path, root / "report-dense"), by_wd)
    record: dict[str, Any] = {
        "scenario": sc.name,
        "step": sc.step,
        "seeds": sc.seeds,
        "slope": sc.slope,
        "grid_log2": list(cal.grid_log2(sc)),
        "n_families": n_families,
        "dense": {"trials": dense_trials, **_summary(dense)},
        "searches": [],
    }
    for target in TARGETS:
        grid = cal.grid_dict(sc, families, f"{name}-search-{target:g}")
        grid["results"] = str(root)
        grid["search"] = {
            "method": "transfer",
            "trials_per_cell": TRIALS_PER_CELL,
            "target_ci": target,
        }
        path, rounds = replay_search(grid, dense_path, "synthetic")
        found = score(report(path, root / f"report-{target:g}"), by_wd)
        record["searches"].append(
            {
                "target_ci": target,
                "trials": sum(1 for _ in (path / "trials").glob("*.parquet")),
                "rounds": rounds,
                **_summary(found),
                "vs_dense": compare(found, dense),
            }
        )
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _summary(scored: dict) -> dict[str, Any]:
    c, f = scored["cells"], scored["families"]
    return {
        "mae": c["mae"],
        "bias": c["bias"],
        "coverage": c["coverage"],
        "ci_null": c["null_share"],
        "ci_width": c["mean_ci_width"],
        "status": c["status"],
        "slope_coverage": f["slope_coverage"],
        "slope_mae": f["slope_mae"],
        "verdicts": f["verdict_share"],
        "per_cell": c["cells"],
        "per_family": f["families"],
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Calibration of the transfer search on synthetic stores",
        "",
        f"`.venv/bin/python benchmarks/search_calibration.py --families {result['families']}` "
        f"on {m['date']} ({m['cpu']}, {m['cores']} cores): {result['seconds']} s in all.",
        "",
        "calibration.py's planted families (asymmetric curves, divergence cliffs 2-3 octaves "
        "above the optimum, seed offsets shared across lrs and widths; widths 64, 128, 256, "
        "512; 3 seeds), each scenario's dense grid spanning about 4 octaves either side of "
        "every optimum. The transfer search (trials_per_cell "
        f"{TRIALS_PER_CELL}) is replayed on each dense store (its trials are the dense "
        "store's); every store is scored through `sweep report`. lr* MAE and coverage are "
        "against the planted truth; 'from dense' is each cell's distance from the dense grid's "
        f"lr*; 'within' is the share of cells within {NEAR} octave of it; 'same verdict' is "
        "the share of families whose width-transfer verdict is the dense grid's.",
        "",
        "| grid step | true slope | run | trials | share | lr* MAE | CI cover | CI null | "
        "CI width | from dense: median / p90 / worst | within | slope cover | "
        "transfers / drifts / inconclusive | same verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["scenarios"]:
        d = r["dense"]
        runs = [("dense grid", d, None)] + [
            (f"search, target_ci {s['target_ci']:g}", s, s["vs_dense"]) for s in r["searches"]
        ]
        for label, s, vs in runs:
            v = s["verdicts"]
            lines.append(
                f"| {r['step']:g} | {r['slope']:+g} | {label} | {s['trials']} | "
                f"{s['trials'] / d['trials']:.0%} | {_num(s['mae'])} | {_pct(s['coverage'])} | "
                f"{_pct(s['ci_null'])} | {_num(s['ci_width'])} | "
                + (
                    f"{_num(vs['median'])} / {_num(vs['p90'])} / {_num(vs['worst'])} | "
                    f"{_pct(vs['within'])}"
                    if vs
                    else "- | -"
                )
                + f" | {_pct(s['slope_coverage'])} | {_pct(v.get('transfers'))} / "
                f"{_pct(v.get('drifts'))} / {_pct(v.get('inconclusive'))} | "
                + (_pct(vs["same_verdict"]) if vs else "-")
                + " |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", type=int, default=48)
    parser.add_argument("--quick", action="store_true", help="3 families, results *-quick.*")
    parser.add_argument("--work", type=Path, help="keep the stores here")
    args = parser.parse_args()
    n = 3 if args.quick else args.families
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        scenarios = [run_scenario(sc, i, n, work) for i, sc in enumerate(SCENARIOS)]
    result = {
        "machine": machine(),
        "families": n,
        "seconds": round(time.perf_counter() - t0, 1),
        "scenarios": scenarios,
    }
    out = cal.RESULTS / ("search_calibration-quick" if args.quick else "search_calibration")
    slim = {
        **result,
        "scenarios": [
            {
                **r,
                "dense": {k: v for k, v in r["dense"].items() if not k.startswith("per_")},
                "searches": [
                    {k: v for k, v in s.items() if not k.startswith("per_")} for s in r["searches"]
                ],
            }
            for r in scenarios
        ],
    }
    out.with_suffix(".json").write_text(json.dumps(slim, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
