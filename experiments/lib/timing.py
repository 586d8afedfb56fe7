"""Wall-clock timing of jitted JAX calls: compile and warm up first, block on results, report the median."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    return interleaved_median_seconds({"fn": fn}, repeats, warmup)["fn"]


def interleaved_median_seconds(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Each function's median time over `repeats` rounds that call every function once in turn, so a drift of the
    machine's speed (clocks, temperature, other work) reaches every function alike instead of whichever ran last."""
    for fn in fns.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}
