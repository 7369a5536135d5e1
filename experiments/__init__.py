"""The experiments: each module runs with `python -m experiments.NAME` from the repository root.

The experiment suite and the tuning protocol:
- `run_experiments`: runs the suite (comparison, ablation, temperature, long tail, embeddings)
  or a protocol profile, resumably.
- `suite`: what the suite runs: datasets, methods, seeds, profiles, where results live.
- `budgets`: the suite's budgets ("quick", "gpu"): how its profiles change the config files.
- `protocol`: the tuning protocol, fixed before its runs: what is tuned, on what, how chosen.
- `experiment_report`: the suite's tables, tests and figures from its result files, into README.md.
- `protocol_report`: the report of a protocol profile, from its result files alone.
- `stats`: Holm's correction, the two-stage paired bootstrap, TOST.
- `text_reference`: a TF-IDF + logistic-regression reference on debtags.
- `joint_head`: why debtags' joint classifiers trail probes on their own encoders, on validation.
- `debtags_model`: the best debtags model against the TF-IDF reference, over seeds.
- `dataset_stats`: the table and histograms of the embedded datasets.

Benchmarks, which write their results into experiments/results/:
- `bench_loss`: the S-D loss's speed and memory against dense PyTorch.
- `bench_loss_scaling`: the loss at the paper's scale, thousands of labels, batches over devices.
- `bench_streaming`: per-host memory while training batches stream through grain.
- `bench_train`: stage-1 training throughput and peak memory against a PyTorch peer.
- `profile_train_step`: where a CPU training step's time goes, sdjax's against PyTorch's.
- `conv_repro`: XLA:CPU's slow convolutions, reproduced.
- `kernel_grads`: ResNet-50's 3x3 kernel gradients, XLA's forms against PyTorch's oneDNN.
- `page_faults`: XLA:CPU's per-call temporaries faulted in afresh, with and without huge pages.
- `device_kit`: every accelerator measurement in one short call, packed here, run there.
"""
