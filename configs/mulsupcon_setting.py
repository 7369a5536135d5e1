"""MulSupCon's published Yeast set-up (Zhang and Wu, AAAI 2024), as far as the offline data allows.

Their official trainer (`config/pretrain_yeast.yaml` and `models.py` of
github.com/williamzhangsjtu/MulSupCon) pre-trains an MLP on Yeast with MoCo: the loss of the
queries (view 0) against the momentum encoder's keys of the batch plus a label-carrying queue,
with their per-label positives (`positives="mulsupcon"`). Kept as they have it:

- framework "moco": key encoder momentum 0.999, queue of 256 keys (`cap_Q`), batch size 64;
- loss "mulsupcon", temperature 0.1 (the query/key form of docs/SPEC.md is their estimator);
- MLP encoder 103 -> 256 -> 512 -> 256, projection head 256 -> 256 -> 256 (one hidden layer);
- Adam(W) with learning rate 4e-4 and weight decay 1e-5; 150 epochs of 1,000 iterations, i.e.
  150,000 steps of batch 64.

Deviations, each because the data, the models or the trainer here differ:

- Data: `river`'s copy of Yeast with a fixed seeded 1,500 / 917 split (MULAN's sizes, not its
  rows; sdjax/datasets/yeast.py), no validation split; they use MULAN's split with a
  validation set for model selection.
- Encoder: sdjax's MLP has LayerNorm + GELU per layer, not ReLU; dropout 0 instead of their
  0.2, because sdjax's dropout also acts when features are extracted for evaluation.
- Projection head: Linear, ReLU, Linear (no BatchNorm, no dropout 0.1), L2-normalised.
- Views: sdjax's tabular views (Gaussian noise 0.1, then each feature zeroed w.p. 0.1) instead
  of their masking of each standardised feature w.p. 0.5.
- Queue: used from the first step, its empty entries masked out; theirs joins the loss only
  once full (after 4 steps here). The queue starts empty, theirs with random keys it never uses.
- Schedule: linear warmup (none here) and one cosine decay to 0 over the run, instead of cosine
  annealing with warm restarts (T_0 = 50 epochs, T_mult 2, eta_min 1e-4); AdamW's decoupled
  weight decay instead of Adam's L2 term.
- Evaluation: the linear probe on frozen features (and, with `method="joint"`, the jointly
  trained classifier); they fine-tune the whole network (backbone learning rate x 0.1) with
  early stopping on the validation set.

COMMAND:
  python -m sdjax.main --config configs/mulsupcon_setting.py --workdir workdirs/mulsupcon
  python -m sdjax.main --config configs/mulsupcon_setting.py:tiny --workdir /tmp/mulsupcon_tiny
"""

from pathlib import Path

import ml_collections

from sdjax import config_lib


def get_config(profile: str = ""):
    config = config_lib.load_config_file(Path(__file__).with_name("default.py"))
    config.dataset.name = "yeast"
    config.framework = "moco"
    config.moco.momentum = 0.999
    config.moco.queue_size = 256
    config.loss.positives = "mulsupcon"
    config.loss.temperature = 0.1
    config.model.encoder = ml_collections.ConfigDict(
        {"name": "mlp", "hidden_sizes": (256, 512, 256), "dropout_rate": 0.0}
    )
    config.model.projection_hidden_dim = 256
    config.model.projection_dim = 256
    config.batch_size = 64
    config.num_train_steps = 150_000
    config.optimizer.learning_rate = 4e-4
    config.optimizer.weight_decay = 1e-5
    config.optimizer.warmup_steps = 0
    config.linear_eval.num_steps = 1000
    config.linear_eval.batch_size = 256
    config.eval_batch_size = 256
    config.log_every_steps = 1000
    config.checkpoint_every_steps = 10_000

    return config_lib.apply_profile(config, profile, tiny=tiny)


def tiny(config) -> None:
    config.model.encoder.hidden_sizes = (32,)
    config.model.projection_hidden_dim = 32
    config.model.projection_dim = 16
