"""Run every analysis on a store: the object the report and the terminal summary render."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .batch_size import fit_batch_sizes
from .coord import coord_growth
from .errors import AnalysisError
from .horizons import default_horizons, horizon_table
from .layer_lr import fit_layer_lr
from .load import Results, load_results
from .norm_transfer import NormTransfer, fit_norm_transfer
from .optimum import N_BOOTSTRAP, Optima, find_optima
from .scaling import ScalingFits, fit_scaling, optima_at_horizons
from .transfer import TransferFit, fit_transfer
from .verdict import DEFAULT_TOLERANCE


@dataclass
class Analysis:
    results: Results
    optima: Optima
    width_transfer: list[TransferFit]
    depth_transfer: list[TransferFit]
    horizons: list[int]
    horizon_table: pd.DataFrame
    norm: NormTransfer | None
    scaling: ScalingFits
    layer_lr: list[dict]
    batch_sizes: list[dict]  # analysis.batch_size's records: loss across batch sizes
    coord: list[dict]  # analysis.coord's growth records, one per optimizer and layer
    predict_width: int | None
    n_bootstrap: int
    tolerance: float
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def fixed_lr(self) -> bool:
        """One lr per cell (a coord check, say): no loss-vs-lr curve to fit or draw."""
        table = self.optima.table
        return bool(len(table)) and bool((table["n_lr"] <= 1).all())


def analyze(
    results: str | Path | Results,
    *,
    metric: str = "final_val",
    predict_width: int | None = None,
    horizons: list[int] | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
    tolerance: float | None = None,
) -> Analysis:
    """Load (unless given loaded results) and fit everything the report shows."""
    tolerance = DEFAULT_TOLERANCE if tolerance is None else float(tolerance)
    if not (np.isfinite(tolerance) and tolerance > 0):
        raise AnalysisError(f"tolerance must be a positive number of octaves, not {tolerance}")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if not isinstance(results, Results):
        results = load_results(results, metric)
    t1 = time.perf_counter()
    timings["load_s"] = t1 - t0

    optima = find_optima(results, n_bootstrap=n_bootstrap, seed=seed)
    width = fit_transfer(
        optima, "width", varying=results.varying, predict=predict_width, tolerance=tolerance
    )
    depth = (
        fit_transfer(optima, "depth", varying=results.varying, tolerance=tolerance)
        if results.usable["depth"].nunique() > 1
        else []
    )
    t2 = time.perf_counter()
    timings["optima_transfer_s"] = t2 - t1

    chosen = sorted(set(horizons)) if horizons else default_horizons(results)
    htable = horizon_table(results, chosen)
    norm = fit_norm_transfer(htable, n_bootstrap=n_bootstrap, seed=seed, tolerance=tolerance)
    scaling = fit_scaling(optima_at_horizons(htable), optima.table)
    layer = fit_layer_lr(optima, results.usable)
    timings["horizons_norm_scaling_s"] = time.perf_counter() - t2
    return Analysis(
        results=results,
        optima=optima,
        width_transfer=width,
        depth_transfer=depth,
        horizons=chosen,
        horizon_table=htable,
        norm=norm,
        scaling=scaling,
        layer_lr=layer,
        batch_sizes=fit_batch_sizes(optima, results.usable),
        coord=coord_growth(results),
        predict_width=predict_width,
        n_bootstrap=n_bootstrap,
        tolerance=tolerance,
        timings=timings,
    )
