"""Calibration of the analysis on synthetic stores with a known answer (issue 9, item 7).

    .venv/bin/python benchmarks/calibration.py [--quick] [--families N] [--jobs J] [--out DIR]

For each scenario (lr grid step x seeds x true width slope) this writes one store in the store's
own format (`Store.write_trial` on trials from `sweeper.spec.expand`), runs the real CLI
`sweep report STORE -o OUT` on it, reads OUT/fits.json and scores it against the planted truth.
Writes DIR/calibration.json and DIR/calibration.md (DIR: benchmarks/results, or with --quick
benchmarks/results/calibration-quick.*).

The planted model (its own, not analysis/synthetic.py's). In log2 lr x, for one family (cells
that differ only in width w) with planted optimum

    x*(w) = c + slope * log2(w / 64),   c = -8 + U(-0.5, 0.5)   (anywhere between grid points)
    u     = x - x*(w)
    loss  = 1.5 + (w / 64)^-0.5 + shape(u) + seed_offset[seed] + eps

shape(u) is ASYMMETRIC, steeper above the optimum (u > 0, towards divergence) than below,
drawn per family from three shapes (they rotate over the families of every scenario):

    quad3   piecewise quadratic, a u^2 below and 3 a u^2 above, a ~ U(0.015, 0.025)
    vee     rounded asymmetric V, s (sqrt(u^2 + r^2) - r), s ~ 0.08 below and 3.75x (~0.3)
            above (nats per octave far from the optimum), r ~ U(0.5, 0.9)
    linex   c (exp(k u) - k u - 1), c ~ U(0.06, 0.10), k ~ U(0.8, 1.2)

The asymmetry (quad3's ratio 3, vee's upper slope, linex's k) also drifts with width within a
family, by a factor 2^(g (log2 w - mean log2 w)) with g ~ U(-0.2, 0.2) per family, so that
a location method's shape-dependent bias does not cancel exactly in the width slope.

seed_offset ~ N(0, 0.02) is one number per seed of a family, shared by every lr AND every width
(a seed fixes initialisation and batch order); eps ~ N(0, sigma (1 + 0.5 max(u, 0))) with
sigma ~ U(0.005, 0.01) per family is independent per trial (noisier above the optimum).
Divergence cliff: a trial with u > cliff + jitter[seed] diverges (status "diverged", no final
loss, a few log rows ending in NaN), cliff ~ U(2, 3) octaves per family and jitter ~ N(0, 0.15)
per seed. The lr grid (one per scenario, shared by its families and widths) spans about 4
octaves either side of every planted optimum. Replicate families are told apart by AdamW's
`weight_decay` (one distinct value per family; the analysis groups cells by the `hparams`
column, and the planted curve does not depend on it).

Scores per scenario: bias and mean absolute error of `optima[i].log2_lr_star`, coverage of
`optima[i].log2_lr_star_ci` (null intervals counted apart), the `status` flags, coverage of
`width_transfer[j].slope_ci`, and the share of each `width_transfer[j].verdict`. A key missing
from fits.json (an older analysis) is treated as None; the older boolean `transfers` ("the
slope's interval contains 0") is recorded separately as `legacy_flag`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from sweeper.spec import TrialSpec, expand, parse_spec
from sweeper.store import Store, TrialResult

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP = Path(sys.executable).parent / "sweep"

SHAPES = ("quad3", "vee", "linex")
WIDTHS = (64, 128, 256, 512)
REF_WIDTH = 64
MID_LOG2_WIDTH = float(np.mean(np.log2(WIDTHS)))
CENTRE = -8.0  # log2 lr* at REF_WIDTH, before the per-family offset
OFFSET = 0.5  # the per-family offset is U(-OFFSET, OFFSET) octaves
SPAN = 4.0  # octaves of grid on either side of the planted optima
STEPS = 100
LOG_EVERY = 20
SEED_SIGMA = 0.02  # nats: shared per-seed offset (all lrs and widths of a family)
NOISE = (0.005, 0.01)  # nats: per-trial noise sigma, drawn per family
CLIFF = (2.0, 3.0)  # octaves above x* where trials diverge, drawn per family
CLIFF_JITTER = 0.15  # octaves, per seed
ASYM_TREND = 0.2  # the asymmetry changes with width by 2^U(-0.2, 0.2) per doubling
NOISE_GROWTH = 0.5  # the per-trial noise grows by this factor per octave above the optimum
VERDICTS = ("transfers", "drifts", "inconclusive")
DEFAULT_FAMILIES = 48
QUICK_FAMILIES = 3


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    step: float  # lr grid step, octaves
    seeds: int
    slope: float  # true d log2 lr* / d log2 width
    shapes: tuple[str, ...] = SHAPES  # rotated over the families

    @property
    def name(self) -> str:
        grid = "oct" if self.step == 1 else f"{self.step:g}oct"
        return f"{grid}-{self.seeds}seed-slope{self.slope:+g}"

    @property
    def shape_label(self) -> str:
        return self.shapes[0] if len(self.shapes) == 1 else "mixed: " + "/".join(self.shapes)


SCENARIOS: tuple[Scenario, ...] = tuple(
    Scenario(step, seeds, slope)
    for seeds in (3, 1)
    for step in (1.0, 0.5)
    for slope in (0.0, -0.4, -1.0)
)


def grid_log2(sc: Scenario) -> tuple[float, float, float]:
    """(lo, hi, step): the scenario's lr grid, at least SPAN - OFFSET octaves beyond every x*."""
    shift = sc.slope * math.log2(max(WIDTHS) / REF_WIDTH)
    lo = math.floor((CENTRE + min(0.0, shift) - SPAN) / sc.step) * sc.step
    hi = math.ceil((CENTRE + max(0.0, shift) + SPAN) / sc.step) * sc.step
    return lo, hi, sc.step


