"""The experiments: each module runs with `python -m experiments.NAME` from the repository root.

- `run_experiments`: the suite (comparison, ablation, temperature, long tail, embeddings).
- `experiment_report`: the suite's report from its result files, into README.md.
- `bench_loss`: the S-D loss's speed and memory against dense PyTorch.
- `dataset_stats`: the table and histograms of the embedded datasets.
- `text_reference`: a TF-IDF + logistic-regression reference on debtags.
"""
