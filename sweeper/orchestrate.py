"""Running a sweep: which trials are left, and running them on Ray Tune or in this process.

The trainer knows nothing of Ray; this module adapts `run_trial` to Ray Tune (resources per
trial, retries, live metrics) and offers a plain sequential executor for debugging. Both store
results through the same `execute_trial`, so the store never depends on the executor.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import shutil
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from sweeper.progress import SweepProgress, member_label
from sweeper.search import Search, SearchError, make_search
from sweeper.spec import ROLE_LRS, SweepSpec, TrialSpec, expand
from sweeper.store import Store, StoreError, StoreLocked, TrialResult
from sweeper.trackers import Tracking

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
    running: str | None = None  # the controller running this sweep now, in words
    search: Search | None = None  # an adaptive search: todo is its first round

    @property
    def total(self) -> int:
        """Trials the sweep will have when done (a search's: at most)."""
        return self.search.max_trials if self.search else len(self.trials)

    @property
    def done(self) -> int:
        return self.search.n_stored if self.search else len(self.trials) - len(self.todo)

    def rounds(self) -> Iterator[list[TrialSpec]]:
        """The trials to run, a round at a time: the whole grid at once, or a search's rounds
        until it proposes nothing (each round is planned from what the store holds then)."""
        todo = self.todo
        while todo:
            yield todo
            if self.search is None:
                return
            todo = self.search.propose()


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
    from sweeper.data import DataError, check_length, fingerprint

    check_optimizer_settings(spec)
    try:
        store = Store(results or spec.results, spec.name)
        store.check_usable()
    except StoreError as err:
        raise SweepError(f"results: {err}") from None
    data_error = None
    try:
        data_fp = fingerprint(spec.data)
        check_length(spec.data, spec.model.seq_len)
    except (DataError, OSError) as err:
        if not allow_missing_data:
            raise SweepError(f"data: {err}") from None
        data_fp, data_error = "missing", str(err)
    trials = expand(spec, data_fp)
    running = store.holder()
    try:
        search = make_search(spec, trials, store)
    except SearchError as err:
        raise SweepError(str(err)) from None
    if search:
        return Plan(
            spec, store, trials, search.propose(retry_failed=True), data_error, running, search
        )
    finished = store.finished_ids()
    todo = [t for t in trials if t.trial_id not in finished]
    return Plan(spec, store, trials, todo, data_error, running)


# --------------------------------------------------------------------------- one trial


def failed_result(error: str, started_at: datetime | None = None) -> TrialResult:
    now = datetime.now(timezone.utc)
    return TrialResult(
        status="failed",
        summary={"error": error, "started_at": started_at or now, "finished_at": now},
    )


def execute_trial(
    spec: TrialSpec,
    store: Store,
    report: Callable[[dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrialResult:
    """Train one trial and store it. Exceptions propagate (for retries)."""
    from sweeper.train import run_trial

    result = run_trial(spec, sink=report, should_stop=should_stop)
    store.write_trial(spec, result)
    return result


def execute_bundle(
    members: list[TrialSpec],
    store: Store,
    reports: list[Callable[[dict[str, Any]], None] | None] | None = None,
    stored: dict[str, str] | None = None,
    share: float = 1.0,
) -> list[TrialResult]:
    """Train a bundle (trials of one cell, as one model) and store each member as its own
    trial; as many members as fit in the memory of `share` of the device train at once
    (train.members_that_fit), the rest after them. `stored` (trial id -> status) is filled as
    members are stored, so a caller that retries after an error knows which are done.
    Exceptions propagate."""
    from sweeper.train import members_that_fit, run_bundle

    reports = reports or [None] * len(members)
    results: list[TrialResult] = []
    size = members_that_fit(members[0], len(members), share)
    for i in range(0, len(members), size):
        done = run_bundle(members[i : i + size], reports[i : i + size])
        for spec, result in zip(members[i : i + size], done, strict=True):
            store.write_trial(spec, result)
            if stored is not None:
                stored[spec.trial_id] = result.status
        results += done
    return results


# --------------------------------------------------------------------------- bundles


def _share(spec: SweepSpec) -> float:
    """The share of its device one trial is given: its GPU fraction, or its CPUs' share."""
    if spec.resources.gpu > 0:
        return spec.resources.gpu
    return spec.resources.cpu / (os.cpu_count() or 1)


def bundles(trials: list[TrialSpec], size: int) -> list[list[TrialSpec]]:
    """The trials in bundles of at most `size`, each of one cell (its members differ in lr and
    seed only): as few per cell as the size allows, of even sizes, a seed's members side by
    side (they share batches). Cells keep the order of the trials."""
    if size <= 1:
        return [[t] for t in trials]
    cells: dict[str, list[TrialSpec]] = defaultdict(list)
    for t in trials:
        cells[t.cell].append(t)
    out = []
    for members in cells.values():
        members.sort(key=lambda t: (t.seed, t.lr))
        n = math.ceil(len(members) / size)
        q, r = divmod(len(members), n)
        starts = [j * q + min(j, r) for j in range(n + 1)]
        out += [members[a:b] for a, b in itertools.pairwise(starts)]
    return out


def _stopped(err: StoreError, store: Store) -> SweepError:
    try:
        stored = f"the {len(store.trial_ids())} trials stored"
    except OSError:  # the store may be out of reach altogether
        stored = "what was stored"
    return SweepError(
        f"{err}. The sweep stopped at the first write that failed: {stored} are intact. Make "
        "room (or fix the folder, or the connection) and run the same command again to finish it."
    )


@contextlib.contextmanager
def _claimed(p: Plan, grid_text: str | None) -> Iterator[None]:
    """Be the store's one controller while the block runs; drop from the plan what another
    run stored since it was made, and prepare the store."""
    try:
        with p.store.lock():
            if p.search:
                p.todo = p.search.propose(retry_failed=True)
            else:
                finished = p.store.finished_ids()
                p.todo = [t for t in p.todo if t.trial_id not in finished]
            p.store.prepare(grid_text)
            yield
    except StoreLocked as err:
        raise SweepError(str(err)) from None
    except StoreError as err:
        raise _stopped(err, p.store) from None


def _error_text(err: BaseException) -> str:
    """The trial's own exception in one line (Ray wraps it in a RayTaskError)."""
    cause = getattr(err, "cause", None) or err
    return "".join(traceback.format_exception_only(type(cause), cause)).strip()


# --------------------------------------------------------------------------- in-process


def run_local(p: Plan, progress: SweepProgress, trials: list[TrialSpec]) -> None:
    """Run the trials (in bundles) one after another in this process, with the same retries
    as on Ray."""
    import torch

    torch.set_num_threads(max(1, int(p.spec.resources.cpu)))
    for members in bundles(trials, p.spec.bundle_size):
        for trial in members:
            progress.started(trial)
        started = datetime.now(timezone.utc)
        statuses: dict[str, str] = {}
        for attempt in range(p.spec.execution.retries + 1):
            try:  # a retry runs the members not stored yet
                todo = [t for t in members if t.trial_id not in statuses]
                execute_bundle(todo, p.store, stored=statuses, share=_share(p.spec))
                break
            except (KeyboardInterrupt, StoreError):
                raise  # retrying cannot help a full or read-only disk
            except Exception as err:  # a broken trial must not stop the sweep
                if attempt == p.spec.execution.retries:
                    for trial in members:
                        if trial.trial_id not in statuses:
                            p.store.write_trial(trial, failed_result(_error_text(err), started))
                            statuses[trial.trial_id] = "failed"
        for trial in members:
            progress.finished(trial, statuses[trial.trial_id])


# --------------------------------------------------------------------------- Ray Tune


# What Tune shows of a trial (the dashboard, its result tables, trackers): flat scalars.
_SHOWN = ("optimizer", "model", "width", "depth", "batch_size", "seq_len", "steps", "lr", "seed")


def tune_config(trial: TrialSpec) -> dict[str, Any]:
    """The trial as Tune's config: what varies, as flat scalars, plus the whole spec as JSON."""
    # "trial_id" is Tune's own name for its trials (W&B and others would show Tune's instead)
    config: dict[str, Any] = {"store_trial_id": trial.trial_id}
    config.update({k: getattr(trial, k) for k in _SHOWN})
    config["log2_lr"] = math.log2(trial.lr)
    config.update({k: getattr(trial, k) for k in ROLE_LRS if getattr(trial, k) != 1.0})
    config.update(trial.hparams)  # optimizer settings: beta1, momentum, ... (never the above)
    config["spec"] = trial.model_dump_json()
    return config


def bundle_config(members: list[TrialSpec]) -> dict[str, Any]:
    """A bundle as Tune's config: what its members share as flat scalars, their lrs and seeds
    as text, and the members' specs as one JSON list (Tune reads a list in a config as more
    config to expand)."""
    config = tune_config(members[0])
    for key in ("lr", "log2_lr", "seed", "spec"):
        del config[key]
    config["members"] = len(members)
    config["lrs"] = " ".join(f"{t.lr:g}" for t in members)
    config["seeds"] = " ".join(str(t.seed) for t in members)
    config["specs"] = json.dumps([t.model_dump(mode="json") for t in members])
    return config


def trial_name(trial: TrialSpec, varying: set[str]) -> str:
    """`adamw-w128-lr2^-7-s0`, with depth, batch, steps and settings when the sweep varies them."""
    return _name(trial, varying, f"lr2^{math.log2(trial.lr):g}", f"s{trial.seed}")


def bundle_name(members: list[TrialSpec], varying: set[str]) -> str:
    """`adamw-w128-lr2^-9..-6-s0..2-x8`: a bundle by its members' lrs and seeds; one member's
    is its trial's name."""
    if len(members) == 1:
        return trial_name(members[0], varying)
    lrs = sorted(math.log2(t.lr) for t in members)
    seeds = sorted(t.seed for t in members)
    return (
        _name(members[0], varying, f"lr2^{lrs[0]:g}..{lrs[-1]:g}", f"s{seeds[0]}..{seeds[-1]}")
        + f"-x{len(members)}"
    )


def _name(trial: TrialSpec, varying: set[str], lr: str, seed: str) -> str:
    parts = [trial.optimizer, f"w{trial.width}", lr]
    for key, short in (("depth", "d"), ("batch_size", "b"), ("steps", "t"), ("model", "")):
        if key in varying:
            parts.append(f"{short}{getattr(trial, key)}")
    parts += [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in _settings(trial)]
    parts.append(seed)
    return "-".join(parts)


def _settings(trial: TrialSpec) -> list[tuple[str, Any]]:
    roles = [(k.removeprefix("lr_"), getattr(trial, k)) for k in ROLE_LRS]
    return [(k, v) for k, v in roles if v != 1.0] + sorted(trial.hparams.items())


def _varying(trials: list[TrialSpec]) -> set[str]:
    return {
        k
        for k in ("depth", "batch_size", "steps", "model")
        if len({getattr(t, k) for t in trials}) > 1
    }


def _trainable(
    config: dict[str, Any], results: str, threads: int, asha: bool, share: float
) -> None:
    """The Ray Tune function trainable: one trial, or a bundle of them, its rows reported live
    and its results stored.

    Each log row is one Tune result; the last one also carries the trial's summary (final and
    best losses, norms, times) and its `status`, so Tune's tables and trackers end on it.
    A bundle reports one result per step, each member's row under its label
    (`log2lr-7-s0/train_loss`), and the last one each member's `<label>/status`.
    With `asha`, a stop the scheduler requested ends the trial at its next row (sweeper.asha).
    """
    import torch
    from ray import tune

    torch.set_num_threads(threads)
    if "specs" in config:
        _train_bundle(config, results, share)
        return
    spec = TrialSpec.model_validate_json(config["spec"])
    store = Store(results, spec.sweep)
    held: list[dict[str, Any]] = []  # the latest row, held back until the next one comes

    def report(row: dict[str, Any]) -> None:
        if held:
            tune.report(_numbers(held.pop()))
        held.append(row)

    def should_stop() -> bool:
        return store.stop_requested(spec.trial_id)

    try:
        result = execute_trial(spec, store, report, should_stop if asha else None)
    except StoreError as err:
        # Retrying cannot help a full or read-only disk: the controller stops the sweep.
        tune.report(
            {**_numbers(held[0] if held else {}), "status": "not stored", "store_error": str(err)}
        )
        return
    summary = {k: v for k, v in result.summary.items() if isinstance(v, int | float) or v is None}
    tune.report({**_numbers({**(held[0] if held else {}), **summary}), "status": result.status})


def _train_bundle(config: dict[str, Any], results: str, share: float) -> None:
    from ray import tune

    members = [TrialSpec.model_validate(s) for s in json.loads(config["specs"])]
    store = Store(results, members[0].sweep)
    labels = [member_label(t) for t in members]
    pending: dict[str, Any] = {}  # this step's rows, reported when the next step's come

    def reporter(label: str) -> Callable[[dict[str, Any]], None]:
        def report(row: dict[str, Any]) -> None:
            if pending and pending["step"] != row["step"]:
                tune.report(_numbers(pending))
                pending.clear()
            pending["step"] = row["step"]
            pending.update({f"{label}/{k}": v for k, v in row.items() if k != "step"})

        return report

    try:
        done = execute_bundle(members, store, [reporter(lb) for lb in labels], share=share)
    except StoreError as err:
        tune.report({**_numbers(pending), "status": "not stored", "store_error": str(err)})
        return
    statuses = {f"{lb}/status": r.status for lb, r in zip(labels, done, strict=True)}
    tune.report({**_numbers(pending), **statuses, "status": "done"})


def _numbers(row: dict[str, Any]) -> dict[str, Any]:
    # Tune and trackers want numbers: a missing value (a step without validation) is NaN.
    return {k: (float("nan") if v is None else v) for k, v in row.items()}


def _tune_scratch() -> str:
    """A new folder for Tune's experiment files, which are scratch (the store is the record);
    the folders of controllers that were killed before removing theirs go first."""
    for old in Path(tempfile.gettempdir()).glob("sweeper-tune-*-*"):
        pid = old.name.split("-")[2]
        if pid.isdigit() and old.stat().st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"sweeper-tune-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    grid_text: str | None = None,
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    on_ready: Callable[[str | None], None] | None = None,
    tracking: Tracking | None = None,
) -> None:
    from sweeper.cluster import ClusterError, ray_session

    try:
        with ray_session(
            address, num_cpus=num_cpus, dashboard=dashboard, dashboard_host=dashboard_host
        ) as ctx:
            import ray

            per_trial = {"cpu": p.spec.resources.cpu, "gpu": p.spec.resources.gpu}
            check_resources(per_trial, [n["Resources"] for n in ray.nodes() if n.get("Alive")])
            with _claimed(p, grid_text):
                if on_ready:
                    url = getattr(ctx, "dashboard_url", None)
                    on_ready(f"http://{url}" if url else None)
                scheduler = None
                if p.spec.execution.scheduler == "asha":
                    from sweeper.asha import PerCellAsha

                    scheduler = PerCellAsha(p.spec.execution.asha, p.store)
                _tune(p, progress, per_trial, tracking, scheduler)
    except ClusterError as err:
        raise SweepError(str(err)) from None


def _plan_feed(p: Plan, by_id: dict[str, list[TrialSpec]]) -> Any:
    """Tune's source of trials for the whole run: one bundle (most often of one trial) per
    suggestion, registered in `by_id` under its first member's id; a grid's bundles at once, a
    search's rounds as they come. One Tune experiment serves every round, so its workers (torch
    imported, data loaded) stay up from one round to the next, and a cell plans its next
    round as soon as its own trials are stored, while others still run."""
    from collections import deque

    from ray.tune.search import Searcher

    class PlanFeed(Searcher):
        def __init__(self) -> None:
            super().__init__()
            self.queue = deque(bundles(p.todo, p.spec.bundle_size))
            self.in_flight: dict[str, list[TrialSpec]] = {}  # Tune's trial id -> bundle
            self.failed: set[str] = set()  # trials that raised: stored as failed after the run
            self.changed = False  # a cell's round ended since the search last planned

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if not self.queue and p.search is not None and self.changed:
                self.changed = False
                self.queue.extend(bundles(self.next_round(), p.spec.bundle_size))
            if not self.queue:
                return None if self.in_flight else Searcher.FINISHED
            members = self.queue.popleft()
            self.in_flight[trial_id] = members
            by_id[members[0].trial_id] = members
            return tune_config(members[0]) if len(members) == 1 else bundle_config(members)

        def next_round(self) -> list[TrialSpec]:
            """What the search proposes now, but in the cells that have trials running (their
            round is not over) and none that raised in this run."""
            running = [t for members in self.in_flight.values() for t in members]
            busy = {t.cell for t in running} | {t.trial_id for t in running}
            return [
                t
                for t in p.search.propose()
                if t.cell not in busy and t.trial_id not in busy | self.failed
            ]

        def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
            pass  # nothing to keep: the store is the record, and no run restores Tune's files

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            members = self.in_flight.pop(trial_id, [])
            if error:
                self.failed |= {t.trial_id for t in members}
            # Plan again (the store read and the fits) only when a cell's round is over.
            running = {t.cell for bundle in self.in_flight.values() for t in bundle}
            self.changed |= any(t.cell not in running for t in members)

    return PlanFeed()


def _tune(
    p: Plan,
    progress: SweepProgress,
    per_trial: dict[str, float],
    tracking: Tracking | None,
    scheduler: Any = None,
) -> None:
    """Run the plan's trials (a search's every round) as one Tune experiment, then store
    those that raised as failed. Raises KeyboardInterrupt when Tune ended it early on Ctrl+C
    (trials left unfinished)."""
    from ray import tune

    by_id: dict[str, list[TrialSpec]] = {}  # a bundle by its first member's id, as suggested
    varying = _varying(p.trials)

    def trial_id(trial: Any) -> str:
        return trial.config["store_trial_id"]

    class StopOnStoreError(tune.Stopper):
        """The whole experiment stops at the first trial that could not store its rows."""

        first: str | None = None

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.first = self.first or result.get("store_error")
            return False

        def stop_all(self) -> bool:
            return self.first is not None

    store_errors = StopOnStoreError()
    # Tune's experiment files are scratch (the store is the record), unless a tracker reads them.
    keep = tracking is not None and tracking.keeps_tune_folder
    storage = tracking.tune_folder if keep else _tune_scratch()
    trainable = tune.with_parameters(
        _trainable,
        results=p.store.root,
        threads=max(1, int(per_trial["cpu"])),
        asha=scheduler is not None,
        share=_share(p.spec),
    )
    tuner = tune.Tuner(
        tune.with_resources(trainable, per_trial),
        tune_config=tune.TuneConfig(
            # Each config is given whole (a grid_search would take the cartesian product of
            # the keys, which is not the sweep's: each optimizer has its settings).
            search_alg=_plan_feed(p, by_id),
            max_concurrent_trials=p.spec.execution.max_concurrent,
            scheduler=scheduler,
            num_samples=max(p.total, 1),  # a bound: the feed says when it is done
            # One worker process serves trial after trial: no torch import per trial.
            reuse_actors=True,
            trial_name_creator=lambda trial: bundle_name(by_id[trial_id(trial)], varying),
            trial_dirname_creator=trial_id,
        ),
        run_config=tune.RunConfig(
            name=p.spec.name,
            storage_path=storage,
            stop=store_errors,
            failure_config=tune.FailureConfig(max_failures=p.spec.execution.retries),
            callbacks=[
                progress.tune_callback(by_id, trial_id, lambda: _stored_statuses(p.store)),
                *(tracking.callbacks() if tracking else []),
            ],
            verbose=0,
            progress_reporter=None,
        ),
    )
    try:
        results = tuner.fit()
    except Exception as err:
        if tracking is None:
            raise
        # A tracker that cannot write (a bad URI, a full disk) fails inside Tune's callbacks.
        raise SweepError(
            f"the run stopped ({', '.join(tracking.names)}): {_error_text(err)}"
        ) from None
    finally:
        if not keep:
            shutil.rmtree(storage, ignore_errors=True)
    if store_errors.first:
        raise StoreError(store_errors.first)
    # A trial that still raised after its retries is stored as failed (each member of a bundle
    # not stored before the error); the others were stored by the trial itself.
    finished = p.store.finished_ids()
    for result in results:
        if result.error is not None:
            for member in by_id[result.config["store_trial_id"]]:
                if member.trial_id not in finished:
                    p.store.write_trial(member, failed_result(_error_text(result.error)))
    # Tune ends an experiment early on Ctrl+C and returns: trials neither finished (their last
    # report carries a status) nor failed. The sweep was interrupted: say so.
    if any(r.error is None and "status" not in (r.metrics or {}) for r in results):
        raise KeyboardInterrupt


def _stored_statuses(store: Store) -> dict[str, str]:
    """Every stored trial's status by id; none when the store cannot be read (the sweep's own
    write errors say why)."""
    try:
        return {
            r["trial_id"]: r["status"]
            for r in store.read("trials", ["trial_id", "status"]).to_pylist()
        }
    except StoreError:
        return {}


def _asha_can_stop(t: TrialSpec, grace: float) -> bool:
    """Whether ASHA could stop trial `t`: it judges evaluated rows from grace x steps on, and
    the trial reads a stop after its next row, which must come before the last."""
    first = max(1, round(grace * t.steps))
    k = max(1, math.ceil(first / t.eval_every) - 1)
    # an evaluation falls on the first log row at or after each multiple of eval_every
    rows = [math.ceil(j * t.eval_every / t.log_every) * t.log_every for j in (k, k + 1)]
    row = min((r for r in rows if r >= first), default=None)
    return row is not None and row + t.log_every < t.steps


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def preflight(p: Plan, executor: Executor = "ray", **ray_options: Any) -> None:
    """Refuse, before anything starts or is printed, a plan that cannot run here: a store
    another controller holds, a device or GPU the executor cannot give. (What a Ray cluster
    has is checked once Ray is up, still before anything is written.)"""
    if p.running:  # `_claimed` is the real check, this one refuses before Ray starts
        raise SweepError(str(StoreLocked(p.store.path, p.running)))
    if p.spec.train.device == "cuda" and executor == "ray" and p.spec.resources.gpu == 0:
        raise SweepError(
            "train.device is cuda but resources.gpu is 0: give each trial a GPU (or a fraction)"
        )
    asha = p.spec.execution.asha
    if p.spec.execution.scheduler == "asha" and not any(
        _asha_can_stop(t, asha.grace)
        for t in {(t.steps, t.log_every, t.eval_every): t for t in p.trials}.values()
    ):
        raise SweepError(
            "execution.scheduler asha could stop no trial: none evaluates (train.eval_every) "
            f"after {asha.grace:g} of its steps (asha.grace) with a log row (train.log_every) "
            "still to come before its last. Evaluate more often, or lower asha.grace"
        )
    if executor == "ray":
        return
    if p.spec.execution.scheduler == "asha":
        raise SweepError(
            "execution.scheduler asha is Ray Tune's: run without --executor local (or drop it)"
        )
    if (p.spec.train.device == "cuda" or p.spec.resources.gpu > 0) and not _cuda_here():
        asked = (
            "train.device is cuda"
            if p.spec.train.device == "cuda"
            else (f"resources.gpu is {p.spec.resources.gpu:g}")
        )
        raise SweepError(f"{asked} but this machine has no CUDA GPU")
    if ray_options.get("address") or ray_options.get("dashboard"):
        raise SweepError("--address and --dashboard apply to the Ray executor only")


def run_sweep(
    p: Plan,
    progress: SweepProgress,
    executor: Executor = "ray",
    grid_text: str | None = None,
    **ray_options: Any,
) -> None:
    """Check that the plan can run, become the store's one controller, run what is left, stop.

    Nothing is written before the checks pass (`preflight`, the cluster's resources, the
    lock); `grid_text` is kept in the store as the grid of this run.
    """
    if not p.todo:
        return
    preflight(p, executor, **ray_options)
    if executor == "ray":
        run_ray(p, progress, grid_text, **ray_options)
        return
    with _claimed(p, grid_text):
        for trials in p.rounds():
            run_local(p, progress, trials)