# --------------------------------------------------------------------------- planted truth


@dataclass(frozen=True)
class Family:
    index: int
    weight_decay: float  # tells the family apart in the store
    shape: str
    params: dict[str, float]
    slope: float
    centre: float  # x* at REF_WIDTH
    cliff: float
    noise: float
    seed_offsets: tuple[float, ...]
    cliff_jitter: tuple[float, ...]
    asym_trend: float = 0.0  # the asymmetry scales by 2^(asym_trend * octaves of width from mid)

    def x_star(self, width: int) -> float:
        return self.centre + self.slope * math.log2(width / REF_WIDTH)

    def asym(self, width: int) -> float:
        return 2.0 ** (self.asym_trend * (math.log2(width) - MID_LOG2_WIDTH))

    def mean_loss(self, width: int, log2_lr: np.ndarray | float) -> np.ndarray:
        """The expected loss (over seeds and noise) at `log2_lr`: the planted curve."""
        u = np.asarray(log2_lr, float) - self.x_star(width)
        return floor_loss(width) + shape_loss(self.shape, self.params, u, self.asym(width))


def family_wd(index: int) -> float:
    return round((index + 1) * 1e-4, 8)


def make_family(
    sc: Scenario, index: int, scenario_index: int, rng_seed: int = 0, noiseless: bool = False
) -> Family:
    """Family `index` of a scenario; the same whatever the number of families drawn."""
    rng = np.random.default_rng([rng_seed, scenario_index, index])
    shape = sc.shapes[index % len(sc.shapes)]
    if shape == "quad3":
        params = {"a": rng.uniform(0.015, 0.025), "ratio": 3.0}
    elif shape == "vee":
        s = rng.uniform(0.06, 0.10)
        params = {"s_left": s, "s_right": 3.75 * s, "r": rng.uniform(0.5, 0.9)}
    elif shape == "linex":
        params = {"c": rng.uniform(0.06, 0.10), "k": rng.uniform(0.8, 1.2)}
    else:
        raise ValueError(f"unknown shape {shape!r}")
    centre = CENTRE + rng.uniform(-OFFSET, OFFSET)
    cliff = rng.uniform(*CLIFF)
    noise = rng.uniform(*NOISE)
    offsets = rng.normal(0.0, SEED_SIGMA, sc.seeds)
    jitter = rng.normal(0.0, CLIFF_JITTER, sc.seeds)
    asym_trend = rng.uniform(-ASYM_TREND, ASYM_TREND)
    if noiseless:
        noise, offsets, jitter = 0.0, np.zeros(sc.seeds), np.zeros(sc.seeds)
    return Family(
        index=index,
        weight_decay=family_wd(index),
        shape=shape,
        params={k: float(v) for k, v in params.items()},
        slope=sc.slope,
        centre=float(centre),
        cliff=float(cliff),
        noise=float(noise),
        seed_offsets=tuple(float(v) for v in offsets),
        cliff_jitter=tuple(float(v) for v in jitter),
        asym_trend=float(asym_trend),
    )


