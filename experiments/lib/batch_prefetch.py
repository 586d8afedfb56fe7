"""Builds training batches in worker processes, ahead of the steps that use them.

A retrieval batch is built in numpy one sequence at a time: 512 sequences of 256 tokens take about 0.2 s on one
core, longer than a training step of the small model on an H200. Worker processes build the batches of the next
steps while the device trains; each batch depends only on its step (it is seeded by it), so the result is the same
with any number of workers.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Callable


class BatchPrefetcher:
    """`get(step)` returns `build(*arguments(step))`, built up to `ahead` steps in advance by `workers` processes.

    `build` must be a module-level function (it is pickled by reference), `arguments(step)` cheap and picklable.
    With `workers=0` every batch is built in this process when asked for. Steps must be asked for in order.
    """

    def __init__(self, build: Callable, arguments: Callable[[int], tuple], end: int, workers: int):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self._build, self._arguments, self._end = build, arguments, end
        self._ahead = 2 * workers
        self._pending: dict[int, concurrent.futures.Future] = {}
        # Spawned, not forked: the parent runs JAX's threads, which a fork would copy mid-flight.
        self._pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
                      if workers else None)

    def get(self, step: int):
        if self._pool is None:
            return self._build(*self._arguments(step))
        for upcoming in range(step, min(step + self._ahead, self._end)):
            if upcoming not in self._pending:
                self._pending[upcoming] = self._pool.submit(self._build, *self._arguments(upcoming))
        stale = [s for s in self._pending if s < step]
        for s in stale:
            self._pending.pop(s).cancel()
        return self._pending.pop(step).result()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
