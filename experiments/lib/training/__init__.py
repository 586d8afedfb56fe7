"""Training a Llama of `models/` on synthetic tasks, as the retrieval model was trained (docs/retrieval_model.md).

    curriculum.py      lengths by stage at a constant number of tokens per step, with replay and placement draws
    seeds.py           the random streams of a run (every draw seeded by the run's seed and the step alone)
    optimizer.py       AdamW with warmup, cosine decay, gradient clipping and weight decay on matrices
    lookback_probe.py  the training-only probe whose loss makes the first layer gather local context
    step.py            the loss and one jitted update
    run_directory.py   a run's folder: the checkpoint, the optimizer and probe state, the log, resumption
    loop.py            `Recipe` (the task, curriculum, optimizer, loss, seed) and `train`: its steps, saved and
                       resumable

A run trains on any task of the task suite's interface, or a weighted mixture of them (experiments/lib/tasks,
docs/tasks.md); a step's batch is `experiments.lib.tasks.common.batch` of the step's seed, which the processes
that build batches ahead of the steps (experiments/lib/batch_prefetch.py) run in numpy alone. Nothing here is an
entry point; `experiments/retrieval/train.py` is one.
"""