def shape_loss(
    shape: str, params: dict[str, float], u: np.ndarray | float, asym: float = 1.0
) -> np.ndarray:
    """The excess loss at u octaves from the optimum (0 at u = 0, steeper for u > 0).

    `asym` scales the asymmetry: the upper side's curvature (quad3) or slope (vee), or k (linex).
    """
    u = np.asarray(u, float)
    if shape == "quad3":
        a = params["a"]
        return np.where(u < 0, a, a * params["ratio"] * asym) * u**2
    if shape == "vee":
        s = np.where(u < 0, params["s_left"], params["s_right"] * asym)
        r = params["r"]
        return s * (np.sqrt(u**2 + r**2) - r)
    if shape == "linex":
        c, k = params["c"], params["k"] * asym
        return c * (np.exp(k * u) - k * u - 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def floor_loss(width: int) -> float:
    return 1.5 + (width / REF_WIDTH) ** -0.5


# --------------------------------------------------------------------------- the store


def grid_dict(sc: Scenario, families: list[Family], name: str) -> dict:
    lo, hi, step = grid_log2(sc)
    return {
        "name": name,
        "model": {"kind": "gpt", "depth": 2, "seq_len": 64},
        "train": {"steps": STEPS, "log_every": LOG_EVERY, "eval_every": STEPS},
        "grid": {
            "width": list(WIDTHS),
            "batch_size": [32],
            "seed": list(range(sc.seeds)),
            "optimizer": {
                "adamw": {
                    "lr": {"log2": [lo, hi, step]},
                    "weight_decay": [f.weight_decay for f in families],
                }
            },
        },
    }


def scenario_trials(sc: Scenario, families: list[Family], name: str) -> list[TrialSpec]:
    return expand(parse_spec(grid_dict(sc, families, name), "calibration"), "synthetic")


def trial_result(fam: Family, spec: TrialSpec, rng: np.random.Generator) -> TrialResult:
    """The planted trial: final loss from the curve model, a few log rows leading to it."""
    u = math.log2(spec.lr) - fam.x_star(spec.width)
    final = (
        float(fam.mean_loss(spec.width, math.log2(spec.lr)))
        + fam.seed_offsets[spec.seed]
        + rng.normal(0.0, fam.noise * (1.0 + NOISE_GROWTH * max(u, 0.0)))
    )
    steps = np.arange(LOG_EVERY, spec.steps + 1, LOG_EVERY, dtype=np.int64)
    tokens = steps * spec.batch_size * spec.seq_len
    # Train loss decays towards the final value; small row noise.
    train = final + 0.6 * ((steps / spec.steps) ** -0.5 - 1.0) + rng.normal(0, 0.003, len(steps))
    train[-1] = final - 0.01
    diverged = u > fam.cliff + fam.cliff_jitter[spec.seed]
    status, error = "completed", None
    if diverged:
        keep = int(rng.integers(2, max(3, len(steps) - 1)))
        steps, tokens, train = steps[:keep], tokens[:keep], train[:keep].copy()
        train[-1] = np.nan
        status, error = "diverged", f"loss is nan at step {int(steps[-1])}"
    per_step = 2e-4 * spec.width / REF_WIDTH
    norm = 2.0 ** (5.0 + u)
    rows = [
        {
            "step": int(s),
            "tokens": int(t),
            "train_loss": float(tl),
            "val_loss": float(final) if (not diverged and s == spec.steps) else None,
            "lr": spec.lr,
            "elapsed_s": float(s * per_step),
            "tokens_per_s": spec.batch_size * spec.seq_len / per_step,
            "out_rms_to_inf": norm,
            "hidden_rms_to_rms": norm / 4,
            "in_l1_to_rms": 1.0,
        }
        for s, t, tl in zip(steps, tokens, train, strict=True)
    ]
    summary = {
        "n_params": 12 * spec.depth * spec.width**2 + 2 * spec.vocab_size * spec.width,
        "steps_done": int(steps[-1]),
        "tokens_seen": int(tokens[-1]),
        "initial_loss": math.log(spec.vocab_size),
        "final_train_loss": None if diverged else float(train[-1]),
        "final_val_loss": None if diverged else float(final),
        "best_val_loss": None if diverged else float(final),
        "out_rms_to_inf": norm,
        "hidden_rms_to_rms": norm / 4,
        "in_l1_to_rms": 1.0,
        "wall_time_s": float(steps[-1] * per_step + 1.0),
        "train_time_s": float(steps[-1] * per_step),
        "device": "cpu",
        "error": error,
    }
    return TrialResult(status, summary, rows)


def write_store(
    root: Path, sc: Scenario, families: list[Family], name: str, rng_seed: int = 0
) -> Path:
    """Write the scenario's store `root/name`; returns its folder."""
    store = Store(root, name)
    store.prepare()
    by_wd = {f.weight_decay: f for f in families}
    rng = np.random.default_rng([rng_seed, 7919])
    for spec in scenario_trials(sc, families, name):
        fam = by_wd[round(float(spec.hparams["weight_decay"]), 8)]
        store.write_trial(spec, trial_result(fam, spec, rng))
    return Path(store.path)


# --------------------------------------------------------------------------- scoring


def _family_of(record: dict, by_wd: dict[float, Family]) -> Family | None:
    """The planted family of a fits.json record (optima[i] or width_transfer[j])."""
    for key in ("config", "family"):
        cfg = record.get(key) or {}
        if not isinstance(cfg, dict):
            continue
        hp = cfg.get("hparams")
        if isinstance(hp, str):
            try:
                hp = json.loads(hp)
            except ValueError:
                hp = None
        wd = (hp or {}).get("weight_decay") if isinstance(hp, dict) else None
        if wd is None:
            wd = cfg.get("weight_decay")
        if wd is not None:
            return by_wd.get(round(float(wd), 8))
    m = re.search(r"weight_decay=([0-9.eE+-]+)", str(record.get("label") or ""))
    return by_wd.get(round(float(m.group(1)), 8)) if m else None


def _interval(ci: Any) -> tuple[float, float] | None:
    if not isinstance(ci, list | tuple) or len(ci) < 2:
        return None
    lo, hi = ci[0], ci[1]
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return float(lo), float(hi)


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _share(n: int, d: int) -> float | None:
    return n / d if d else None


def score_cells(records: list[dict], by_wd: dict[float, Family]) -> dict[str, Any]:
    """lr* error and interval coverage over the cells (optima records)."""
    errs, argmin_errs, widths, covered, n_ci, n_null = [], [], [], 0, 0, 0
    status: dict[str, int] = {}
    unmatched = 0
    per_cell = []
    for r in records:
        fam = _family_of(r, by_wd)
        if fam is None or r.get("width") is None:
            unmatched += 1
            continue
        truth = fam.x_star(int(r["width"]))
        st = str(r.get("status"))
        status[st] = status.get(st, 0) + 1
        est = r.get("log2_lr_star")
        if est is not None and math.isfinite(est):
            errs.append(est - truth)
        am = r.get("argmin_log2_lr")
        if am is not None and math.isfinite(am):
            argmin_errs.append(am - truth)
        ci = _interval(r.get("log2_lr_star_ci"))
        hit = None
        if ci is None:
            n_null += 1
        else:
            n_ci += 1
            hit = ci[0] <= truth <= ci[1]
            covered += hit
            widths.append(ci[1] - ci[0])
        per_cell.append(
            {
                "family": fam.index,
                "shape": fam.shape,
                "width": int(r["width"]),
                "truth": truth,
                "estimate": est,
                "ci": list(ci) if ci else None,
                "covered": hit,
                "status": st,
            }
        )
    n = len(per_cell)
    return {
        "n_cells": n,
        "unmatched": unmatched,
        "n_estimates": len(errs),
        "bias": _mean(errs),
        "mae": _mean([abs(e) for e in errs]),
        "argmin_mae": _mean([abs(e) for e in argmin_errs]),
        "coverage": _share(covered, n_ci),
        "n_ci": n_ci,
        "null_share": _share(n_null, n),
        "mean_ci_width": _mean(widths),
        "status": status,
        "cells": per_cell,
    }


def _by_shape(cells: list[dict]) -> dict[str, dict]:
    out = {}
    for shape in SHAPES:
        mine = [c for c in cells if c["shape"] == shape]
        errs = [c["estimate"] - c["truth"] for c in mine if c["estimate"] is not None]
        cis = [c for c in mine if c["ci"] is not None]
        out[shape] = {
            "n_cells": len(mine),
            "n_estimates": len(errs),
            "n_ci": len(cis),
            "bias": _mean(errs),
            "mae": _mean([abs(e) for e in errs]),
            "coverage": _share(sum(bool(c["covered"]) for c in cis), len(cis)),
            "null_share": _share(len(mine) - len(cis), len(mine)),
        }
    return out


def score_families(records: list[dict], by_wd: dict[float, Family]) -> dict[str, Any]:
    """Slope error, slope-interval coverage and verdicts over the families."""
    errs, covered, n_ci, n_null, unmatched = [], 0, 0, 0, 0
    verdicts = {v: 0 for v in (*VERDICTS, "other", "missing")}
    legacy = {"transfers": 0, "not_transfers": 0, "missing": 0}
    tolerances, per_family = set(), []
    for r in records:
        if r.get("axis", "width") != "width":
            continue
        fam = _family_of(r, by_wd)
        if fam is None:
            unmatched += 1
            continue
        slope = r.get("slope")
        if slope is not None and math.isfinite(slope):
            errs.append(slope - fam.slope)
        ci = _interval(r.get("slope_ci"))
        hit = None
        if ci is None:
            n_null += 1
        else:
            n_ci += 1
            hit = ci[0] <= fam.slope <= ci[1]
            covered += hit
        v = r.get("verdict")
        if isinstance(v, dict):  # tolerate a nested {"verdict": ..., "why": ...}
            v = v.get("verdict")
        verdicts[v if v in VERDICTS else ("missing" if v is None else "other")] += 1
        t = r.get("transfers")
        legacy["missing" if t is None else ("transfers" if t else "not_transfers")] += 1
        tol = r.get("tolerance")
        if tol is not None:
            tolerances.add(json.dumps(tol, sort_keys=True))
        per_family.append(
            {
                "family": fam.index,
                "shape": fam.shape,
                "slope": slope,
                "slope_ci": list(ci) if ci else None,
                "covered": hit,
                "verdict": v,
                "legacy_transfers": t,
                "status": r.get("status"),
            }
        )
    n = len(per_family)
    return {
        "n_families": n,
        "unmatched": unmatched,
        "slope_bias": _mean(errs),
        "slope_mae": _mean([abs(e) for e in errs]),
        "slope_coverage": _share(covered, n_ci),
        "n_slope_ci": n_ci,
        "slope_null_share": _share(n_null, n),
        "verdicts": verdicts,
        "verdict_share": {k: _share(c, n) for k, c in verdicts.items()},
        "legacy_flag": legacy,
        "tolerance": [json.loads(t) for t in sorted(tolerances)],
        "families": per_family,
    }


# --------------------------------------------------------------------------- one scenario


def run_scenario(
    sc: Scenario,
    scenario_index: int,
    n_families: int,
    work: Path,
    rng_seed: int = 0,
    analysis_src: str | None = None,
) -> dict[str, Any]:
    """Write, report and score one scenario. Returns its record.

    `analysis_src`: a folder holding other `analysis/` and `sweeper/` packages (e.g. an
    exported commit) for `sweep report` to import instead of the installed ones."""
    families = [make_family(sc, i, scenario_index, rng_seed) for i in range(n_families)]
    name = sc.name.replace("+", "p").replace(".", "_")
    root = work / name
    t0 = time.perf_counter()
    path = write_store(root, sc, families, name, rng_seed=rng_seed + scenario_index)
    t1 = time.perf_counter()
    out = root / "report"
    proc = subprocess.run(
        [str(SWEEP), "report", str(path), "-o", str(out)],
        capture_output=True,
        text=True,
        env=_report_env(analysis_src),
    )
    t2 = time.perf_counter()
    record: dict[str, Any] = {
        "scenario": sc.name,
        "step": sc.step,
        "seeds": sc.seeds,
        "slope": sc.slope,
        "shape": sc.shape_label,
        "grid_log2": list(grid_log2(sc)),
        "widths": list(WIDTHS),
        "n_families_planted": n_families,
        "n_trials": sum(1 for _ in (path / "trials").glob("*.parquet")),
        "write_s": t1 - t0,
        "report_s": t2 - t1,
        "report_rc": proc.returncode,
    }
    if proc.returncode != 0:
        record["report_error"] = (proc.stderr or proc.stdout)[-2000:]
        return record
    fits = json.loads((out / "fits.json").read_text())
    by_wd = {f.weight_decay: f for f in families}
    cells = score_cells(fits.get("optima") or [], by_wd)
    fams = score_families(fits.get("width_transfer") or [], by_wd)
    record["lr_star"] = cells
    record["lr_star_by_shape"] = _by_shape(cells["cells"])
    record["transfer"] = fams
    record["fits_version"] = fits.get("version")
    record["seed_spread"] = fits.get("seed_spread")
    return record


def _report_env(analysis_src: str | None) -> dict[str, str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    if analysis_src:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(Path(analysis_src).resolve()), env.get("PYTHONPATH")) if p
        )
    return env


