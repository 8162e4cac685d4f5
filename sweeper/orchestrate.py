"""Running a sweep: which trials are left, and running them on Ray Tune or in this process.

The trainer knows nothing of Ray; this module adapts `run_trial` to Ray Tune (resources per
trial, retries, live metrics) and offers a plain sequential executor for debugging. Both store
results through the same `execute_trial`, so the store never depends on the executor.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sweeper.progress import SweepProgress
from sweeper.spec import SweepSpec, TrialSpec, expand
from sweeper.store import Store, TrialResult

Executor = Literal["ray", "local"]


class SweepError(RuntimeError):
    """A sweep that cannot start; the message says what to change."""


@dataclass
class Plan:
    spec: SweepSpec
    store: Store
    trials: list[TrialSpec]  # the whole grid
    todo: list[TrialSpec]  # not finished in the store yet
    data_error: str | None = None  # set only when planned with allow_missing_data

    @property
    def done(self) -> int:
        return len(self.trials) - len(self.todo)


def check_optimizer_settings(spec: SweepSpec) -> None:
    """Unknown optimizer settings, or values an optimizer refuses, are grid errors: catch them
    before anything runs by building each optimizer setting once on a tiny stand-in GPT."""
    from sweeper.models import GPT
    from sweeper.optim import accepted_hparams, build_optimizer

    tiny = GPT(vocab_size=16, width=8, depth=1, seq_len=4, head_dim=8)
    for name, axis in spec.grid.optimizer.items():
        accepted = accepted_hparams(name)
        settings = axis.settings()
        for key in settings:
            if key not in accepted:
                raise SweepError(
                    f"grid.optimizer.{name}.{key}: unknown setting for {name}; "
                    f"accepted: {', '.join(sorted(accepted))}"
                )
        for combo in itertools.product(*settings.values()):
            try:
                build_optimizer(
                    name, tiny, lr=axis.lrs()[0], **dict(zip(settings, combo, strict=True))
                )
            except (ValueError, TypeError) as err:
                raise SweepError(f"grid.optimizer.{name}: {err}") from None


def plan(spec: SweepSpec, results: str | None = None, *, allow_missing_data: bool = False) -> Plan:
    """Expand the grid and subtract what the store already holds. Writes nothing.

    With allow_missing_data (a dry run), data that is not there yet is reported in
    `data_error` instead of refused; the trial ids are then provisional.
    """
    from sweeper.data import DataError, fingerprint

    check_optimizer_settings(spec)
    data_error = None
    try:
        data_fp = fingerprint(spec.data)
    except (DataError, OSError) as err:
        if not allow_missing_data:
            raise SweepError(f"data: {err}") from None
        data_fp, data_error = "missing", str(err)
    store = Store(results or spec.results, spec.name)
    trials = expand(spec, data_fp)
    finished = store.finished_ids()
    todo = [t for t in trials if t.trial_id not in finished]
    return Plan(spec, store, trials, todo, data_error)


# --------------------------------------------------------------------------- one trial


def failed_result(error: str, started_at: datetime | None = None) -> TrialResult:
    now = datetime.now(timezone.utc)
    return TrialResult(
        status="failed",
        summary={"error": error, "started_at": started_at or now, "finished_at": now},
    )


def execute_trial(
    spec: TrialSpec, store: Store, report: Callable[[dict[str, Any]], None] | None = None
) -> str:
    """Train one trial and store it; returns its status. Exceptions propagate (for retries)."""
    from sweeper.train import run_trial

    result = run_trial(spec, sink=report)
    store.write_trial(spec, result)
    return result.status


def _error_text(err: BaseException) -> str:
    """The trial's own exception in one line (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()


# --------------------------------------------------------------------------- in-process


def run_local(p: Plan, progress: SweepProgress) -> None:
    """Run the trials one after another in this process, with the same retries as on Ray."""
    import torch

    torch.set_num_threads(max(1, int(p.spec.resources.cpu)))
    for trial in p.todo:
        progress.started(trial)
        started = datetime.now(timezone.utc)
        for attempt in range(p.spec.execution.retries + 1):
            try:
                status = execute_trial(trial, p.store)
                break
            except KeyboardInterrupt:
                raise
            except Exception as err:  # a broken trial must not stop the sweep
                if attempt == p.spec.execution.retries:
                    p.store.write_trial(trial, failed_result(_error_text(err), started))
                    status = "failed"
        progress.finished(trial, status)


