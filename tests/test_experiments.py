"""Every experiment script imports and parses its flags (the GPU-only ones are otherwise never run by CI)."""

import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted(p.stem for p in (pathlib.Path(__file__).parent.parent / "experiments").glob("*.py")
                 if p.stem != "__init__" and "app.run(main)" in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_shows_its_flags(script):
    result = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=pathlib.Path(__file__).parent.parent)
    # absl prints the module docstring and its flags, then exits with status 1 after --help.
    assert result.returncode in (0, 1) and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"experiments.{script}" in result.stdout and "\n  --" in result.stdout, result.stdout[-2000:]
