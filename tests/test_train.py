"""The single-trial trainer: every optimizer learns, rows are reproducible, divergence, norms."""

from __future__ import annotations

import math

import pytest
import torch
from trial_specs import make_trial

from sweeper.data import DataError
from sweeper.models import GPT
from sweeper.spec import TrialSpec
from sweeper.store import COORD_COLUMNS, STEPS_COLUMNS, TRIALS_COLUMNS, Store
from sweeper.train import NormLogger, lr_multiplier, run_trial, sigma_max

torch.set_num_threads(1)

STEP_KEYS = [name for name, _, _ in STEPS_COLUMNS if name != "trial_id"]
SUMMARY_KEYS = {
    "n_params",
    "steps_done",
    "tokens_seen",
    "initial_loss",
    "final_train_loss",
    "final_val_loss",
    "best_val_loss",
    "out_rms_to_inf",
    "hidden_rms_to_rms",
    "in_l1_to_rms",
    "wall_time_s",
    "train_time_s",
    "device",
    "started_at",
    "finished_at",
    "error",
}
TIMING = {"elapsed_s", "tokens_per_s"}


def trial(**changes) -> TrialSpec:
    """100 steps of 8 x 64 tokens, a row every 25 steps: long enough to see learning."""
    base = dict(seq_len=64, mlp_context=8, batch_size=8, steps=100, log_every=25)
    return make_trial(**{**base, "eval_every": 50, "eval_batches": 2, "lr": 2**-8, **changes})


# Learning rates that train the width-64 depth-2 proxy well in 100 steps (found by a scan).
WORKING = {
    "adamw": (2**-8, {}),
    "adamw-mup": (2**-8, {}),
    "adamw-rescaled": (2**-2, {}),
    "muon": (0.02, {"adam_lr": 3e-3}),
    "scion": (2**-7, {}),
    "uscion": (2**-7, {}),
    "moga-row": (2**-5, {}),
    "moga-col": (2**-5, {}),
}


@pytest.mark.parametrize("name", list(WORKING))
def test_every_optimizer_lowers_the_validation_loss(name):
    lr, hparams = WORKING[name]
    result = run_trial(trial(optimizer=name, lr=lr, hparams=hparams))
    assert result.status == "completed", result.summary["error"]
    first, last = result.steps[0], result.steps[-1]
    assert first["step"] == 0 and last["step"] == 100
    assert last["val_loss"] < 3.2 < first["val_loss"]  # ln 256 = 5.5 at init
    assert result.summary["final_val_loss"] == last["val_loss"]
    assert result.summary["best_val_loss"] <= last["val_loss"]