def _run_one(args: tuple) -> dict[str, Any]:
    return run_scenario(*args)


# --------------------------------------------------------------------------- targets


def _verdict_share(r: dict, verdict: str) -> float | None:
    t = r.get("transfer") or {}
    n = t.get("n_families") or 0
    if not n or t["verdicts"]["missing"] == n:
        return None  # no verdict in fits.json (older analysis)
    return t["verdicts"][verdict] / n


NONE_GIVEN = "no interval"


def _coverage_or_none_given(part: dict | None, key: str, null_key: str) -> float | str | None:
    """Coverage; NONE_GIVEN when every interval is null (honest with one seed: no claim)."""
    part = part or {}
    if part.get(key) is None and part.get(null_key) == 1:
        return NONE_GIVEN
    return part.get(key)


TARGETS = (
    # id, text, which scenarios, value of one scenario, comparison, threshold
    (
        "mae_3seed_oct",
        "3 seeds, one-octave grid, asymmetric curves: mean abs. error of log2 lr* <= 0.2 octave",
        lambda r: r["seeds"] == 3 and r["step"] == 1,
        lambda r: (r.get("lr_star") or {}).get("mae"),
        "<=",
        0.2,
    ),
    (
        "lr_cov_3seed",
        "3 seeds: 95% lr* intervals cover the true lr* in >= 85% of cells",
        lambda r: r["seeds"] == 3,
        lambda r: (r.get("lr_star") or {}).get("coverage"),
        ">=",
        0.85,
    ),
    (
        "slope_cov_3seed",
        "3 seeds: 95% slope intervals cover the true slope in >= 85% of families",
        lambda r: r["seeds"] == 3,
        lambda r: (r.get("transfer") or {}).get("slope_coverage"),
        ">=",
        0.85,
    ),
    (
        "transfers_at_-0.4_3seed",
        "3 seeds: a true slope of -0.4 is called `transfers` in <= 10% of families",
        lambda r: r["seeds"] == 3 and r["slope"] == -0.4,
        lambda r: _verdict_share(r, "transfers"),
        "<=",
        0.10,
    ),
    (
        "drifts_at_0_3seed",
        "3 seeds: a true slope of 0 is called `drifts` in <= 10% of families",
        lambda r: r["seeds"] == 3 and r["slope"] == 0,
        lambda r: _verdict_share(r, "drifts"),
        "<=",
        0.10,
    ),
    (
        "lr_cov_1seed",
        "1 seed: no lr* interval that covers less than 85% (coverage of the non-null ones; "
        "no interval at all meets it)",
        lambda r: r["seeds"] == 1,
        lambda r: _coverage_or_none_given(r.get("lr_star"), "coverage", "null_share"),
        ">=",
        0.85,
    ),
    (
        "slope_cov_1seed",
        "1 seed: no slope interval that covers less than 85% (coverage of the non-null ones; "
        "no interval at all meets it)",
        lambda r: r["seeds"] == 1,
        lambda r: _coverage_or_none_given(r.get("transfer"), "slope_coverage", "slope_null_share"),
        ">=",
        0.85,
    ),
    (
        "transfers_at_-0.4_1seed",
        "1 seed: a true slope of -0.4 is called `transfers` in <= 10% of families",
        lambda r: r["seeds"] == 1 and r["slope"] == -0.4,
        lambda r: _verdict_share(r, "transfers"),
        "<=",
        0.10,
    ),
)


