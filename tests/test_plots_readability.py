"""What a reader of report.html sees in its figures (issue 9, item 9): legends that list only
what is drawn, a band named only when there is one, no step-0 row on a log axis, counts with
the right plural, an honestly labelled "tuned" lr, and text readable at the report's width."""

from __future__ import annotations

import dataclasses
import io
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import same_color
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D
from matplotlib.text import Text

from analysis import analyze, load_results
from analysis import plots as P
from analysis import report as R
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store

QUICKSTART = (
    Path(__file__).resolve().parents[1] / "results" / "reference" / "quickstart"
)  # real, 3 seeds

# Three seeds. adamw's optimum at width 128 (2^-6) lies on its grid's lower edge: a hollow
# star; lr 2^-3 is more than 3 octaves above scion's optimum (2^-7): diverged crosses. Two
# batch sizes and a coord check, so that every figure is drawn.
SEEDS3 = SyntheticConfig(
    name="seeds3",
    optimizers={
        "scion": PlantedOptimizer(0.0, -7.0),
        "adamw": PlantedOptimizer(-1.0, -7.0, log2_lr=(-6.0, -3.0, 1.0)),
    },
    widths=(64, 128),
    batch_sizes=(16, 32),
    seeds=(0, 1, 2),
    log2_lr=(-10.0, -3.0, 1.0),
    steps=40,
    log_every=10,
    eval_every=20,
    coord_check=2,
)


@pytest.fixture(scope="module")
def one_seed():
    """The committed quickstart (AdamW and uScion) with its seed 0 alone."""
    results = load_results(QUICKSTART)
    return analyze(dataclasses.replace(results, trials=results.trials.query("seed == 0")))


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    return analyze(write_synthetic_store(tmp_path_factory.mktemp("seeds3"), SEEDS3))


def _drawn(fig: Figure) -> Figure:
    P.figure_png(fig)  # tick labels exist once the figure is drawn
    return fig


def _texts(fig: Figure) -> list[Text]:
    """Every non-empty text the figure shows (legends, titles, labels, ticks, notes)."""
    return [
        t
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible())
    ]


def _legend_labels(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for leg in legends for t in leg.get_texts()]


def _marks(fig: Figure, marker: str) -> list[Line2D]:
    """Lines in the panels (not legend handles) drawing `marker` at one point or more."""
    return [
        line
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_marker() == marker and len(line.get_xdata()) > 0
    ]


# --------------------------------------------------------------------------- loss vs lr legend


def test_one_seed_names_no_band(one_seed):
    fig = P.plot_loss_vs_lr(one_seed)
    words = [t.get_text() for t in _texts(_drawn(fig))]
    said = [w for w in words if "SEM" in w or "band =" in w]
    assert not said, said
    assert "one seed: no band" in _legend_labels(fig)
    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert all(len(c.get_paths()) == 0 for c in bands)


def test_band_is_named_where_it_is_drawn(three_seeds):
    fig = P.plot_loss_vs_lr(three_seeds)
    labels = _legend_labels(fig)
    assert "±SEM band (3 seeds)" in labels
    assert "one seed: no band" not in labels
    bands = [c for ax in fig.axes for c in ax.collections if isinstance(c, PolyCollection)]
    assert any(len(c.get_paths()) > 0 for c in bands)


@pytest.mark.parametrize("store", ["one_seed", "three_seeds"])
def test_one_legend_listing_only_marks_that_appear(store, request):
    an = request.getfixturevalue(store)
    fig = P.plot_loss_vs_lr(an)
    assert len(fig.legends) == 1
    assert all(ax.get_legend() is None for ax in fig.axes)  # not repeated per panel
    labels = _legend_labels(fig)
    stars = _marks(fig, "*")
    hollow = [s for s in stars if same_color(s.get_markerfacecolor(), "white")]
    filled = [s for s in stars if not same_color(s.get_markerfacecolor(), "white")]
    crosses = _marks(fig, "x")
    assert ("diverged (drawn at top)" in labels) == bool(crosses)
    assert ("optimum" in labels) == bool(filled)
    hollow_words = ("optimum on the grid edge", "optimum, flagged")
    assert any(w.startswith(hollow_words) for w in labels) == bool(hollow)
    widths = {int(w.split()[1]) for w in labels if w.startswith("width ")}
    assert widths == {s for f in P.headline(an.width_transfer).values() for s in f.sizes}
    if store == "one_seed":  # the committed quickstart: nothing diverged, no optimum on an edge
        assert not crosses and not hollow and len(labels) == 5
    else:  # and the planted store has both, so both branches are exercised
        assert crosses and hollow


# --------------------------------------------------------------------------- log axes


