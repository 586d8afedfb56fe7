"""What the experiment scripts share: common flags, the result writer, timing, synthetic layouts, the retrieval
task and its scoring, the training library (`training/`), and the fixtures studies run on: LLM-like synthetic
Q/K/V (`workloads`), JSON key-value prompts (`kv_prompts`) and the block selections SALE is compared against
(`selection_baselines`). Nothing here is an entry point."""