def evaluate_targets(records: list[dict]) -> list[dict]:
    """Each target, per scenario it applies to; met when every such scenario meets it.

    A scenario whose value is None (no interval at all, or no verdict in fits.json) does not
    count as met: the target is then 'not evaluable' unless another scenario fails it. For the
    one-seed coverage targets, NONE_GIVEN (every interval null) meets them."""
    out = []
    for tid, text, applies, value, op, thr in TARGETS:
        per = {}
        for r in records:
            if applies(r):
                per[r["scenario"]] = value(r)
        vals = [v for v in per.values() if v is not None]
        ok = [
            v == NONE_GIVEN or ((v <= thr + 1e-12) if op == "<=" else (v >= thr - 1e-12))
            for v in vals
        ]
        if not per:
            met = None
        elif vals and not all(ok):
            met = False
        elif len(vals) < len(per):
            met = None  # some scenario has no value to judge
        else:
            met = True
        out.append(
            {"id": tid, "text": text, "threshold": thr, "op": op, "per_scenario": per, "met": met}
        )
    return out


# --------------------------------------------------------------------------- output


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v: float | None, fmt: str = "{:+.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _verdict_cells(r: dict) -> str:
    t = r.get("transfer") or {}
    n = t.get("n_families") or 0
    if not n:
        return "- | - | -"
    v = t["verdicts"]
    if v["missing"] == n:  # no verdict key: show the legacy flag (CI contains 0) in italics
        leg = t["legacy_flag"]
        return f"*{_pct(leg['transfers'] / n)}* | *{_pct(leg['not_transfers'] / n)}* | *-*"
    return " | ".join(_pct(v[k] / n) for k in VERDICTS)


