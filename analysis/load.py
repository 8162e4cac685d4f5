"""Read a store into tidy pandas frames and compute each trial's figure of merit.

`load_results(path)` accepts one sweep's folder (`<root>/<name>`, holding `trials/`) or a results
root holding several sweep folders. Everything goes through `sweeper.store.Store`, the contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sweeper.spec import DataConfig
from sweeper.store import STATUSES, NoStore, Store, find_stores

from .errors import AnalysisError

METRICS = ("final_val", "smoothed_train", "last_frac")
METRIC_DESCRIPTIONS = {
    "final_val": "final validation loss (nats/token)",
    "smoothed_train": "final train loss, Gaussian-smoothed over the last log rows (nats/token)",
    "last_frac": "mean train loss over the last 10 % of steps (nats/token)",
}
# last_frac: the share of steps averaged over.
LAST_FRACTION = 0.1
# smoothed_train: the Gaussian's width in log rows, as a share of the trial's rows (at least 1).
SMOOTHING_FRACTION = 0.05

# Every trials column that describes a configuration. A cell is one value of all of them (lr and
# seed excluded); `tokens` is left out because steps * batch_size * seq_len fixes it.
CONFIG_COLUMNS = (
    "optimizer",
    "model",
    "width",
    "depth",
    "seq_len",
    "head_dim",
    "zero_init_out",
    "attn_scale",
    "mlp_context",
    "data",
    "data_fingerprint",  # the same corpus on two machines can differ: never pool the two
    "vocab_size",
    "batch_size",
    "steps",
    "schedule",
    "warmup",
    "warmdown",
    "grad_clip",
    "lr_input",
    "lr_hidden",
    "lr_output",
    "lr_vector",
    "hparams",
)
MULTIPLIER_COLUMNS = ("lr_input", "lr_hidden", "lr_output", "lr_vector")

# The trials table is read through its `spec` column (the whole TrialSpec as JSON) rather than
# the ~25 config columns: reading costs time per file *and* per column, and a store holds one
# small file per trial, so one JSON column instead of 25 typed ones halves the load time.
_TRIAL_READ = (
    "trial_id",
    "status",
    "spec",
    "final_val_loss",
    "steps_done",
    "n_params",
    "finished_at",
)
_SPEC_FIELDS = (*CONFIG_COLUMNS, "seed", "lr")
_STEPS_READ = ("trial_id", "step", "tokens", "train_loss", "elapsed_s", "out_rms_to_inf")
_COORD_READ = ("trial_id", "step", "layer_index", "layer", "mean_abs")

# Short names for cell labels.
_LABEL_NAMES = {
    "batch_size": "B",
    "lr_input": "in",
    "lr_hidden": "hid",
    "lr_output": "out",
    "lr_vector": "vec",
    "zero_init_out": "zero_out",
    "seq_len": "T",
    "data_fingerprint": "data",
}


@dataclass
class Results:
    """One or several sweeps, as frames.

    trials: one row per stored trial (failed ones included), with the analysis' columns:
        tix (row number, the key of steps/coord), loss (the figure of merit; NaN when diverged
        or missing), diverged (bool), usable (counts for fits), log2_lr, cell (int), label (str).
    steps: log rows of the trials above (tix, step, tokens, train_loss, elapsed_s,
        out_rms_to_inf), sorted by (tix, step).
    coord: coord-check rows (tix, step, layer_index, layer, mean_abs).
    """

    path: str  # as given: a local path or a URI
    sweeps: list[str]
    metric: str
    trials: pd.DataFrame
    steps: pd.DataFrame
    coord: pd.DataFrame
    varying: list[str]  # config columns that vary across usable trials (cell labels use them)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> pd.DataFrame:
        """Trials that enter fits: completed with a figure of merit, or diverged."""
        return self.trials[self.trials["usable"]]

    def status_counts(self) -> dict[str, int]:
        counts = self.trials["status"].value_counts()
        out = {s: int(counts.get(s, 0)) for s in STATUSES}
        out["total"] = len(self.trials)
        out["no_metric"] = int(
            (~self.trials["usable"] & (self.trials["status"] == "completed")).sum()
        )
        out["diverged_in_fits"] = int(self.trials["diverged"].sum())
        return out


def find_sweeps(path: str | Path) -> list[Store]:
    """The sweeps at `path` (a local path or a URI): a sweep's folder, or a root holding several."""
    try:
        return find_stores(path)
    except NoStore as err:
        raise AnalysisError(str(err)) from None


def _read(store: Store, table: str, columns: tuple[str, ...]) -> pa.Table:
    return store.read(table, list(columns))


