"""Wall-clock timing of jitted JAX calls: compile and warm up first, block on results, report the median."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
