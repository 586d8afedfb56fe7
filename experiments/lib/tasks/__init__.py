"""Long-context tasks of RULER's categories (arXiv 2404.06654), byte-level and seeded, for training and scoring a
small model on attention that must retrieve, follow chains and aggregate (docs/tasks.md).

One module per task (`single_needle`, `multi_key`, `multi_value`, `multi_query`, `variable_tracking`,
`aggregation`), what they share in `common` (filler, records, queries, placement by depth, and the interface:
`Task`, `Example`, `batch`), and the registry of default tasks with their weighted mixture in `registry`. Every
task has `draw(rng, length, depth) -> common.Example`; the training library (experiments/lib/training) trains on
any of them, or on a mixture.

This file imports nothing: experiments/lib/retrieval_task.py (which `single_needle` draws) imports `common`.
"""
