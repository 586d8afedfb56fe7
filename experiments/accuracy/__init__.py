"""Accuracy: the accuracy-density frontier against other block selections, the retrieval model's accuracy with
dense attention and SALE, and the kernels against the reference on a GPU."""