@pytest.mark.parametrize("store", ["one_seed", "three_seeds"])
def test_log_axes_plot_no_zero_or_negative_value(store, request):
    an = request.getfixturevalue(store)
    checked = 0
    for name, plot in P.PLOTS.items():
        fig = plot(an)
        if fig is None:
            continue
        for ax in fig.axes:
            for axis, get in (("x", Line2D.get_xdata), ("y", Line2D.get_ydata)):
                scale = ax.get_xscale() if axis == "x" else ax.get_yscale()
                if scale != "log":
                    continue
                for line in ax.get_lines():
                    v = np.asarray(get(line), float)
                    assert (v > 0).all(), f"{name}: {axis} <= 0 on a log axis"
                    checked += len(v)
    assert checked > 0


def test_training_curves_start_after_step_0(one_seed):
    fig = P.plot_loss_vs_time(one_seed)
    ax_tok = fig.axes[0]
    steps = one_seed.results.steps
    first = steps[steps["tokens"] > 0]["tokens"].min()
    for line in ax_tok.get_lines():
        assert np.min(line.get_xdata()) >= first


# --------------------------------------------------------------------------- words


def test_counts_have_the_right_plural(one_seed, three_seeds):
    for an in (one_seed, three_seeds):
        for name, plot in P.PLOTS.items():
            fig = plot(an)
            if fig is None:
                continue
            for t in _texts(_drawn(fig)):
                assert not re.search(r"\b1 [a-z]+s\b", t.get_text()), (name, t.get_text())
    assert all(w.endswith("; 1 seed") for w in _legend_labels(P.plot_loss_vs_time(one_seed)))
    assert all(w.endswith("; 3 seeds") for w in _legend_labels(P.plot_loss_vs_time(three_seeds)))
    assert P._count(1, "seed") == "1 seed" and P._count(0, "seed") == "0 seeds"


LABEL = re.compile(
    r"^(?P<opt>\S+), width (?P<w>\d+): lr 2\^(?P<grid>-?[\d.]+) "
    r"\(grid point nearest the fitted optimum 2\^(?P<star>-?[\d.]+)\); "
)


def test_time_figure_says_which_grid_lr_it_shows(one_seed):
    tuned = P.tuned_trials(one_seed)
    table = one_seed.optima.table.set_index("cell")
    labels = _legend_labels(P.plot_loss_vs_time(one_seed))
    assert len(labels) == len(tuned) == 2
    for label in labels:
        m = LABEL.match(label)
        assert m, label
        trials = tuned[m["opt"]]
        cell = table.loc[trials["cell"].iloc[0]]
        assert float(m["grid"]) == trials["log2_lr"].iloc[0]
        assert float(m["star"]) == pytest.approx(cell["log2_lr_star"], abs=0.005)
        grid = one_seed.results.usable
        grid = grid[grid["cell"] == trials["cell"].iloc[0]]["log2_lr"].unique()
        nearest = grid[np.argmin(np.abs(grid - cell["log2_lr_star"]))]
        assert float(m["grid"]) == nearest


# --------------------------------------------------------------------------- size of text


def _report_width_px() -> int:
    """The widest an image is shown in report.html: the body's max-width (img max-width 100%)."""
    body = re.search(r"body\{[^}]*max-width:(\d+)px", R._CSS)
    assert body and "img{max-width:100%" in R._CSS.replace(" ", "")
    return int(body[1])


def _legend_texts(fig: Figure) -> list[Text]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t for leg in legends for t in leg.get_texts()]


def shown_px(fig: Figure) -> tuple[float, float]:
    """(smallest text, smallest legend text) in px, with the PNG shown in the report: at its own
    size or scaled down to the report's width."""
    png = imread(io.BytesIO(P.figure_png(fig)))
    px_per_pt = P.DPI / 72 * min(1.0, _report_width_px() / png.shape[1])
    legend = [t.get_fontsize() for t in _legend_texts(fig)] or [np.inf]
    return min(t.get_fontsize() for t in _texts(fig)) * px_per_pt, min(legend) * px_per_pt


def test_report_width_is_the_css_width():
    assert _report_width_px() == P.REPORT_WIDTH_PX


@pytest.mark.parametrize("name", list(P.PLOTS))
def test_every_text_is_at_least_10_px_in_the_report(name, one_seed, three_seeds):
    drawn = 0
    for an in (one_seed, three_seeds):
        fig = P.PLOTS[name](an)
        if fig is None:
            continue
        smallest, legend = shown_px(fig)
        assert smallest >= 10 and legend >= 10, f"{name}: {smallest:.1f} px, legend {legend:.1f}"
        drawn += 1
    assert drawn > 0
