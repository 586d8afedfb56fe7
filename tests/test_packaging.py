"""The install path: the CUDA extras pin the jax that constraints.txt locks, and the setup script says what it
takes. (That the extras resolve against a package index is the README's `pip install --dry-run` command.)"""

import pathlib
import re
import subprocess
import tomllib

REPOSITORY = pathlib.Path(__file__).resolve().parent.parent


def _locked(name: str) -> str:
    match = re.search(rf"^{name}==(\S+)$", (REPOSITORY / "constraints.txt").read_text(), re.MULTILINE)
    assert match, f"constraints.txt locks no {name}"
    return match.group(1)


def test_cuda_extras_pin_the_locked_jax():
    extras = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _locked("jax") == _locked("jaxlib")
    for cuda in ("cuda12", "cuda13"):
        assert extras[cuda] == [f"jax[{cuda}]=={_locked('jax')}"], extras[cuda]


def test_setup_script_refuses_an_unknown_build():
    result = subprocess.run(["bash", "scripts/setup.sh", "--cuda=11"], cwd=REPOSITORY, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown argument '--cuda=11'" in result.stderr and "--cuda=13" in result.stderr
