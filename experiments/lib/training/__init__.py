"""Training a Llama of `models/` on synthetic tasks, as the retrieval model was trained (docs/retrieval_model.md).

    tasks.py           the `Task` interface a task implements, and weighted mixtures of tasks
    curriculum.py      lengths by stage at a constant number of tokens per step, with replay and placement draws
    seeds.py           the random streams of a run (every draw seeded by the run's seed and the step alone)
    optimizer.py       AdamW with warmup, cosine decay, gradient clipping and weight decay on matrices
    lookback_probe.py  the training-only probe whose loss makes the first layer gather local context
    step.py            the loss and one jitted update
    run_directory.py   a run's folder: the checkpoint, the optimizer and probe state, the log, resumption
    loop.py            `train`: the steps of a recipe, saved and resumable

Nothing here is an entry point; `experiments/retrieval/train.py` is one. This file imports nothing, and `tasks`,
`curriculum` and `seeds` only numpy, so that the processes that build batches (experiments/lib/batch_prefetch.py)
start without JAX.
"""
