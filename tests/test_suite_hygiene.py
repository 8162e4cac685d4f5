"""The test suite and the tools never end a Ray instance they did not start.

`ray stop` ends every Ray instance of the machine, a user's running sweep included; the tests'
cluster runs in its own process group and only that group is ended (tests/conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `ray stop`, as a shell line or as an argument list ("ray", "stop") / (BIN / "ray"), "stop"
RAY_STOP = re.compile(r"""\bray\b["')\s,]*(?:\]\s*)?["']?\s*,?\s*["']?stop\b""")


def test_nothing_here_runs_ray_stop():
    files = [
        p
        for folder in ("tests", "sweeper", "benchmarks", "analysis", ".ci")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix in (".py", ".sh", "") and p != Path(__file__)
    ] + [ROOT / "install.sh"]
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in files
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if RAY_STOP.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_the_pattern_catches_the_usual_spellings():
    for line in (
        'subprocess.run(["ray", "stop", "--force"])',
        "subprocess.run([str(BIN / 'ray'), 'stop'])",
        "os.system('ray stop')",
        "ray stop --force",
    ):
        assert RAY_STOP.search(line), line
    assert not RAY_STOP.search("ray.shutdown()  # stops what ray.init started")
