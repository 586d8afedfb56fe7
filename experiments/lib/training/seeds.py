"""The random streams of a training run. Every draw is seeded by the run's seed, a stream and the step (or an index)
alone, so that a resumed run, and batches built in other processes, draw what an uninterrupted run draws.

experiments/accuracy/retrieval_eval.py draws its sequences from (seed, 2, ...) and (seed, 3, ...).
"""

BATCHES = 0  # (seed, BATCHES, step): the step's rows, one child seed each (a mixture's row picks its task from it)
EVALUATION = 1  # (seed, EVALUATION, length, index): evaluation sequences, which no training step draws
REPLAY = 4  # (seed, REPLAY, step): whether the step trains at an earlier stage's length, and which
PLACEMENT = 5  # (seed, PLACEMENT, step): where the step's answers sit
