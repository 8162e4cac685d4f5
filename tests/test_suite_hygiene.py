"""The test suite and the tools never end a Ray instance they did not start.

Ray's stop command ends every Ray instance of the machine, a user's running sweep included; the
tests' cluster runs in its own process group and only that group is ended (tests/conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The command's two words, kept apart so that this file does not spell the command out itself
# (a plain grep for it over tests/ then finds only real uses).
RAY = "ray"
STOP = "stop"
# as a shell line, or as an argument list ("ray", "<verb>") / (BIN / "ray"), "<verb>"
COMMAND = re.compile(rf"""\b{RAY}\b["')\s,]*(?:\]\s*)?["']?\s*,?\s*["']?{STOP}\b""")


def test_no_file_here_ends_every_ray_instance():
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
        if COMMAND.search(line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


def test_the_pattern_catches_the_usual_spellings():
    for line in (
        f'subprocess.run(["{RAY}", "{STOP}", "--force"])',
        f"subprocess.run([str(BIN / '{RAY}'), '{STOP}'])",
        f"os.system('{RAY} {STOP}')",
        f"{RAY} {STOP} --force",
    ):
        assert COMMAND.search(line), line
    assert not COMMAND.search(f"{RAY}.shutdown()  # ends what {RAY}.init started")