def load_results(path: str | Path, metric: str = "final_val") -> Results:
    """Read the trials, steps and coord tables of every sweep under `path`."""
    if metric not in METRICS:
        raise AnalysisError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    stores = find_sweeps(path)
    notes: list[str] = []

    trial_tables, val_null = [], []
    for store in stores:
        name = store.name
        tbl = _read(store, "trials", _TRIAL_READ)
        # A stored null (never evaluated) is "missing"; NaN/inf is "diverged".
        val_null.append(pc.is_null(tbl["final_val_loss"]).to_numpy(zero_copy_only=False))
        trial_tables.append(tbl.append_column("_folder", pa.array([name] * len(tbl), pa.string())))
    trials_tbl = pa.concat_tables(trial_tables)
    if len(trials_tbl) == 0:
        raise AnalysisError(f"{path}: no trials stored yet")
    config = _config_from_specs(trials_tbl["spec"].to_pylist())
    trials = trials_tbl.drop_columns(["spec"]).to_pandas()
    trials = pd.concat([trials, config], axis=1)
    trials["_val_null"] = np.concatenate(val_null)

    # The same trial id stored by two sweeps is the same experiment: keep the latest copy.
    if trials["trial_id"].duplicated().any():
        before = len(trials)
        trials = trials.sort_values("finished_at").drop_duplicates("trial_id", keep="last")
        notes.append(f"{before - len(trials)} trials stored in more than one sweep counted once")
    trials = trials.sort_values(["_folder", "trial_id"]).reset_index(drop=True)
    trials["tix"] = np.arange(len(trials), dtype=np.int64)

    steps = _read_rows(stores, trials, "steps", _STEPS_READ)
    steps = steps.sort_values(["tix", "step"], kind="stable").reset_index(drop=True)
    coord = _read_rows(stores, trials, "coord", _COORD_READ)
    # Sorted like steps, so that the frames do not depend on how the store lays out its files
    # (one per trial, or compacted parts).
    coord = coord.sort_values(["tix", "step", "layer_index"], kind="stable").reset_index(drop=True)

    trials["log2_lr"] = np.log2(trials["lr"].astype(float))
    _figure_of_merit(trials, steps, metric, notes)
    _cells(trials)
    varying = _varying_columns(trials[trials["usable"]] if trials["usable"].any() else trials)
    trials["label"] = _labels(trials, varying)
    trials = trials.drop(columns=["_val_null"])
    return Results(
        str(path), [st.name for st in stores], metric, trials, steps, coord, varying, notes
    )


def _config_from_specs(specs: list[str | None]) -> pd.DataFrame:
    """The config columns, as `sweeper.store.trial_row` flattens them, from the spec JSON."""
    if any(spec is None for spec in specs):
        raise AnalysisError("a stored trial has no spec (store written by an unknown version?)")
    records = [json.loads(spec) for spec in specs]
    try:
        frame = pd.DataFrame({k: [r[k] for r in records] for k in _SPEC_FIELDS})
    except KeyError as err:
        raise AnalysisError(f"a stored trial's spec lacks the field {err.args[0]!r}") from None
    described: dict[str, str] = {}
    data = []
    for d in frame["data"]:
        key = json.dumps(d, sort_keys=True)
        if key not in described:
            described[key] = DataConfig.model_validate(d).describe()
        data.append(described[key])
    frame["data"] = data
    frame["hparams"] = [json.dumps(h, sort_keys=True) for h in frame["hparams"]]
    frame["tokens"] = frame["steps"] * frame["batch_size"] * frame["seq_len"]
    return frame


def _read_rows(
    stores: list[Store], trials: pd.DataFrame, table: str, columns: tuple[str, ...]
) -> pd.DataFrame:
    """Rows of `table` whose trial is in `trials` (matched per sweep folder), keyed by tix."""
    parts = []
    for store in stores:
        mine = trials[trials["_folder"] == store.name]
        tbl = _read(store, table, columns)
        if len(tbl) == 0 or len(mine) == 0:
            continue
        # index_in matches in C; a Python dict over millions of ids would dominate loading.
        ids = pa.array(mine["trial_id"], pa.string())
        pos = pc.index_in(tbl["trial_id"], value_set=ids)
        tbl = tbl.drop_columns(["trial_id"])
        if pos.null_count:  # rows of trials that are not stored (yet): drop them
            keep = pc.is_valid(pos)
            tbl, pos = tbl.filter(keep), pos.filter(keep)
        df = tbl.to_pandas()
        df.insert(0, "tix", mine["tix"].to_numpy()[pos.to_numpy()])
        parts.append(df)
    if not parts:
        empty = {c: pd.Series(dtype=float) for c in columns if c != "trial_id"}
        return pd.DataFrame({"tix": pd.Series(dtype=np.int64), **empty})
    return pd.concat(parts, ignore_index=True)


