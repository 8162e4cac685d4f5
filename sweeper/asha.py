"""Early stopping (`execution: {scheduler: asha}`): Tune's ASHA, within each cell and seed.

ASHA (asynchronous successive halving, Li et al., arXiv 1810.05934) stops a trial at a rung
(a number of steps) when its validation loss there is worse than all but the best
1/reduction_factor of the trials that reached the rung before it. Across a whole sweep that
would compare a width-32 model with a width-128 one; here each cell (everything but lr) and
seed gets its own ASHA, so a trial competes only with the other lrs of its curve, at the same
initialisation and batch order.

Tune stops a trial by ending its worker, which could cut the trial off before it stores its
rows. So the scheduler never stops a trial itself: it asks the trial to stop (a request file in
the store, `Store.request_stop`), and the trial, after its next log row, stores what it has with
status `stopped` and returns. (A trial whose next row is its last, or its divergence, ends as
that: completed or diverged.) A stopped trial is finished: the analysis leaves it out of the
fits (its curve was cut short), and resume does not run it again.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from sweeper.spec import Asha
from sweeper.store import Store

METRIC = "val_loss"  # reported by the trainable at every evaluation, NaN at other rows
TIME = "step"


class PerCellAsha(FIFOScheduler):
    """One ASHA per group of trials (`group_of`: a cell and seed), its stops sent as requests."""

    def __init__(
        self,
        settings: Asha,
        max_steps: int,
        store: Store,
        store_id: Callable[[Any], str],
        group_of: Callable[[Any], str],
    ):
        super().__init__()
        self.settings, self.max_steps, self.store = settings, max_steps, store
        self.store_id, self.group_of = store_id, group_of
        self.asha: dict[str, ASHAScheduler] = {}
        self.requested: set[str] = set()

    def _of(self, trial: Any) -> ASHAScheduler:
        group = self.group_of(trial)
        if group not in self.asha:
            self.asha[group] = ASHAScheduler(
                time_attr=TIME,
                metric=METRIC,
                mode="min",
                max_t=self.max_steps,
                grace_period=max(1, round(self.settings.grace * self.max_steps)),
                reduction_factor=self.settings.reduction_factor,
                # A trial at its last step is finishing: there is nothing left to save.
                stop_last_trials=False,
            )
        return self.asha[group]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if "status" in result or not math.isfinite(result.get(METRIC, math.nan)):
            return TrialScheduler.CONTINUE  # its final report, or a row without evaluation
        decision = self._of(trial).on_trial_result(tune_controller, trial, result)
        tid = self.store_id(trial)
        if decision == TrialScheduler.STOP and tid not in self.requested:
            self.requested.add(tid)
            # A request that cannot be written only lets the trial run to its end.
            with contextlib.suppress(OSError):
                self.store.request_stop(tid)
        return TrialScheduler.CONTINUE

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._forget(trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._forget(trial)

    def _forget(self, trial: Any) -> None:
        # What the trial recorded at its rungs stays: later trials are compared with it. (A
        # trial retried after an error keeps its entry: Tune does not add it again.)
        self._of(trial)._trial_info.pop(trial.trial_id, None)
