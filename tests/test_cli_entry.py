"""The command's entry points: `depthkit --version` and `python -m depthkit`, one version everywhere."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import depthkit


def test_python_m_depthkit_runs_the_command_and_tells_its_version():
    result = subprocess.run([sys.executable, "-m", "depthkit", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"depthkit {depthkit.__version__}"
    assert version("depthkit") == depthkit.__version__  # the installed metadata reads the same single source
