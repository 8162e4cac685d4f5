"""The sweep's progress: one bar for the whole sweep and one line per finished trial."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sweeper.spec import TrialSpec


def describe(trial: TrialSpec) -> str:
    """A short label of what varies between trials."""
    lr = f"2^{math.log2(trial.lr):.1f}" if trial.lr > 0 else str(trial.lr)
    extra = " ".join(f"{k}={v}" for k, v in trial.hparams.items())
    return (
        f"{trial.optimizer} w={trial.width} d={trial.depth} B={trial.batch_size} "
        f"steps={trial.steps} lr={lr} seed={trial.seed}" + (f" {extra}" if extra else "")
    )


def member_label(trial: TrialSpec) -> str:
    """How a bundle's reports name a member's metrics: `log2lr-7-s0/train_loss` (characters
    every tracker keeps in a metric's name)."""
    return f"log2lr{math.log2(trial.lr):g}-s{trial.seed}"


def _last_line(path: str | None) -> str:
    """The exception line at the end of a traceback file, if there is one."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, TypeError):
        return ""
    return lines[-1].strip() if lines else ""


class SweepProgress:
    """Counts trials by state and draws them; the executors call started and finished."""

    def __init__(self, name: str, total: int, already_done: int, console: Console):
        self.console = console
        self.counts: Counter[str] = Counter()
        self.running: dict[str, float] = {}
        self.total = total
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[counts]}"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._progress.add_task(name, total=total, completed=already_done, counts="")
        self._refresh()

    def __enter__(self) -> SweepProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def _refresh(self) -> None:
        c = self.counts
        text = (
            f"running {len(self.running)}  completed {c['completed']}  "
            f"diverged {c['diverged']}  "
            + (f"stopped {c['stopped']}  " if c["stopped"] else "")
            + f"failed {c['failed']}"
        )
        self._progress.update(self._task, counts=text)

    def started(self, trial: TrialSpec) -> None:
        self.running[trial.trial_id] = time.monotonic()
        self._refresh()

    def finished(self, trial: TrialSpec, status: str, note: str = "") -> None:
        began = self.running.pop(trial.trial_id, time.monotonic())
        self.counts[status] += 1
        self._progress.advance(self._task)
        colour = {"completed": "green", "diverged": "yellow", "stopped": "cyan"}.get(status, "red")
        self.console.print(
            f"[{colour}]{status:>9}[/] {describe(trial)}  ({time.monotonic() - began:.1f} s)"
            + (f"  {note}" if note else ""),
            highlight=False,
        )
        self._refresh()

    def ended(self) -> None:
        """The sweep ran to its end: a search's total (the most it could run) becomes what it
        ran, so the bar ends full instead of estimating time for trials never proposed."""
        self._progress.update(self._task, total=self._progress.tasks[0].completed)

    def retried(self, trial: TrialSpec) -> None:
        self.console.print(f"[red]    retry[/] {describe(trial)}", highlight=False)

    def tune_callback(
        self,
        by_id: dict[str, list[TrialSpec]],
        trial_id: Callable[[Any], str],
        stored: Callable[[], dict[str, str]],
    ) -> Any:
        """A Ray Tune callback feeding this progress from the controller's events; a Tune
        trial is a bundle of one or more of the sweep's trials (`by_id`), each counted.
        `stored()` maps the store's trial ids to their statuses: a bundle that raised may have
        stored some members first (one that diverged, say), and those are not failures."""
        from ray import tune

        class _Callback(tune.Callback):
            def __init__(self, progress: SweepProgress):
                self.progress = progress

            def __getstate__(self) -> dict:
                # Tune pickles its callbacks with the experiment state; a console can't be
                # pickled, and a restored experiment draws no progress anyway.
                return {"progress": None}

            def _members(self, trial: Any) -> list[TrialSpec]:
                return by_id.get(trial_id(trial), []) if self.progress else []

            def on_trial_start(self, iteration, trials, trial, **info):  # noqa: ANN001
                for spec in self._members(trial):
                    self.progress.started(spec)

            def on_trial_recover(self, iteration, trials, trial, **info):  # noqa: ANN001
                for spec in self._members(trial):
                    self.progress.retried(spec)

            def on_trial_complete(self, iteration, trials, trial, **info):  # noqa: ANN001
                last = trial.last_result or {}
                status = last.get("status", "completed")
                for spec in self._members(trial):
                    # a bundle's last report has each member's status under its label
                    self.progress.finished(spec, last.get(f"{member_label(spec)}/status", status))

            def on_trial_error(self, iteration, trials, trial, **info):  # noqa: ANN001
                members = self._members(trial)
                done = stored() if len(members) > 1 else {}
                for spec in members:
                    if spec.trial_id in done:
                        self.progress.finished(spec, done[spec.trial_id])
                    else:
                        self.progress.finished(spec, "failed", _last_line(trial.error_file))

        return _Callback(self)
