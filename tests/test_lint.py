"""The linter's rules (pyproject.toml's [tool.ruff]) hold over the whole repository."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_passes_on_the_whole_repository():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