def _fallback_count(part: dict, count: str) -> float:
    """Counts a record written before they were stored: every cell has an estimate."""
    n = part["n_cells"]
    return n * (1 - (part.get("null_share") or 0)) if count == "n_ci" else n


def _pool(parts: list[dict]) -> dict[str, Any]:
    """Pool per-scenario shape summaries (means weighted by their counts)."""
    n = sum(p["n_cells"] for p in parts)
    out: dict[str, Any] = {"n_cells": n}
    for key, count in (("bias", "n_estimates"), ("mae", "n_estimates"), ("coverage", "n_ci")):
        pairs = [
            (p[key], p.get(count, _fallback_count(p, count)))
            for p in parts
            if p.get(key) is not None
        ]
        w = sum(c for _, c in pairs)
        out[key] = sum(v * c for v, c in pairs) / w if w else None
    nulls = sum(p["n_cells"] * (p.get("null_share") or 0) for p in parts)
    out["null_share"] = nulls / n if n else None
    return out


def _target_value(tid: str, v: float | str | None) -> str:
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    return f"{v:.2f}" if "mae" in tid else _pct(v)


def markdown(record: dict) -> str:
    m = record["machine"]
    rows = []
    for r in record["scenarios"]:
        c = r.get("lr_star") or {}
        t = r.get("transfer") or {}
        if r.get("report_rc"):
            rows.append(f"| {r['scenario']} | `sweep report` failed (rc {r['report_rc']}) |")
            continue
        rows.append(
            f"| {r['step']:g} | {r['shape']} | {r['seeds']} | {r['slope']:+g} "
            f"| {c.get('n_cells', 0)} / {t.get('n_families', 0)} "
            f"| {_num(c.get('bias'))} | {_num(c.get('mae'), '{:.2f}')} "
            f"| {_num(c.get('argmin_mae'), '{:.2f}')} "
            f"| {_pct(c.get('coverage'))} | {_pct(c.get('null_share'))} "
            f"| {_num(c.get('mean_ci_width'), '{:.2f}')} "
            f"| {_pct(t.get('slope_coverage'))} | {_pct(t.get('slope_null_share'))} "
            f"| {_num(t.get('slope_bias'))} "
            f"| {_verdict_cells(r)} "
            f"| {', '.join(f'{k} {v}' for k, v in sorted(c.get('status', {}).items()))} |"
        )
    shape_rows = []
    for seeds in (3, 1):
        for step in (1.0, 0.5):
            mine = [
                r
                for r in record["scenarios"]
                if r["seeds"] == seeds and r["step"] == step and r.get("lr_star")
            ]
            if not mine:
                continue
            for shape in SHAPES:
                s = _pool([r["lr_star_by_shape"][shape] for r in mine])
                shape_rows.append(
                    f"| {step:g} | {seeds} | {shape} | {s['n_cells']} | {_num(s['bias'])} "
                    f"| {_num(s['mae'], '{:.2f}')} | {_pct(s['coverage'])} "
                    f"| {_pct(s['null_share'])} |"
                )
    marks = {True: "**met**", False: "**NOT met**", None: "not evaluable"}
    target_rows = []
    for tg in record["targets"]:
        vals = ", ".join(
            f"{k}: {_target_value(tg['id'], v)}" for k, v in tg["per_scenario"].items()
        )
        mark = marks[tg["met"]] if tg["per_scenario"] else "not run"
        target_rows.append(f"| {tg['text']} | {mark} | {vals} |")
    tol = sorted(
        {
            json.dumps(x)
            for r in record["scenarios"]
            for x in (r.get("transfer") or {}).get("tolerance", [])
        }
    )
    any_verdict = any(
        (r.get("transfer") or {}).get("verdicts", {}).get("missing", 0)
        < (r.get("transfer") or {}).get("n_families", 0)
        for r in record["scenarios"]
    )
    legacy_note = (
        ""
        if any_verdict
        else (
            "\nThis fits.json has no `verdict` key: the verdict columns show, in italics, the "
            "older boolean `transfers` (the slope's interval contains 0) as *transfers* and its "
            "negation as *drifts*; the verdict targets are not evaluable on it.\n"
        )
    )
    quick = " --quick" if record["config"]["quick"] else ""
    if record["config"].get("analysis_commit"):
        quick += f" --analysis-commit {record['config']['analysis_commit']}"
    return f"""# Calibration of lr* and width-transfer verdicts on synthetic stores

`.venv/bin/python benchmarks/calibration.py{quick} --families {record["config"]["families"]}` \
on {record["date"]}: {len(record["scenarios"])} scenarios, \
{record["config"]["families"]} families each, {record["total_trials"]:,} trials, \
{record["total_s"]:.0f} s in all ({record["config"]["jobs"]} jobs).
Analysis: {record["analysis"]["description"]}; fits.json version \
{", ".join(record["fits_versions"])}; transfer tolerance in fits.json: \
{", ".join(tol) if tol else "none given"}.

Each scenario is one store, scored by one `sweep report STORE -o OUT` (the real CLI). A family is
{len(WIDTHS)} cells (widths {", ".join(map(str, WIDTHS))}) with a planted optimum
`log2 lr*(w) = c + slope log2(w/64)`, `c` anywhere between grid points; loss curves are
asymmetric (steeper above the optimum: `quad3` curvature ratio 3, rounded V `vee` with slopes
~0.08 / ~0.3 nats per octave, `linex` with k ~ 1; the asymmetry drifts mildly with width),
rotated over the families; trials 2-3 octaves above the optimum diverge; seed noise is a
per-seed offset (N(0, {SEED_SIGMA}) nats, shared by every lr and width of a family) plus
independent per-trial noise (0.005-0.01 nats, growing above the optimum).
The grid spans about {SPAN:g} octaves either side of every optimum. See the module docstring.

Columns: lr* bias and MAE (octaves, over cells with an estimate; "argmin MAE" is the grid
argmin's, for scale); CI cover = share of non-null 95% lr* intervals that contain the truth;
null = share of cells with no interval; CI width = mean width of the non-null ones (octaves);
slope cover / null likewise for the width-transfer slope; verdict shares over the families.

| grid step | shape | seeds | true slope | cells / families | lr* bias | lr* MAE \
| argmin MAE | CI cover | CI null | CI width | slope cover | slope null | slope bias \
| transfers | drifts | inconclusive | cell status |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- \
| --- | --- | --- |
{chr(10).join(rows)}
{legacy_note}
## lr* by curve shape (pooled over the true slopes)

| grid step | seeds | shape | cells | lr* bias | lr* MAE | CI cover | CI null |
| --- | --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(shape_rows)}

## Targets (issue 9)

A target is met when every scenario it applies to meets it; "not evaluable" when a scenario
has no value (no interval at all, or no verdict in fits.json). With {record["config"]["families"]}
families a share has a standard error of about \
{100 * math.sqrt(0.15 * 0.85 / max(1, record["config"]["families"])):.0f} points at 85%.

| target | status | value per scenario |
| --- | --- | --- |
{chr(10).join(target_rows)}

Machine: {m["cpu"]}, {m["cores"]} cores, Python {m["python"]}, {m["platform"]}.
Load average at the end (1/5/15 min): {", ".join(map(str, m["loadavg_1_5_15"]))} (the cores
are shared with other work, so the times carry its noise).
"""


