"""Early stopping (`execution: {scheduler: asha}`): Tune's ASHA, within each cell and seed.

ASHA (asynchronous successive halving, Li et al., arXiv 1810.05934) stops a trial at a rung
(a number of steps) when its validation loss there is worse than all but the best
1/reduction_factor of the trials that reached the rung before it. Across a whole sweep that
would compare a width-32 model with a width-128 one; here each cell (everything but lr) and
seed gets its own ASHA, so a trial competes only with the other lrs of its curve, at the same
initialisation and batch order. Its state lives for one run of the controller: a resumed sweep
starts its rungs afresh.

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
from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from sweeper.spec import Asha, TrialSpec
from sweeper.store import Store

METRIC = "val_loss"  # reported by the trainable at every evaluation, NaN at other rows
TIME = "step"


class PerCellAsha(FIFOScheduler):
    """One ASHA per cell and seed, its stops sent to the store as requests.

    One instance serves every round of a run (a search's rounds too), so a trial is compared
    with every earlier trial of its group in the run, not only those of its round.
    """

    def __init__(self, settings: Asha, store: Store):
        super().__init__()
        self.settings, self.store = settings, store
        self.asha: dict[str, ASHAScheduler] = {}
        self.specs: dict[str, TrialSpec] = {}  # the store's trial id -> the trial
        self.requested: set[str] = set()

    def _spec(self, trial: Any) -> TrialSpec:
        tid = trial.config["store_trial_id"]
        if tid not in self.specs:
            self.specs[tid] = TrialSpec.model_validate_json(trial.config["spec"])
        return self.specs[tid]

    def _of(self, trial: Any) -> ASHAScheduler:
        spec = self._spec(trial)
        group = f"{spec.cell} {spec.seed}"
        if group not in self.asha:
            self.asha[group] = ASHAScheduler(
                time_attr=TIME,
                metric=METRIC,
                mode="min",
                max_t=spec.steps,  # a cell's trials all train this many steps
                grace_period=max(1, round(self.settings.grace * spec.steps)),
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
        tid = self._spec(trial).trial_id
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
