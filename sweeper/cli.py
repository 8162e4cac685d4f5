"""The `sweep` command: run a grid, see where it stands, analyse and report it.

Bad input (grid file, data, resources) gives one message and exit code 2; a sweep with failed
trials exits 1; an interrupted one exits 130 and resumes when the same command runs again.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sweeper.spec import SpecError, SweepSpec, TrialSpec, load_spec

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags shown as flags, not `--dry-run <bool>`
)
# Logs and pipes get wide tables instead of rich's 80-column default.
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
console = Console(highlight=False, soft_wrap=True, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, width=_WIDTH)

EXIT_BAD_INPUT = 2


def _print_version(value: bool) -> None:
    if value:
        import platform

        from sweeper import __version__

        console.print(f"sweep {__version__} (Python {platform.python_version()})")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """Hyperparameter-transfer sweeps: grid file -> Ray Tune -> Parquet store -> report."""
    # Warnings (a damaged file skipped, ...) as one line each, without Python's source line.

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}")

    warnings.showwarning = show


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _load(grid: Path) -> SweepSpec:
    try:
        return load_spec(grid)
    except SpecError as err:
        _fail(str(err))


def _octave(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def _bundling(spec: SweepSpec) -> str:
    """How the trials train, when not one by one, or why not when bundles were asked for."""
    size = spec.bundle_size
    if size > 1:
        return f", in bundles of up to {size} (a cell's trials as one model)"
    if spec.execution.bundle != 1 and spec.execution.scheduler != "asha":
        return (
            " one by one (execution.bundle applies on GPUs: on CPUs batching costs more than "
            "it saves; execution.bundle_on_cpu: true bundles anyway)"
        )
    return ""


def _cells_table(trials: list[TrialSpec], finished: set[str], search: bool = False) -> Table:
    """One row per cell (everything but lr and seed), with its lr range and progress (for a
    search, only the range it searches: its trials are not known in advance)."""
    cells: dict[tuple, list[TrialSpec]] = defaultdict(list)
    for t in trials:
        key = (
            t.optimizer,
            t.model,
            t.width,
            t.depth,
            t.batch_size,
            t.steps,
            t.lr_input,
            t.lr_hidden,
            t.lr_output,
            t.lr_vector,
            tuple(sorted(t.hparams.items())),
        )
        cells[key].append(t)
    title = f"{len(cells)} cells" + ("" if search else f", {len(trials)} trials")
    table = Table(title=title)
    columns = (
        "optimizer",
        "model",
        "width",
        "depth",
        "batch",
        "steps",
        "tokens",
        "settings",
        "log2 lr",
        "seeds",
        "trials",
        "stored",
    )
    for col in columns[:-2] if search else columns:
        table.add_column(
            col, justify="left" if col in ("optimizer", "model", "settings") else "right"
        )
    for (opt, model, width, depth, batch, steps, *mults, hp), group in cells.items():
        lrs = sorted({math.log2(t.lr) for t in group})
        settings = [f"{k}={v}" for k, v in hp]
        settings += [
            f"{n}={m:g}"
            for n, m in zip(("lr_in", "lr_hid", "lr_out", "lr_vec"), mults, strict=True)
            if m != 1.0
        ]
        lr_text = (
            _octave(lrs[0])
            if len(lrs) == 1
            else f"{_octave(lrs[0])}..{_octave(lrs[-1])}" + ("" if search else f" ({len(lrs)})")
        )
        row = [
            opt,
            model,
            str(width),
            str(depth),
            str(batch),
            str(steps),
            f"{group[0].tokens:,}",
            " ".join(settings),
            lr_text,
            str(len({t.seed for t in group})),
            str(len(group)),
            str(sum(t.trial_id in finished for t in group)),
        ]
        table.add_row(*(row[:-2] if search else row))
    return table


@app.command()
def run(
    grid: Annotated[Path, typer.Argument(help="The grid file (YAML).")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the trials; run nothing.")
    ] = False,
    executor: Annotated[
        str, typer.Option(help="ray (default) or local: sequential, in this process, no Ray.")
    ] = "ray",
    address: Annotated[
        str | None,
        typer.Option(help="Attach to an existing Ray cluster: auto or HOST:PORT (or RAY_ADDRESS)."),
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option(help="CPUs of the local Ray instance (default: all).", min=1)
    ] = None,
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Start the local Ray instance with its dashboard.")
    ] = False,
    dashboard_host: Annotated[
        str,
        typer.Option(help="Address the dashboard binds to; beyond loopback only if you say so."),
    ] = "127.0.0.1",
    results: Annotated[
        str | None, typer.Option(help="Results root, overriding the grid file's `results`.")
    ] = None,
    then_report: Annotated[
        bool, typer.Option("--report", help="Write the sweep's report when it is done.")
    ] = False,
    trackers: Annotated[
        list[str] | None,
        typer.Option(
            "--tracker",
            help="Stream every trial's rows to tensorboard, mlflow or wandb (repeatable).",
        ),
    ] = None,
) -> None:
    """Run every trial of GRID not yet in its store; safe to re-run, it resumes."""
    from sweeper.orchestrate import SweepError, plan, preflight, run_sweep
    from sweeper.progress import SweepProgress
    from sweeper.store import status_words
    from sweeper.trackers import TrackerError, tracking_for

    if executor not in ("ray", "local"):
        _fail(f"--executor must be ray or local, got {executor!r}")
    if executor == "local":
        ray_only = {
            "--address": address is not None,
            "--num-cpus": num_cpus is not None,
            "--dashboard": dashboard,
            "--dashboard-host": dashboard_host != "127.0.0.1",
            "--tracker": bool(trackers),
        }
        if given := [name for name, on in ray_only.items() if on]:
            _fail(f"{', '.join(given)}: for the Ray executor only, not --executor local")
    spec = _load(grid)
    grid_text = grid.read_text()
    try:
        p = plan(spec, results, allow_missing_data=dry_run)
        tracking = tracking_for(trackers, spec.name, p.store) if trackers else None
    except (SweepError, TrackerError) as err:
        _fail(str(err))
    if dry_run:
        if p.search:
            st = spec.search
            console.print(_cells_table(p.trials, set(), search=True))
            if st.method == "optuna":
                how = (
                    f"optuna ({st.sampler}) in each of {len(p.search.cells)} cells, "
                    f"{st.trials_per_cell} of its grid lrs per cell, each at every seed, "
                    f"{st.batch} per round"
                )
            else:
                sizes = sorted({len(line) for line in p.search.lines})
                lines = len(p.search.lines)
                how = (
                    f"transfer along {st.axis} in {lines} line{'s' * (lines != 1)} of "
                    f"{'-'.join(map(str, sizes))} cells: the smallest {st.axis} scanned over "
                    f"its range at one seed, then around each cell's best lr the grid lrs the "
                    f"fit uses (every seed near it, fewer further out) until its interval is "
                    f"within +-{st.target_ci:g} octave; about {p.search.expected_trials} trials "
                    "when each wider optimum is where the smaller ones predict"
                    + (
                        f" (every line has one {st.axis}: nothing to transfer along)"
                        if sizes == [1]
                        else ""
                    )
                )
            console.print(
                f"search: {how}; at most {p.total} trials ({st.trials_per_cell} lrs' worth "
                f"per cell), of the grid's {len(p.trials)}; {p.done} stored, {len(p.todo)} in "
                f"the first round{_bundling(spec)} -> {p.store.location}"
            )
        else:
            finished = {t.trial_id for t in p.trials} - {t.trial_id for t in p.todo}
            console.print(_cells_table(p.trials, finished))
            console.print(
                f"{len(p.trials)} trials: {p.done} stored, {len(p.todo)} to run"
                f"{_bundling(spec)} -> {p.store.location}"
            )
        if p.data_error:
            err_console.print(f"[yellow]warning:[/] data: {escape(p.data_error)} (needed to run)")
        if p.running:
            running = escape(p.running)
            err_console.print(f"[yellow]note:[/] a sweep is running on this store: {running}")
        return

    try:
        if p.todo:
            preflight(p, executor)  # type: ignore[arg-type]
    except SweepError as err:
        _fail(str(err))
    console.print(
        f"[bold]{spec.name}[/]: {p.total} trials{' at most (search)' if p.search else ''}, "
        f"{p.done} already stored, {len(p.todo)} to run"
        f"{' in the first round' if p.search else ''}{_bundling(spec)} -> {p.store.location}"
    )

    def announce(url: str | None) -> None:
        for line in tracking.where() if tracking else []:
            console.print(line)
        if url:
            token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
            login = f" (it asks for a token: the content of {token})" if token.is_file() else ""
            console.print(f"Ray dashboard: {url}{login}")

    try:
        with SweepProgress(spec.name, p.total, p.done, console) as progress:
            run_sweep(
                p,
                progress,
                executor,  # type: ignore[arg-type]
                grid_text,
                **(
                    {}
                    if executor == "local"
                    else {
                        "address": address,
                        "num_cpus": num_cpus,
                        "dashboard": dashboard,
                        "dashboard_host": dashboard_host,
                        "on_ready": announce,
                        "tracking": tracking,
                    }
                ),
            )
            if p.search:
                progress.ended()
    except SweepError as err:
        _fail(str(err))
    except KeyboardInterrupt:
        try:
            stored = f"{len(p.store.trial_ids())} trials stored"
        except OSError:
            stored = "what was stored is kept"
        err_console.print(
            f"[yellow]interrupted[/]: {stored}; run the same command again to finish the sweep"
        )
        raise typer.Exit(130) from None

    stored = p.store.read("trials", ["trial_id", "status"]).to_pydict()
    status_of = dict(zip(stored["trial_id"], stored["status"], strict=True))
    if p.search:  # its trials are the ones it stored; left: what it would still propose
        counts = Counter(status_of.values())
        counts["not run"] = len(p.search.propose())
    else:
        counts = Counter(status_of.get(t.trial_id, "not run") for t in p.trials)
    summary = status_words(counts)
    if counts["not run"]:
        err_console.print(
            f"[yellow]stopped early[/]: {summary}, {counts['not run']} not run yet; "
            "run the same command again to finish the sweep"
        )
        raise typer.Exit(130)
    console.print(f"done: {summary}.")
    if p.search and (note := p.search.shortfall()):
        console.print(f"search: {note}.")
    if then_report:
        report(p.store.location)
    else:
        console.print(f"Report: sweep report {p.store.location}")
    if counts["failed"]:
        raise typer.Exit(1)


@app.command()
def status(
    target: Annotated[
        str, typer.Argument(help="A grid file, or a sweep's results folder (a path or a URI).")
    ],
) -> None:
    """How many trials are stored, by status, and (for a grid file) how many are left."""
    from sweeper.store import NoStore, find_stores, status_words

    if Path(target).is_file():
        from sweeper.orchestrate import SweepError, plan

        spec = _load(Path(target))
        try:
            p = plan(spec)
        except SweepError as err:
            _fail(str(err))
        if p.search is None:
            left = f", {p.total - p.done} of {p.total} left to run"
        elif p.todo:  # a search's trials are not known in advance, only its next round's
            left = f", search: {len(p.todo)} in its next round, at most {p.total - p.done} more"
        else:
            left = ", search: done" + (f"; {note}" if (note := p.search.shortfall()) else "")
        stores = [p.store]
    else:
        try:
            stores, left = find_stores(target), ""
        except NoStore as err:
            _fail(str(err))
    for store in stores:
        try:
            counts = Counter(store.read("trials", ["status"])["status"].to_pylist())
            store.finished_ids()  # names damaged steps files, whose trials will run again
        except OSError as err:
            _fail(str(err))
        summary = status_words(counts)
        console.print(f"{store.location}: {sum(counts.values())} stored ({summary}){left}")


# The options `report` and `analyze` share.
Results = Annotated[
    str, typer.Argument(help="A sweep's folder, or a root holding several (a path or a URI).")
]
Metric = Annotated[str, typer.Option(help="final_val, smoothed_train or last_frac.")]
PredictWidth = Annotated[
    int | None, typer.Option(help="Predict the optimal lr at this width.", min=1)
]
Tolerance = Annotated[
    float | None,
    typer.Option(
        help="Verdict band, octaves of optimal lr (or norm) per doubling: 'transfers' when the"
        " 95 % interval lies within +-this [default: 0.25].",
        min=0.01,
        max=10.0,
    ),
]
Horizons = Annotated[
    list[int] | None,
    typer.Option(
        "--horizon", help="Token horizon for norm transfer and scaling fits (repeatable).", min=1
    ),
]


@app.command()
def report(
    results: Results,
    out: Annotated[
        str | None, typer.Option("-o", "--out", help="Output folder (default: RESULTS/report).")
    ] = None,
    metric: Metric = "final_val",
    predict_width: PredictWidth = None,
    horizons: Horizons = None,
    tolerance: Tolerance = None,
) -> None:
    """Write report.html, its figures and fits.json."""
    from analysis import AnalysisError
    from analysis.report import write_report
    from sweeper.store import StoreError

    try:
        path = write_report(
            results,
            out,
            metric=metric,
            predict_width=predict_width,
            horizons=horizons or None,
            tolerance=tolerance,
        )
    except AnalysisError as err:
        _fail(str(err))
    except StoreError as err:  # the store cannot be read
        _fail(str(err))
    except OSError as err:  # the output folder: a file in the way, read-only, a full disk
        where = f"{err.filename}: " if err.filename else ""
        _fail(f"cannot write the report: {where}{err.strerror or err}")
    console.print(f"report: {path}")


@app.command()
def analyze(
    results: Results,
    metric: Metric = "final_val",
    predict_width: PredictWidth = None,
    horizons: Horizons = None,
    tolerance: Tolerance = None,
) -> None:
    """Print the optimal-lr and transfer tables."""
    from analysis import AnalysisError
    from analysis.report import print_summary
    from sweeper.store import StoreError

    try:
        print_summary(
            results,
            metric=metric,
            predict_width=predict_width,
            horizons=horizons or None,
            tolerance=tolerance,
            console=console,
        )
    except (AnalysisError, StoreError) as err:
        _fail(str(err))


@app.command()
def compact(
    results: Annotated[
        str, typer.Argument(help="A sweep's results folder, or a results root holding several.")
    ],
    part_mb: Annotated[
        int,
        typer.Option(
            "--part-mb", min=1, help="Merge about this many MB of per-trial files into each part."
        ),
    ] = 256,
) -> None:
    """Merge finished trials' files into a few large ones (faster reads); upgrade older files."""
    from sweeper.compact import CompactError, compact_path
    from sweeper.store import StoreError, StoreLocked

    try:
        done = compact_path(results, part_bytes=part_mb * 2**20)
    except (CompactError, StoreLocked, StoreError) as err:
        _fail(str(err))
    for result in done:
        console.print(result.summary())


@app.command()
def schema() -> None:
    """Print the store's tables, column by column."""
    from sweeper.store import COLUMN_DOCS, STORE_VERSION

    for name, columns in COLUMN_DOCS.items():
        table = Table(title=f"{name} (store version {STORE_VERSION})")
        for col in ("column", "type", "meaning"):
            table.add_column(col)
        for column, typ, doc in columns:
            table.add_row(column, str(typ), doc)
        console.print(table)


if __name__ == "__main__":
    app()
