"""Scripts that run SALE and write results, grouped by purpose; each is run as `python -m experiments.<path>`.

    demo.py       the main job: a Llama prefilling a long prompt, dense attention against SALE
    benchmarks/   speed: attention end to end, its passes, kernel variants, the estimate kernel, a model's prefill
    accuracy/     accuracy: the accuracy-density frontier, retrieval accuracy, kernels against the reference
    retrieval/    training the retrieval model and exporting its checkpoint
    tools/        calibration of thresholds, an attention-only demo
    lib/          what the scripts share: common flags, the result writer, timing, the retrieval task, synthetic
                  workloads, JSON prompts, the competitors' selections
    results/      committed results by study (results/README.md lists them)
"""
