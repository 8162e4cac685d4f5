#!/usr/bin/env bash
# Set up sweeper in a virtual environment (.venv, or $VENV): ./install.sh
#
# torch: an importable torch is kept as it is (the venv then sees the system's packages, so a
# CUDA build on a GPU machine stays); otherwise a machine with an NVIDIA driver gets PyPI's
# CUDA build and any other machine the CPU build (about 200 MB instead of several GB).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CPU_INDEX=https://download.pytorch.org/whl/cpu

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "keeping the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    "$PYTHON" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install "torch>=2.4"
    elif "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$CPU_INDEX/', timeout=10)" \
            2>/dev/null; then
        pip install "torch==2.13.0" --extra-index-url "$CPU_INDEX"
    else
        # PyTorch's index is out of reach (a closed network): take what the package index has.
        pip install "torch==2.13.0"
    fi
fi
pip install -e ".[dev]"
echo "installed: $VENV/bin/sweep"
