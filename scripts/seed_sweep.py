"""Runs the randomised tests (those drawing from the seeded `rng` fixture) of the given test files for many fresh
seeds, one pytest process per seed, to find a seed that fails before CI draws it. Not part of CI.

    .venv/bin/python scripts/seed_sweep.py --seeds=200 --output=/tmp/seed_sweep.json \
        tests/test_pallas_kernels.py tests/test_mosaic_estimate.py tests/test_mosaic_sparse_attention.py \
        tests/test_reference_selection.py tests/test_sparse_wgmma.py

Writes, after every seed, the seeds run and each failing test with its seed (replay one with
`SALE_TEST_SEED=<seed> bash scripts/test.sh <test id>`). Stops early after --hours.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import subprocess
import sys
import time

_FAILED = re.compile(r"^FAILED (\S+)", re.MULTILINE)


def run_seed(seed: int, files: list[str]) -> tuple[list[str], str]:
    """The ids of the tests that failed at `seed`, and pytest's last line."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--randomised-only", "-rf", *files]
    completed = subprocess.run(command, env=os.environ | {"SALE_TEST_SEED": str(seed)}, capture_output=True,
                               text=True)
    lines = completed.stdout.strip().splitlines()
    summary = lines[-1] if lines else completed.stderr.strip()[-300:]
    failed = _FAILED.findall(completed.stdout)
    if completed.returncode not in (0, 1) or (completed.returncode == 1 and not failed):
        failed = [f"pytest exited {completed.returncode}: {summary}"]
    return failed, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="Test files whose randomised tests are swept.")
    parser.add_argument("--seeds", type=int, default=200, help="Fresh seeds to run.")
    parser.add_argument("--hours", type=float, default=24.0, help="Stop after this long, with the seeds run so far.")
    parser.add_argument("--output", required=True, help="JSON record, rewritten after every seed.")
    args = parser.parse_args()
    record = {"files": args.files, "seeds_run": [], "failures": [], "seconds": 0.0}
    start = time.time()
    for index in range(args.seeds):
        if time.time() - start > args.hours * 3600:
            break
        seed = secrets.randbits(32)
        failed, summary = run_seed(seed, args.files)
        record["seeds_run"].append(seed)
        record["failures"] += [{"seed": seed, "test": test} for test in failed]
        record["seconds"] = time.time() - start
        with open(args.output, "w") as f:
            json.dump(record, f, indent=1)
        print(f"[{index + 1}/{args.seeds}] seed {seed}: {summary}", flush=True)
    print(f"{len(record['seeds_run'])} seeds, {len(record['failures'])} failures: {record['failures']}")


if __name__ == "__main__":
    main()
