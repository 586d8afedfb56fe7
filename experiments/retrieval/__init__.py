"""The retrieval model: training a small byte-level Llama on long-context key-value retrieval, and exporting its
checkpoint (docs/retrieval_model.md)."""
