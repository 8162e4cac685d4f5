"""Bad input in a grid file, through the real `sweep` CLI (issue 12, items 3 and 6).

Each grid is refused at load time: exit code 2, one `error: ...` message naming the field and
what is allowed, no traceback, and nothing written under the results folder, even when it
already holds a store. `--dry-run` and `--executor local` keep Ray out of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sweeper.spec import MAX_GRID_BYTES, MAX_LISTED_ERRORS

SWEEP = Path(sys.executable).parent / "sweep"
QUICKSTART_STORE = Path(__file__).resolve().parents[1] / "results" / "reference" / "quickstart"

# `results` defaults to ./results: the CLI runs in the test's folder, where the `results`
# fixture has put a store.
HEAD = "name: quickstart\ntrain: {steps: 1}\n"
OPT = "optimizer: {adamw: {lr: 0.01}}"


def grid(body: str) -> str:
    return HEAD + body + "\n"


BAD = {
    # 1. an empty axis (was an IndexError traceback)
    "empty_lr": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: []}}}"),
        ["grid.optimizer.adamw.lr: an empty list; give at least one value"],
    ),
    "empty_width": (grid(f"grid: {{width: [], {OPT}}}"), ["grid.width: an empty list"]),
    # 2. non-finite floats (were accepted and trained)
    "inf_lr": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: .inf}}}"),
        ["grid.optimizer.adamw.lr.0: Input should be a finite number"],
    ),
    "inf_lr_output": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: 0.01, lr_output: .inf}}}"),
        ["grid.optimizer.adamw.lr_output.0: Input should be a finite number"],
    ),
    "nan_warmup": (
        HEAD.replace("{steps: 1}", "{steps: 1, warmup: .nan}") + f"grid: {{width: [32], {OPT}}}\n",
        ["train.warmup: Input should be a finite number"],
    ),
    # 3. lrs out of range (a traceback, or lr = 0.0 trained as "completed"; an OverflowError)
    "tiny_log2_lr": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: {log2: [-2000, -1999, 1]}}}}"),
        ["grid.optimizer.adamw.lr:", "reaches 2^-2000", "2^-40 .. 2^20"],
    ),
    "huge_log2_lr": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: {log2: [1100, 1101, 1]}}}}"),
        ["grid.optimizer.adamw.lr:", "reaches 2^1101"],
    ),
    "huge_lr": (
        grid("grid: {width: [32], optimizer: {adamw: {lr: [0.01, 1.0e+300]}}}"),
        ["grid.optimizer.adamw.lr.1: lr 1e+300 is outside 2^-40 .. 2^20"],
    ),
    # 4. a seed past int64 (a traceback after orphan files were written)
    "huge_seed": (
        grid(f"grid: {{width: [32], seed: [{2**65}], {OPT}}}"),
        ["grid.seed.0", "4294967295"],
    ),
    # 5. head_dim that does not fit the GPT (trials stored failed; a silently narrow attention)
    "odd_head_dim": (
        grid(f"model: {{head_dim: 15}}\ngrid: {{width: [32], {OPT}}}"),
        ["model.head_dim 15 must be even"],
    ),
    "head_dim_not_dividing_width": (
        grid(f"model: {{head_dim: 16}}\ngrid: {{width: [24, 32], {OPT}}}"),
        ["model.head_dim 16 must divide every width", "grid.width 24 is not a multiple of 16"],
    ),
    # 6. absurd integers
    "huge_width": (grid(f"grid: {{width: [10000000], {OPT}}}"), ["grid.width.0", "65536"]),
    "huge_seq_len": (
        grid(f"model: {{seq_len: {2**40}}}\ngrid: {{width: [32], {OPT}}}"),
        ["model.seq_len", "1048576"],
    ),
    # 7. a key given twice (the last one silently won)
    "duplicate_key": (
        HEAD + f"grid: {{width: [32], {OPT}}}\ngrid: {{width: [64], {OPT}}}\n",
        ["line 4: key 'grid' is given twice (first on line 3)"],
    ),
    "unsafe_tag": (
        HEAD + "results: !!python/object/apply:os.system ['true']\n",
        ["not valid YAML"],
    ),
    # 9. runaway grids
    "over_trial_cap": (
        grid(
            "grid:\n  width: [32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]\n"
            f"  seed: [{', '.join(map(str, range(1000)))}]\n"
            "  optimizer: {adamw: {lr: {log2: [-20, 0, 0.02]}}}"
        ),
        ["10,010,000 trials, over the limit of 100,000 per grid file", "Split it"],
    ),
    "alias_bomb": (
        HEAD
        + "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
        + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
        + "grid: {width: [32], optimizer: {scion: {lr: 0.01, momentum: *a9}}}\n",
        ["more than 100,000 values (a YAML alias counts at each use)"],
    ),
}
# The defects whose trials once reached the store: run without --dry-run too.
RUN_FOR_REAL = ["empty_lr", "huge_seed", "odd_head_dim", "tiny_log2_lr"]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under root, by relative path."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(autouse=True)
def store(tmp_path: Path) -> Path:
    """./results/quickstart, the store of every grid here, already holding the quickstart's."""
    path = tmp_path / "results" / "quickstart"
    shutil.copytree(QUICKSTART_STORE, path)
    return path


