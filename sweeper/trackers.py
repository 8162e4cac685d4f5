"""Experiment trackers: every trial's rows streamed to TensorBoard, MLflow or W&B.

Ray Tune's own logger callbacks do the work; this module picks them, checks that their package
is installed before anything runs, and says where each one writes. The store stays the record
of the sweep: a tracker is a view of it for people who live in those tools.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sweeper.store import Store

TRACKERS = ("tensorboard", "mlflow", "wandb")
_PACKAGES = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}
_INSTALL = {
    "tensorboard": "pip install tensorboardX",
    "mlflow": "pip install mlflow-skinny (or mlflow)",
    "wandb": "pip install wandb",
}


class TrackerError(ValueError):
    """A tracker that is unknown or not installed; the message says what to do."""


@dataclass(frozen=True)
class Tracking:
    """The trackers of one run and where they write."""

    names: tuple[str, ...]
    sweep: str
    store_path: str  # the sweep's folder: TensorBoard's files go under it, in tune/

    @property
    def keeps_tune_folder(self) -> bool:
        # TensorBoard reads the event files Tune writes into each trial's folder.
        return "tensorboard" in self.names

    @property
    def tune_folder(self) -> str:
        return f"{self.store_path}/tune"

    def where(self) -> list[str]:
        """One line per tracker: where to look."""
        lines = []
        for name in self.names:
            if name == "tensorboard":
                lines.append(f"TensorBoard: tensorboard --logdir {self.tune_folder}")
            elif name == "mlflow":
                lines.append(f"MLflow: experiment {self.sweep!r} at {_mlflow_uri()}")
            elif _wandb_mode() == "offline":
                runs = _wandb_dir() / "wandb" / "offline-run-*"
                lines.append(
                    f"W&B: project {self.sweep!r}, offline (upload later: wandb sync {runs})"
                )
            else:
                lines.append(f"W&B: project {self.sweep!r}, {_wandb_mode()}")
        return lines

    def callbacks(self) -> list[Any]:
        """Ray Tune logger callbacks, one per tracker."""
        out: list[Any] = []
        for name in self.names:
            if name == "tensorboard":
                from ray.tune.logger import TBXLoggerCallback

                out.append(TBXLoggerCallback())
            elif name == "mlflow":
                from ray.air.integrations.mlflow import MLflowLoggerCallback

                out.append(MLflowLoggerCallback(_mlflow_uri(), experiment_name=self.sweep))
            else:
                from ray.air.integrations.wandb import WandbLoggerCallback

                mode = _wandb_mode()
                # Ray's callback looks for a login unless the mode is offline in the env.
                os.environ["WANDB_MODE"] = mode
                out.append(
                    WandbLoggerCallback(project=self.sweep, mode=mode, dir=str(_wandb_dir()))
                )
        return out


def tracking_for(names: list[str], sweep: str, store: Store) -> Tracking:
    """Check the requested trackers (known, installed) before anything runs."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)}")
    for name in names:
        if importlib.util.find_spec(_PACKAGES[name]) is None:
            raise TrackerError(
                f"--tracker {name} needs the {_PACKAGES[name]} package: {_INSTALL[name]}"
            )
    store_path = f"{store.root.rstrip('/')}/{store.name}"  # a local path or a URI, as Tune takes
    return Tracking(tuple(dict.fromkeys(names)), sweep, store_path)


def _mlflow_uri() -> str:
    # MLflow's own variable wins; otherwise a local database where the command runs, MLflow's
    # own default (its mlruns/ folder store is frozen and refused by MLflow 3.x).
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _wandb_dir() -> Path:
    return Path(os.environ.get("WANDB_DIR", Path.cwd()))


def _wandb_mode() -> str:
    """W&B's mode: the user's WANDB_MODE, else online when logged in, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path("~/.netrc").expanduser()
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace")
    )
    return "online" if logged_in else "offline"