# --------------------------------------------------------------------------- Ray Tune


def _trainable(config: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial, rows reported live, result stored."""
    import torch
    from ray import tune

    spec = TrialSpec.model_validate_json(config["trial"])
    torch.set_num_threads(config["threads"])
    store = Store(config["results"], spec.sweep)

    def report(row: dict[str, Any]) -> None:
        # Tune wants numbers; a missing validation loss is NaN, not None.
        tune.report({k: (float("nan") if v is None else v) for k, v in row.items()})

    status = execute_trial(spec, store, report)
    tune.report({"step": -1, "sweeper_status": status})


def check_resources(per_trial: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Refuse a request no node can meet: Ray would keep such trials pending forever."""
    total_gpu = sum(n.get("GPU", 0) for n in nodes)
    for key, name in (("CPU", "cpu"), ("GPU", "gpu")):
        want = per_trial.get(name, 0)
        best = max((n.get(key, 0) for n in nodes), default=0)
        if want > best:
            raise SweepError(
                f"each trial asks for {want:g} {key} (resources.{name}) but no Ray node has "
                f"that many: the largest has {best:g} {key}"
                + (f" and the cluster has {total_gpu:g} GPU in all" if key == "GPU" else "")
                + f". Lower resources.{name} in the grid file"
                + (" or attach to a cluster with GPUs (--address)." if key == "GPU" else ".")
            )


def run_ray(
    p: Plan,
    progress: SweepProgress,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    on_ready: Callable[[str | None], None] | None = None,
) -> None:
    from sweeper.cluster import ClusterError, ray_session

    try:
        with ray_session(
            address, num_cpus=num_cpus, dashboard=dashboard, dashboard_host=dashboard_host
        ) as ctx:
            _run_on_ray(p, progress, ctx, on_ready)
    except ClusterError as err:
        raise SweepError(str(err)) from None


def _run_on_ray(
    p: Plan, progress: SweepProgress, ctx: Any, on_ready: Callable[[str | None], None] | None
) -> None:
    import ray
    from ray import tune

    res = p.spec.resources
    per_trial = {"cpu": res.cpu, "gpu": res.gpu}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_resources(per_trial, nodes)
    if on_ready:
        url = getattr(ctx, "dashboard_url", None)
        on_ready(f"http://{url}" if url else None)

    by_id = {t.trial_id: t for t in p.todo}
    trainable = tune.with_resources(_trainable, per_trial)
    space = {
        "trial": tune.grid_search([t.model_dump_json() for t in p.todo]),
        "results": p.store.root,
        "threads": max(1, int(res.cpu)),
    }
    # Tune's experiment files (state, per-trial folders) are scratch: the store is the
    # record of what ran, so they live in a temporary folder removed afterwards.
    storage = tempfile.mkdtemp(prefix="sweeper-tune-")

    def trial_id(trial: Any) -> str:
        return TrialSpec.model_validate_json(trial.config["trial"]).trial_id

    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            max_concurrent_trials=p.spec.execution.max_concurrent,
            # One worker process serves trial after trial: no torch import per trial.
            reuse_actors=True,
            trial_name_creator=trial_id,
            trial_dirname_creator=trial_id,
        ),
        run_config=tune.RunConfig(
            name=p.spec.name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=p.spec.execution.retries),
            callbacks=[progress.tune_callback(by_id, trial_id)],
            verbose=0,
            progress_reporter=None,
        ),
    )
    try:
        results = tuner.fit()
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    # A trial that still raised after its retries is stored as failed; the others were
    # stored by the trial itself.
    finished = p.store.finished_ids()
    for result in results:
        if result.error is not None:
            tid = TrialSpec.model_validate_json(result.config["trial"]).trial_id
            if tid not in finished:
                p.store.write_trial(by_id[tid], failed_result(_error_text(result.error)))


def run_sweep(p: Plan, progress: SweepProgress, executor: Executor = "ray", **ray_options) -> None:
    """Run what the plan has left to do, then stop."""
    if not p.todo:
        return
    if executor == "local":
        if p.spec.resources.gpu > 0:
            import torch

            if not torch.cuda.is_available():
                raise SweepError(
                    f"resources.gpu is {p.spec.resources.gpu:g} but this machine has no CUDA GPU"
                )
        if ray_options.get("address") or ray_options.get("dashboard"):
            raise SweepError("--address and --dashboard apply to the Ray executor only")
        run_local(p, progress)
    else:
        run_ray(p, progress, **ray_options)
