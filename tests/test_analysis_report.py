"""The report: HTML with embedded figures, fits.json, the terminal summary, and the words used
when a fit is impossible."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from rich.console import Console

from analysis import AnalysisError, print_summary, write_report
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store

BASE = SyntheticConfig(
    name="mixed",
    optimizers={"scion": PlantedOptimizer(0.0, -7.0), "adamw": PlantedOptimizer(-1.0, -7.0)},
    widths=(64, 128, 256),
    batch_sizes=(16, 32),
    seeds=(0, 1),
    log2_lr=(-11.0, -3.0, 1.0),
    steps=60,
    log_every=10,
    eval_every=20,
    coord_check=3,
    failed_every=17,
)


def no_nan(text: str) -> dict:
    def refuse(token: str) -> None:
        raise AssertionError(f"fits.json holds {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    path = write_synthetic_store(root, BASE)
    return write_report(path, root / "out", predict_width=1024)


@pytest.fixture(scope="module")
def fits(report):
    return no_nan((report.parent / "fits.json").read_text())


def test_report_is_self_contained_html_with_every_figure(report, fits):
    html = report.read_text()
    assert report.name == "report.html" and html.startswith("<!doctype html>")
    assert html.count("src='data:image/png;base64,") == 6
    assert "src='http" not in html and "<script" not in html
    for name, file in fits["figures"].items():
        assert file == f"{name}.png" and (report.parent / file).stat().st_size > 10_000
    assert "What was compared" in html and "Conclusions" in html


def test_fits_json_holds_every_fitted_number(fits):
    assert fits["meta"]["metric"] == "final_val" and fits["meta"]["n_bootstrap"] == 400
    assert fits["meta"]["tolerance"] == 0.25
    counts = fits["counts"]
    assert counts["failed"] > 0 and counts["total"] == 2 * 3 * 2 * 2 * 9
    assert len(fits["optima"]) == 2 * 3 * 2
    cell = fits["optima"][0]
    assert set(cell) >= {
        "log2_lr_star",
        "log2_lr_star_ci",
        "loss_star",
        "status",
        "flags",
        "n_seeds",
    }
    transfer = {(f["optimizer"], f["family"]["batch_size"]): f for f in fits["width_transfer"]}
    assert len(transfer) == 4
    adamw = transfer[("adamw", 32)]
    assert adamw["slope_ci"][0] <= -1.0 <= adamw["slope_ci"][1]
    assert adamw["verdict"] == "drifts" and adamw["tolerance"] == 0.25
    assert {"penalty", "penalty_ci", "drift", "drift_ci", "verdict_why"} <= set(adamw)
    assert adamw["prediction"]["width"] == 1024
    assert fits["norm_transfer"]["summary"]["n_ok"] > 0
    assert fits["scaling"]["lr_law"] and fits["layer_lr"] == []
    assert any("adamw" in c and "lr drifts" in c for c in fits["conclusions"])
    # a one-octave grid cannot locate optima well enough for a claim of transfer: it says so
    scion = transfer[("scion", 32)]
    assert scion["verdict"] == "inconclusive" and "finer lr grid" in scion["verdict_why"]
    assert any("scion" in c and "inconclusive" in c for c in fits["conclusions"])


def test_default_output_folder_and_rerun(tmp_path):
    cfg = dataclasses.replace(BASE, name="tiny", batch_sizes=(32,), coord_check=0, failed_every=0)
    path = write_synthetic_store(tmp_path, cfg)
    report = write_report(path)
    assert report == path / "report" / "report.html"
    assert not (report.parent / "lr_batch_heatmap.png").exists()  # one batch size: not drawn
    assert "Figures not drawn" in report.read_text()
    assert write_report(path, metric="last_frac") == report  # overwrites in place


def test_one_width_says_the_fit_is_impossible(tmp_path):
    cfg = dataclasses.replace(BASE, name="onewidth", widths=(128,), coord_check=0)
    store = write_synthetic_store(tmp_path, cfg)
    report = write_report(store)
    html = report.read_text()
    fits = no_nan((report.parent / "fits.json").read_text())
    console = Console(record=True, width=200)
    print_summary(store, console=console)
    for text in (html, console.export_text()):
        assert "Transfer fit impossible: only one width (128)" in text
        assert "Transfer across width" not in text  # said once, not in a row per family
    assert all(f["status"] == "impossible" for f in fits["width_transfer"])
    assert fits["figures"]["lr_star_vs_width"] is None
    assert fits["figures"]["loss_vs_lr"] == "loss_vs_lr.png"


def test_all_diverged_says_the_fit_is_impossible(tmp_path):
    cfg = dataclasses.replace(BASE, name="dead", diverge_octaves=-100.0, coord_check=0)
    report = write_report(write_synthetic_store(tmp_path, cfg))
    html = report.read_text()
    fits = no_nan((report.parent / "fits.json").read_text())
    assert "Fit impossible: every trial diverged" in html
    assert {c["status"] for c in fits["optima"]} == {"all_diverged"}
    assert all(c["log2_lr_star"] is None for c in fits["optima"])
    assert fits["figures"]["loss_vs_lr"] is None  # no curve to draw
    assert all("every trial diverged" in f["reason"] for f in fits["width_transfer"])


def test_print_summary(report):
    console = Console(record=True, width=120)
    print_summary(report.parent.parent / "mixed", predict_width=512, console=console)
    text = console.export_text()
    assert "Optimal learning rate per cell" in text and "Transfer across width" in text
    assert "predicted optimal lr at width 512" in text


def test_errors_are_analysis_errors(tmp_path):
    with pytest.raises(AnalysisError):
        write_report(tmp_path / "nothing-here")
    with pytest.raises(AnalysisError, match="unknown metric"):
        print_summary(tmp_path, metric="nope")


def test_all_failed_and_too_few_lrs(tmp_path):
    failed = dataclasses.replace(
        BASE, name="failed", widths=(64,), batch_sizes=(32,), coord_check=0, failed_every=1
    )
    fits = no_nan(
        (write_report(write_synthetic_store(tmp_path, failed)).parent / "fits.json").read_text()
    )
    assert fits["counts"]["failed"] == fits["counts"]["total"] > 0
    assert any("nothing to fit" in c for c in fits["conclusions"])
    short = dataclasses.replace(
        BASE, name="short", batch_sizes=(32,), coord_check=0, log2_lr=(-8.0, -7.0, 1.0)
    )
    fits = no_nan(
        (write_report(write_synthetic_store(tmp_path, short)).parent / "fits.json").read_text()
    )
    assert {c["status"] for c in fits["optima"]} == {"too_few_lrs"}
    assert all("fewer than 3 lrs" in f["reason"] for f in fits["width_transfer"])


def test_readme_documents_every_fits_json_key(fits):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## fits.json") :]
    section = section[: section.index("\n## ", 5)]
    records = {
        "top level": fits,
        "meta": fits["meta"],
        "optima": fits["optima"][0],
        "width_transfer": fits["width_transfer"][0],
        "norm_transfer": fits["norm_transfer"],
        "norm_transfer.across_widths": fits["norm_transfer"]["across_widths"][0],
    }
    for where, record in records.items():
        for key in record:
            assert f"`{key}`" in section, f"README's fits.json section lacks {where}.{key}"


def test_coord_check_growth_is_the_planted_one(fits):
    """The synthetic store plants mean |activation| growing as (width/64)^0.5 by the last
    coord-check step for an optimizer whose lr drifts, flat for one whose lr transfers."""
    records = fits["coord_check"]
    assert {r["optimizer"] for r in records} == {"adamw", "scion"}
    for r in records:
        assert r["widths"] == [64, 256] and r["step"] == 3 and r["widths_short_of_step"] == []
        planted = 2.0 if r["optimizer"] == "adamw" else 1.0  # (256 / 64) ** 0.5
        assert r["growth"] == pytest.approx(planted, rel=1e-9)
        assert r["growth_range"] == pytest.approx([planted, planted], rel=1e-9)
    words = [c for c in fits["conclusions"] if c.startswith("coord check, adamw")]
    assert len(words) == 1 and "x2 (" in words[0]


def test_a_fixed_lr_sweep_is_described_not_called_a_failed_fit(tmp_path):
    cfg = dataclasses.replace(BASE, name="coord", log2_lr=(-7.0, -7.0, 1.0), failed_every=0)
    fits = json.loads(
        (write_report(write_synthetic_store(tmp_path, cfg)).parent / "fits.json").read_text()
    )
    said = " ".join(fits["conclusions"])
    assert "One lr per cell" in said and "Fit impossible" not in said
    assert "inconclusive" not in said and "coord check, scion" in said
    figures = fits["figures"]  # no lr axis to draw: only the runs themselves
    assert figures["loss_vs_lr"] is figures["lr_star_vs_width"] is figures["loss_vs_norm"] is None
    assert figures["coord_check"] == "coord_check.png"