def test_the_store_checked_is_the_one_a_good_grid_uses(tmp_path, store, sweep_cli):
    path = tmp_path / "good.yaml"
    path.write_text(grid(f"grid: {{width: [32], {OPT}}}"))
    out = sweep_cli("run", str(path), "--dry-run", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"-> {store}" in out.stdout


def refuse(sweep_cli, path: Path, *args: str) -> str:
    """Run `sweep run path args` in path's folder; check the refusal and that nothing there
    (the results folder and its store included) changed."""
    before = snapshot(path.parent)
    out = sweep_cli("run", str(path), *args, cwd=path.parent, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("error: "), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert snapshot(path.parent) == before
    return out.stderr


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_grid_is_refused_by_a_dry_run(tmp_path, sweep_cli, name):
    text, expected = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    stderr = refuse(sweep_cli, path, "--dry-run")
    for phrase in expected:
        assert phrase in stderr, stderr


@pytest.mark.parametrize("name", RUN_FOR_REAL)
def test_bad_grid_is_refused_by_a_real_run(tmp_path, sweep_cli, name):
    text, expected = BAD[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    stderr = refuse(sweep_cli, path, "--executor", "local")
    assert expected[0] in stderr, stderr


def test_many_errors_are_listed_up_to_a_cap(tmp_path, sweep_cli):
    # 100,000 invalid entries once printed 100,001 lines
    path = tmp_path / "many.yaml"
    path.write_text(grid(f"grid: {{width: [{', '.join(['0'] * 5000)}], {OPT}}}"))
    stderr = refuse(sweep_cli, path, "--dry-run")
    assert "grid.width.0: Input should be greater than or equal to 1" in stderr
    assert "... and 4,990 more errors" in stderr
    assert len(stderr.strip().splitlines()) == 1 + MAX_LISTED_ERRORS + 1


# Runs a command and prints its peak RSS in KiB. Linux keeps a process's peak across exec, so a
# child forked straight from a big pytest process would report pytest's size: fork from this
# small launcher instead.
_LAUNCH = (
    "import os, subprocess, sys\n"
    "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stderr)\n"
    "_, status, usage = os.wait4(p.pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_measured(*args: str, cwd: Path) -> tuple[int, str, float, float]:
    """Run `sweep args`: exit code, stderr, wall seconds and the peak RSS in MB of that process."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _LAUNCH, str(SWEEP), *args], cwd=cwd, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, else KiB
    return proc.returncode, proc.stderr, wall, int(proc.stdout.split()[-1]) / scale


@pytest.mark.skipif(not hasattr(os, "wait4"), reason="needs os.wait4")
@pytest.mark.parametrize("kind", ["over_trial_cap", "over_size_cap"])
def test_runaway_grids_are_refused_fast_in_bounded_memory(tmp_path, kind):
    # Before the caps: 10 million trials grew a dry run to 13 GB; a 50 MB file to 17 GB.
    path = tmp_path / "big.yaml"
    if kind == "over_trial_cap":
        path.write_text(BAD["over_trial_cap"][0])
        expected = "10,010,000 trials"
    else:
        with path.open("wb") as f:  # 50 MB, sparse
            f.truncate(50 * 2**20)
        expected = f"at most {MAX_GRID_BYTES:,} bytes"
    before = snapshot(tmp_path)
    code, stderr, wall, peak_mb = run_measured("run", str(path), "--dry-run", cwd=tmp_path)
    assert code == 2 and expected in stderr and "Traceback" not in stderr, stderr
    assert snapshot(tmp_path) == before
    # The CLI's own start (imports) is about 0.5 s and 130 MB; the refusal adds next to nothing.
    assert wall < 5, wall
    assert peak_mb < 400, peak_mb


def test_a_text_file_shorter_than_a_sequence_is_refused_before_anything_runs(tmp_path, sweep_cli):
    (tmp_path / "short.txt").write_text("x" * 1000)  # 5 % of it, 50 bytes, for validation
    path = tmp_path / "short.yaml"
    path.write_text(grid(f"data: {{text: short.txt}}\ngrid: {{width: [32], {OPT}}}"))
    stderr = refuse(sweep_cli, path, "--executor", "local")
    assert "short.txt: the validation split has 50 tokens" in stderr
    assert "fewer than seq_len + 1 = 129" in stderr
