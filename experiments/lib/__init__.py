"""What the experiment scripts share: common flags, the result writer, timing, synthetic layouts, the retrieval
task and its scoring. Nothing here is an entry point."""
