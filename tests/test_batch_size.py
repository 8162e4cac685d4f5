"""Best loss across batch sizes at a fixed token budget: the rise from the smallest batch to
the largest, the optimizers against each other, their intervals and verdicts, calibrated on
planted stores whose losses are known."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from analysis.batch_size import batch_size_sentences, fit_batch_sizes
from analysis.load import load_results
from analysis.optimum import find_optima
from analysis.synthetic import PlantedOptimizer, SyntheticConfig, write_synthetic_store

TOKENS = 409_600  # the synthetic reference budget: the token term of the floor is exact
BATCHES = (16, 64, 256)
CURVATURE = {"scion": 0.004, "adamw": 0.012}  # nats per octave^2 of batch away from 16
CONFIG = SyntheticConfig(
    name="batches",
    optimizers={name: PlantedOptimizer(0.0, batch_curvature=c) for name, c in CURVATURE.items()},
    widths=(256,),  # the reference width: lr* = 2^-7
    batch_sizes=BATCHES,
    seeds=(0, 1, 2),
    steps=None,
    tokens=TOKENS,
    log_every=25,
    eval_every=25,
    log2_lr=(-10.0, -4.0, 0.5),
    batch_law=(4.0, 0.0),  # B* = 16 at every horizon
    seed_offset=0.02,  # shared by all a seed's trials
    seed_cell_offset=0.003,  # each seed's own per cell: does not cancel between cells
)


def planted_loss_star(optimizer: str, batch: int) -> float:
    # analysis/synthetic.py's loss at the optimal lr, width 256, the reference token budget,
    # read on validation (+0.02).
    floor = 1.6 + 1.2 * (256 / 64) ** -0.5 + 0.8 + 0.02
    return floor + CURVATURE[optimizer] * (math.log2(batch) - 4.0) ** 2


def planted_rise(optimizer: str) -> float:
    return planted_loss_star(optimizer, BATCHES[-1]) / planted_loss_star(optimizer, BATCHES[0]) - 1


def record(tmp_path, rng_seed: int, **changes) -> dict:
    cfg = dataclasses.replace(CONFIG, name=f"batches{rng_seed}", rng_seed=rng_seed, **changes)
    results = load_results(write_synthetic_store(tmp_path, cfg))
    (rec,) = fit_batch_sizes(find_optima(results), results.usable)
    return rec


def test_rise_intervals_cover_the_planted_rise_and_rank_the_optimizers(tmp_path):
    # Measured over 30 such stores (rng seeds 500-529): coverage 98 % of the 60 rises and 90 %
    # of the 30 differences (95 % and 97 % without the per-cell seed offset; 92 % and 93 % with
    # it twice as large); without that offset in the interval the rises' coverage was 62 %.
    covered, least, larger, best_at_256 = [], [], [], []
    for r in range(100, 112):
        rec = record(tmp_path, r)
        for f in rec["families"]:
            assert f["batch_sizes"] == list(BATCHES) and f["lr_status"] == ["ok"] * 3
            lo, hi = f["rise_ci"]
            covered.append(lo <= planted_rise(f["optimizer"]) <= hi)
            assert f["rise_verdict"] == "worse"  # planted: +2.1 % (scion), +6.3 % (adamw)
        least.append(rec["least_rise"]["label"])
        (other,) = rec["least_rise"]["others"]
        lo, hi = other["ci"]
        covered.append(lo <= planted_rise("adamw") - planted_rise("scion") <= hi)
        larger.append(other["verdict"])
        (last,) = [b for b in rec["by_batch_size"] if b["batch_size"] == 256]
        best_at_256.append((last["best"], last["others"][0]["verdict"]))
    # 36 intervals at a nominal 95 %; intervals half as wide as they should be cover ~68 %.
    assert np.mean(covered) >= 0.86
    assert least.count("scion") == 12 and larger.count("larger") >= 11
    assert best_at_256.count(("scion", "worse")) >= 11  # adamw's loss against scion's


def test_equal_optimizers_are_not_told_apart(tmp_path):
    same = {name: PlantedOptimizer(0.0, batch_curvature=0.008) for name in CURVATURE}
    verdicts = []
    for r in range(200, 208):
        rec = record(tmp_path, r, optimizers=same)
        verdicts += [o["verdict"] for o in rec["least_rise"]["others"]]
        verdicts += [o["verdict"] for b in rec["by_batch_size"] for o in b["others"]]
    # 8 stores x (1 rise + 3 batch sizes) comparisons of equal optimizers.
    assert verdicts.count("indistinguishable") >= 0.85 * len(verdicts)


def test_sentences_and_no_record_without_two_batch_sizes(tmp_path):
    rec = record(tmp_path, 0)
    text = " ".join(batch_size_sentences(rec))
    assert "Smallest change of best loss from batch 16 to 256" in text and "scion" in text
    assert "95 % CI [" in text
    cfg = dataclasses.replace(CONFIG, name="one", batch_sizes=(16,))
    results = load_results(write_synthetic_store(tmp_path, cfg))
    assert fit_batch_sizes(find_optima(results), results.usable) == []


def test_a_family_that_diverges_at_its_largest_batch_is_kept_and_said(tmp_path):
    # lr* falls 3 octaves per batch doubling: at batch 256 it is 2^-19, every lr of the grid
    # more than 3 octaves above it, so every trial there diverges.
    rec = record(tmp_path, 0, batch_exponent=-3.0, batch_sizes=(16, 32, 256))
    assert {f["optimizer"] for f in rec["families"]} == {"scion", "adamw"}
    for f in rec["families"]:
        assert f["batch_sizes"] == [16, 32, 256] and not np.isfinite(f["loss_star"][-1])
        assert f["rise"] is None and f["rise_verdict"] == "diverged"
    assert rec["least_rise"] is None
    assert [b["batch_size"] for b in rec["by_batch_size"]] == [16, 32]
    assert "every lr diverged at batch 256" in " ".join(batch_size_sentences(rec))


def test_batch_sizes_whose_whole_steps_miss_the_budget_are_one_budget(tmp_path):
    # 410,600 tokens: 401 steps of 16 x 64 (410,624 tokens), 134 of 48 x 64 (411,648).
    rec = record(tmp_path, 0, tokens=410_600, batch_sizes=(16, 48))
    assert [f["batch_sizes"] for f in rec["families"]] == [[16, 48], [16, 48]]
