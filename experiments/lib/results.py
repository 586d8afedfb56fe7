"""The one writer of result files: every JSON an experiment script writes goes through `write`, which stamps it
with where it came from.

The top-level `provenance` block holds the git commit of the checkout (and whether tracked files differed from
it), the command line as `python -m <module> <arguments>`, the device JAX ran on, the jax version, and the
`SaleConfig` the script ran (null where it ran none). Plots and other files a result comes with are written
beside its JSON (`beside`) and named in it under `files`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax

from sale_jax import SaleConfig

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def _git(*arguments: str) -> str | None:
    try:
        result = subprocess.run(["git", *arguments], cwd=REPOSITORY, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran, as `python -m <module> <arguments>`: `python -m` puts the module's file path in
    `argv[0]`, which maps back to its module name under the repository."""
    argv = sys.argv if argv is None else argv
    program = pathlib.Path(argv[0]).resolve()
    if program.suffix == ".py" and program.is_relative_to(REPOSITORY):
        module = ".".join(program.relative_to(REPOSITORY).with_suffix("").parts)
        return shlex.join(["python", "-m", module, *argv[1:]])
    return shlex.join(argv)


def provenance(config: SaleConfig | None) -> dict:
    """Commit ("unknown" outside a git checkout; `dirty` then False), the command line, device, jax version and
    the `SaleConfig` (or None). `dirty` counts tracked files only: results written into the checkout by an earlier
    run of the same study do not make it."""
    commit = _git("rev-parse", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "commit": commit or "unknown",
        "dirty": bool(changes),
        "command": command_line(),
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "sale_config": None if config is None else config.to_dict(),
        "recorded": "by the script",
    }


def beside(output: str | os.PathLike, name: str) -> str:
    """The path of a file written next to the JSON `output` (a plot, a thresholds file); makes the folder."""
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, name)


def plot_path(output: str | os.PathLike) -> str:
    """Where the plot of the JSON `output` goes: the same name with `.png` (beside it)."""
    return beside(output, pathlib.Path(output).with_suffix(".png").name)


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend: no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike, title: str) -> None:
    """Titles `fig` with `title` and the device the figures were measured on, then writes it to `path`."""
    fig.suptitle(f"{title} ({jax.devices()[0].device_kind})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(output: str | os.PathLike, data: dict, config: SaleConfig | None,
          files: tuple[str | os.PathLike, ...] = ()) -> None:
    """Writes `data` as JSON to `output` (creating its folder), under a `provenance` block and, when given,
    `files`: the names of the files the script writes beside it (paths from `beside` or `plot_path`)."""
    if "provenance" in data or "files" in data:
        raise ValueError("result data must not have top-level 'provenance' or 'files' keys: write adds them")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    record = {"provenance": provenance(config)}
    if files:
        record["files"] = [os.path.basename(path) for path in files]
    with open(output, "w") as f:
        json.dump(record | data, f, indent=1)
        f.write("\n")
    print(f"wrote {output}")
