"""One voice: ruff (pyproject.toml's [tool.ruff]) passes on the whole repository."""

import subprocess
import sys

from conftest import REPO


def test_ruff_passes_on_the_repository():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