def _figure_of_merit(trials: pd.DataFrame, steps: pd.DataFrame, metric: str, notes: list) -> None:
    """Set trials.loss / diverged / usable for the chosen metric."""
    status = trials["status"].to_numpy()
    if metric == "final_val":
        value = trials["final_val_loss"].to_numpy(float)
        missing = trials["_val_null"].to_numpy()
    else:
        per_trial = (
            _smoothed_final(steps) if metric == "smoothed_train" else _last_fraction(trials, steps)
        )
        value = per_trial.reindex(trials["tix"]).to_numpy(float)
        # No rows at all is "missing"; rows with NaN losses mean the trial diverged.
        missing = ~trials["tix"].isin(steps["tix"]).to_numpy()
    completed = status == "completed"
    nonfinite = completed & ~missing & ~np.isfinite(value)
    if nonfinite.any():
        notes.append(
            f"{int(nonfinite.sum())} completed trials with a non-finite loss count as diverged"
        )
    diverged = (status == "diverged") | nonfinite
    no_metric = completed & missing
    if no_metric.any():
        notes.append(
            f"{int(no_metric.sum())} completed trials have no {metric} value and are left out"
        )
    trials["loss"] = np.where(diverged | no_metric, np.nan, value)
    trials["diverged"] = diverged
    trials["usable"] = diverged | (completed & ~missing)


def _smoothed_final(steps: pd.DataFrame) -> pd.Series:
    """Gaussian-weighted mean of the last rows of train loss (the end value of a filtered curve)."""
    g = steps.groupby("tix", sort=False)
    back = g.cumcount(ascending=False).to_numpy(float)  # 0 for each trial's last row
    n = g["step"].transform("size").to_numpy(float)
    sigma = np.maximum(1.0, SMOOTHING_FRACTION * n)
    w = np.exp(-0.5 * (back / sigma) ** 2) * (back <= 3 * sigma)
    loss = steps["train_loss"].to_numpy(float)
    frame = pd.DataFrame({"tix": steps["tix"].to_numpy(), "wl": w * loss, "w": w})
    sums = frame.groupby("tix").sum()
    return sums["wl"] / sums["w"]


def _last_fraction(trials: pd.DataFrame, steps: pd.DataFrame) -> pd.Series:
    """Mean train loss over the rows in the last LAST_FRACTION of each trial's steps."""
    done = trials.set_index("tix")["steps_done"].reindex(steps["tix"]).to_numpy(float)
    last = steps.groupby("tix")["step"].transform("max").to_numpy(float)
    end = np.where(np.isfinite(done) & (done > 0), done, last)
    keep = steps["step"].to_numpy(float) >= (1 - LAST_FRACTION) * end
    keep |= steps["step"].to_numpy(float) >= last  # at least the last row
    return steps.loc[keep].groupby("tix")["train_loss"].mean()


def _cells(trials: pd.DataFrame) -> None:
    trials["cell"] = (
        trials.groupby(list(CONFIG_COLUMNS), dropna=False, sort=True).ngroup().astype(np.int64)
    )


def _varying_columns(trials: pd.DataFrame) -> list[str]:
    """Config columns that vary across the store, less those the optimizer alone determines
    (e.g. attn_scale mup for adamw-mup): labels name the optimizer already."""
    varying = [c for c in CONFIG_COLUMNS if trials[c].nunique(dropna=False) > 1]
    per_opt = trials.groupby("optimizer")
    return [c for c in varying if c == "optimizer" or (per_opt[c].nunique(dropna=False) > 1).any()]


def hparams_varying(trials: pd.DataFrame) -> dict[str, list[str]]:
    """Per optimizer, the hparams keys whose value varies (the rest is noise in a label)."""
    out: dict[str, list[str]] = {}
    for opt, group in trials.groupby("optimizer"):
        dicts = [json.loads(h) if h else {} for h in group["hparams"].unique()]
        keys = sorted({k for d in dicts for k in d})
        out[str(opt)] = [k for k in keys if len({json.dumps(d.get(k)) for d in dicts}) > 1]
    return out


def format_value(col: str, value: object) -> str:
    if isinstance(value, float | np.floating) and float(value).is_integer():
        value = int(value)
    return f"{_LABEL_NAMES.get(col, col)}={value}"


def _labels(trials: pd.DataFrame, varying: list[str]) -> pd.Series:
    """A short label per cell: the optimizer and the varying config values."""
    hp_keys = hparams_varying(trials) if "hparams" in varying else {}
    first = trials.drop_duplicates("cell").set_index("cell")
    labels = {}
    for cell, row in first.iterrows():
        parts = [str(row["optimizer"])]
        for col in varying:
            if col in ("optimizer", "hparams"):
                continue
            parts.append(format_value(col, row[col]))
        if hp_keys.get(str(row["optimizer"])):
            hp = json.loads(row["hparams"] or "{}")
            parts += [f"{k}={hp.get(k)}" for k in hp_keys[str(row["optimizer"])]]
        labels[cell] = " ".join(parts)
    return trials["cell"].map(labels)