def test_rows_summary_and_store_agree_on_columns(tmp_path):
    rows = []
    spec = trial(steps=30, log_every=10, eval_every=15, coord_check=2)
    result = run_trial(spec, sink=rows.append)
    assert rows == result.steps  # the sink sees every row, in order
    for row in result.steps:
        assert list(row) == STEP_KEYS
    assert [r["step"] for r in rows] == [0, 10, 20, 30]  # every log_every steps
    # evaluated at 0, at the first row after step 15, and at the end
    assert [r["val_loss"] is not None for r in rows] == [True, False, True, True]
    assert [r["tokens"] for r in rows] == [s * 8 * 64 for s in (0, 10, 20, 30)]
    assert rows[0]["tokens_per_s"] is None and rows[1]["tokens_per_s"] > 0
    assert rows[0]["upd_out_rms_to_inf"] is None and rows[1]["upd_out_rms_to_inf"] > 0
    assert all(r["elapsed_s"] <= s["elapsed_s"] for r, s in zip(rows, rows[1:], strict=False))

    s = result.summary
    assert set(s) == SUMMARY_KEYS and SUMMARY_KEYS.issubset(n for n, _, _ in TRIALS_COLUMNS)
    assert s["steps_done"] == 30 and s["tokens_seen"] == 30 * 8 * 64
    assert s["initial_loss"] == rows[0]["train_loss"]
    assert s["final_train_loss"] == rows[-1]["train_loss"]
    assert s["out_rms_to_inf"] == rows[-1]["out_rms_to_inf"]
    assert s["device"] == "cpu" and s["error"] is None
    assert s["started_at"].tzinfo is not None and s["finished_at"] >= s["started_at"]
    assert 0 < s["train_time_s"] <= s["wall_time_s"]

    # coord check: every layer at steps 0, 1, 2
    layers = ["wte", "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "lm_head"]
    assert len(result.coord) == 3 * len(layers)
    assert [r["layer"] for r in result.coord[:6]] == layers
    assert [r["step"] for r in result.coord[::6]] == [0, 1, 2]
    assert list(result.coord[0]) == [n for n, _, _ in COORD_COLUMNS if n != "trial_id"]
    assert all(r["mean_abs"] > 0 for r in result.coord)

    store = Store(tmp_path, "t")
    store.write_trial(spec, result)
    assert store.read("steps").num_rows == 4 and store.read("coord").num_rows == 18
    assert store.read("trials").column("status").to_pylist() == ["completed"]


def test_same_spec_twice_gives_identical_rows():
    spec = trial(steps=20, log_every=5, eval_every=10, optimizer="scion", lr=2**-7)
    a, b = run_trial(spec), run_trial(spec)

    def losses(result):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in result.steps]

    assert losses(a) == losses(b)


def test_training_flushes_subnormal_floats_to_zero():
    """Subnormals slow x86 CPUs down tens of times (a Scion run took 7x longer from them)."""
    run_trial(trial(steps=1, log_every=1, eval_every=1))
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal: below 2^-126
    assert (tiny * 1.0).item() == 0.0


def test_batches_do_not_depend_on_the_lr():
    # At step 0 nothing has been updated: the same seed gives the same first batch and the same
    # initial weights whatever the lr, so the step-0 rows agree.
    a = run_trial(trial(steps=2, log_every=1, lr=1e-4)).steps[0]
    b = run_trial(trial(steps=2, log_every=1, lr=1e-2)).steps[0]
    assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    c = run_trial(trial(steps=2, log_every=1, seed=1)).steps[0]
    assert c["train_loss"] != a["train_loss"]


@pytest.mark.parametrize("name, lr", [("adamw", 100.0), ("uscion", 64.0)])
def test_an_absurd_lr_diverges_within_a_few_steps(name, lr):
    result = run_trial(trial(optimizer=name, lr=lr, steps=50, log_every=1, eval_every=50))
    assert result.status == "diverged"
    s = result.summary
    assert s["steps_done"] <= 5 and "diverged at step" in s["error"]
    assert s["final_train_loss"] is None and s["final_val_loss"] is None
    rows = result.steps
    assert rows[0]["step"] == 0 and math.isfinite(rows[0]["train_loss"])
    last = rows[-1]
    assert last["step"] == s["steps_done"] and last["val_loss"] is None
    assert last["out_rms_to_inf"] is None
    assert f"step {last['step']}" in s["error"]


def test_rownorm_head_starts_at_rms_to_inf_one():
    spec = trial(
        optimizer="scion",
        lr=2**-7,
        steps=5,
        hparams={"lmo_output": "rownorm", "scale_output": 1.0},
    )
    row0 = run_trial(spec).steps[0]
    assert row0["out_rms_to_inf"] == pytest.approx(1.0, abs=1e-5)
    # colnorm input at scale 1: every column RMS 1
    assert row0["in_l1_to_rms"] == pytest.approx(1.0, abs=1e-5)
    # spectral hidden at scale 3: rms->rms 3
    assert row0["hidden_rms_to_rms"] == pytest.approx(3.0, rel=1e-3)