REPO = Path(__file__).resolve().parent.parent


def _git(*a: str) -> str | None:
    try:
        p = subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def export_commit(rev: str, dest: Path) -> Path:
    """analysis/ and sweeper/ of commit `rev`, unpacked under `dest` (read-only git use)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "analysis", "sweeper"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    full = _git("rev-parse", "--short", rev) or rev
    (dest / "COMMIT").write_text(full + "\n")
    return dest


def analysis_source(analysis_src: str | None) -> dict[str, Any]:
    """Which analysis `sweep report` ran: the commit, and whether analysis/ had local edits."""
    commit = _git("rev-parse", "--short", "HEAD")
    if analysis_src and (Path(analysis_src) / "COMMIT").exists():
        src_commit = (Path(analysis_src) / "COMMIT").read_text().strip()
        where = f"analysis/ and sweeper/ of commit {src_commit} (--analysis-commit)"
        return {"src": "commit", "commit": src_commit, "description": where}
    if analysis_src:
        where = f"imported from {analysis_src} (--analysis-src; HEAD of the checkout is {commit})"
        return {"src": analysis_src, "commit": commit, "description": where}
    dirty = _git("status", "--porcelain", "--", "analysis")
    state = "with uncommitted changes in analysis/" if dirty else "clean"
    return {
        "src": None,
        "commit": commit,
        "analysis_dirty": bool(dirty),
        "description": f"the installed checkout at {commit}, {state}",
    }


def _without_cells(record: dict) -> dict:
    """The record without the per-cell lists (the per-family ones stay): a smaller file."""
    out = dict(record)
    out["scenarios"] = []
    for r in record["scenarios"]:
        r = dict(r)
        if "lr_star" in r:
            r["lr_star"] = {k: v for k, v in r["lr_star"].items() if k != "cells"}
        out["scenarios"].append(r)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_FAMILIES} families per scenario")
    ap.add_argument("--families", type=int, default=None, help="families per scenario")
    ap.add_argument("--jobs", type=int, default=2, help="scenarios run in parallel")
    ap.add_argument("--out", default=None, help="folder for calibration.{json,md}")
    ap.add_argument("--work", default=None, help="where the stores go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the stores and reports")
    ap.add_argument("--seed", type=int, default=0, help="rng seed of the planted families")
    ap.add_argument(
        "--analysis-src",
        default=None,
        help="folder with analysis/ and sweeper/ packages for `sweep report` to use instead of "
        "the installed ones (e.g. `git archive HEAD analysis sweeper | tar -x -C DIR`)",
    )
    ap.add_argument(
        "--analysis-commit",
        default=None,
        help="score the analysis of this commit: `git archive REV analysis sweeper` is unpacked "
        "into the work folder and used as --analysis-src (e.g. a 'before' number)",
    )
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the existing .json"
    )
    ap.add_argument("--stem", default=None, help="file name stem (default calibration[-quick])")
    ap.add_argument(
        "--scenarios", nargs="*", default=None, help="names of the scenarios to run (default all)"
    )
    args = ap.parse_args(argv)
    from machine import machine  # benchmarks/ is on sys.path when run as a script

    n_fam = args.families or (QUICK_FAMILIES if args.quick else DEFAULT_FAMILIES)
    chosen = [
        (i, sc)
        for i, sc in enumerate(SCENARIOS)
        if args.scenarios is None or sc.name in args.scenarios
    ]
    out_dir = Path(args.out) if args.out else RESULTS
    stem = args.stem or ("calibration-quick" if args.quick and args.out is None else "calibration")
    if args.markdown_only:
        record = json.loads((out_dir / f"{stem}.json").read_text())
        (out_dir / f"{stem}.md").write_text(markdown(record))
        return record
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sweeper-calib-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.analysis_commit:
        args.analysis_src = str(export_commit(args.analysis_commit, work / "analysis-src"))
    t0 = time.perf_counter()
    jobs = [(sc, i, n_fam, work, args.seed, args.analysis_src) for i, sc in chosen]
    source = analysis_source(args.analysis_src)
    try:
        if args.jobs > 1 and len(jobs) > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                records = list(pool.map(_run_one, jobs))
        else:
            records = [_run_one(j) for j in jobs]
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    record = {
        "benchmark": "calibration",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            "quick": args.quick,
            "families": n_fam,
            "jobs": args.jobs,
            "seed": args.seed,
            "analysis_src": args.analysis_src,
            "analysis_commit": args.analysis_commit,
            "widths": list(WIDTHS),
            "shapes": list(SHAPES),
            "seed_sigma": SEED_SIGMA,
            "noise": list(NOISE),
            "cliff": list(CLIFF),
            "span": SPAN,
            "asym_trend": ASYM_TREND,
            "noise_growth": NOISE_GROWTH,
            "scenarios": [asdict(sc) | {"name": sc.name} for _, sc in chosen],
        },
        "analysis": source,
        "total_s": total,
        "total_trials": sum(r["n_trials"] for r in records),
        "fits_versions": sorted({str(r.get("fits_version")) for r in records}),
        "scenarios": records,
        "targets": evaluate_targets(records),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(_without_cells(record), indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown(record))
    failed = [r["scenario"] for r in records if r.get("report_rc")]
    print(f"wrote {out_dir / stem}.json and .md in {total:.0f} s")
    for tg in record["targets"]:
        print(f"  {tg['met']!s:>5}  {tg['text']}")
    if failed:
        print(f"sweep report failed on: {', '.join(failed)}", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