def test_mlp_proxy_trains():
    result = run_trial(trial(model="mlp", width=128, lr=2**-6, steps=60, log_every=30))
    assert result.status == "completed"
    assert result.steps[-1]["val_loss"] < result.steps[0]["val_loss"] - 2.0


def test_schedules_warmup_and_grad_clip_in_rows():
    rows = run_trial(
        trial(
            steps=20,
            log_every=5,
            eval_every=20,
            schedule="cosine",
            warmup=0.25,
            grad_clip=1.0,
            lr=0.01,
        )
    ).steps
    lrs = [r["lr"] for r in rows]
    assert lrs[1] == pytest.approx(0.01)  # step 5: the last warm-up step
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0


def test_lr_multiplier():
    m = lr_multiplier
    assert [m(s, 10, "constant", 0.0, 0.0) for s in (0, 9)] == [1.0, 1.0]
    assert [m(s, 10, "constant", 0.2, 0.0) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert [m(s, 10, "linear", 0.0, 0.0) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert m(0, 10, "cosine", 0.0, 0.0) == 1.0 and m(5, 10, "cosine", 0.0, 0.0) == pytest.approx(
        0.5
    )
    # warm-down: constant, then linear to 0 over the last 40%
    wsd = [m(s, 10, "constant", 0.0, 0.4) for s in range(10)]
    assert wsd == pytest.approx([1, 1, 1, 1, 1, 1, 1.0, 0.75, 0.5, 0.25])
    # warm-up followed by a linear decay over the remaining steps
    assert [m(s, 10, "linear", 0.2, 0.0) for s in (0, 1, 2, 6)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.5]
    )
    assert all(m(s, 7, sched, 0.3, 0.3) > 0 for s in range(7) for sched in ("linear", "cosine"))


def test_sigma_max_is_within_a_percent_of_the_svd():
    torch.manual_seed(0)
    # Gaussian matrices (no gap at the top of the spectrum) are the hard case.
    for shape in [(3, 200, 200), (2, 600, 150), (2, 150, 600), (40, 30)]:
        W = torch.randn(*shape)
        exact = torch.linalg.matrix_norm(W.double(), ord=2).float()
        assert torch.allclose(sigma_max(W), exact, rtol=1e-2)
    # A trained-like matrix: a spike above the bulk is found to float precision.
    W = torch.randn(300, 300) / 17 + 0.5 * torch.outer(torch.randn(300), torch.randn(300)) / 17
    exact = torch.linalg.matrix_norm(W, ord=2)
    assert sigma_max(W).item() == pytest.approx(exact.item(), rel=1e-5)


def test_a_changed_data_fingerprint_is_refused():
    with pytest.raises(DataError, match="changed since the sweep was planned"):
        run_trial(trial(data_fingerprint="0123456789abcdef", steps=1))


def test_norms_of_broken_or_zero_weights_do_not_raise():
    assert sigma_max(torch.zeros(2, 300, 300)).tolist() == [0.0, 0.0]
    model = GPT(256, 128, 1, 16)
    logger = NormLogger(model)
    before = logger.snapshot()
    (row,) = logger.norms(before)  # a plain model: one row
    assert row["upd_hidden_rms_to_rms"] == 0.0  # nothing moved
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    assert all(math.isnan(v) for v in logger.norms(before)[0].values())


def test_gradient_accumulation_matches_the_whole_batch():
    whole = run_trial(trial(optimizer="adamw", lr=2**-8, batch_size=8))
    split = run_trial(trial(optimizer="adamw", lr=2**-8, batch_size=8, grad_accum=4))
    a = [r["train_loss"] for r in whole.steps]
    b = [r["train_loss"] for r in split.steps]
    assert a[0] == b[0]  # the same weights and batch before any update
    assert b == pytest.approx(a, rel=1e-4)  # then equal up to float summation order
    assert split.summary["final_val_loss"] == pytest.approx(whole.summary["final_val_loss"], 1e-4)
