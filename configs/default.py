"""S-D contrastive pre-training of a small ResNet on MNIST mosaics, then linear evaluation.

The README's main command. On a 2-core CPU it finishes in under 10 minutes.

COMMAND:
  python -m sdjax.main --config configs/default.py --workdir workdirs/default
  # any field can be overridden, e.g. a baseline loss:
  python -m sdjax.main --config configs/default.py --workdir workdirs/any \
      --config.loss.positives=any
  # the whole pipeline in seconds (tests, smoke checks):
  python -m sdjax.main --config configs/default.py:tiny --workdir /tmp/sdjax_tiny
"""

import ml_collections

from sdjax import config_lib


def get_config(profile: str = "") -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # "contrastive": stage 1 trains encoder + projection head with `loss`;
    # "bce": stage 1 trains encoder + linear head with sigmoid BCE (the supervised baseline);
    # "joint": encoder + projection head + linear classifier, BCE + loss.joint_weight * `loss`.
    config.method = "contrastive"
    # The contrast set of `loss`: "in_batch" (the other views of the global batch) or "moco"
    # (view 1 of the batch through a momentum encoder, plus a queue of earlier keys).
    config.framework = "in_batch"
    config.moco = ml_collections.ConfigDict()  # used by framework "moco" only
    config.moco.momentum = 0.999  # EMA rate of the key encoder, in [0, 1)
    config.moco.queue_size = 2048  # keys kept with their labels; a multiple of batch_size

    config.dataset = ml_collections.ConfigDict()
    config.dataset.name = "mnist_mosaic"
    config.dataset.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/.cache/sdjax/tensorflow_datasets
    config.dataset.source_dir = ""  # local source files, for builders that read them
    config.dataset.train_examples = 0  # > 0: use only the first N (fixed order); 0 = all
    config.dataset.test_examples = 0  # > 0: also limits the validation split
    # True: set the dataset's validation split aside (carved from its training data, disjoint
    # from test; each dataset module says how) and train on the rest.
    config.dataset.validation = False

    config.model = ml_collections.ConfigDict()
    config.model.encoder = ml_collections.ConfigDict()
    config.model.encoder.name = "resnet"
    config.model.encoder.stage_sizes = (1, 1)
    config.model.encoder.width = 16
    config.model.encoder.stem_stride = 4  # patchify stem: 56x56 -> 14x14
    config.model.projection_hidden_dim = 128
    config.model.projection_dim = 64

    config.loss = ml_collections.ConfigDict()
    config.loss.positives = "sd"
    config.loss.temperature = 0.1
    config.loss.jaccard_threshold = 0.5
    config.loss.block_size = 0  # 0 = automatic
    # How the contrast set crosses devices: "all_gather" (every device holds the global batch's
    # embeddings) or "ring" (shards travel round the devices; per-device memory O(N / devices)).
    config.loss.exchange = "all_gather"
    config.loss.joint_weight = 1.0  # method "joint": the weight of `loss` next to the BCE

    config.num_views = 2
    # Mixed precision: "bfloat16" computes the encoder and head in bfloat16; parameters, the
    # optimiser state and the loss stay float32. "float32" is the model as it always was.
    config.compute_dtype = "float32"
    # Gradient caching (sdjax/gradient_cache.py): > 0 embeds, then backpropagates, this many
    # encoder inputs (views) at a time, so activation memory does not grow with batch_size;
    # the gradient is the same up to float summation order. 0 = off.
    config.embedding_chunk_size = 0
    config.batch_size = 256  # global, split over all devices of all hosts
    config.num_train_steps = 400

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_only_matrices = False  # True: no decay of biases, norms, 1-d weights
    config.optimizer.warmup_steps = 50
    # method "joint": the classifier's own peak learning rate, so that it can converge while
    # the encoder trains gently; 0 = optimizer.learning_rate.
    config.optimizer.classifier_learning_rate = 0.0

    config.linear_eval = ml_collections.ConfigDict()
    config.linear_eval.num_steps = 1000
    config.linear_eval.batch_size = 512
    config.linear_eval.learning_rate = 1e-2
    config.linear_eval.weight_decay = 1e-5

    # The evaluators that score the model after training (sdjax/evaluators/, one module each;
    # they run in the order of sdjax.evaluators.EVALUATORS), and the results.json entries they add.
    config.evals = ml_collections.ConfigDict()
    config.evals.heldout_loss = True  # "heldout_stage1_loss": a held-out batch, initial and final
    config.evals.linear_probe = True  # "linear_eval": a linear probe of the frozen encoder
    config.evals.joint_classifier = True  # "classifier": method "joint"'s own classifier
    config.evals.random_init_probe = True  # "random_init": the probe of the untrained encoder
    config.evals.save_test_outputs = False  # workdir/test_outputs.npz: features, scores, labels
    config.evals.long_tail = False  # "long_tail": frequency-third metrics, bootstrapped on test

    # What the evaluators score: "test" (and the validation split beside it, if there is one)
    # or "validation" alone, for choosing settings: test is then never loaded.
    config.eval_split = "test"
    config.eval_batch_size = 512
    config.log_every_steps = 25
    config.checkpoint_every_steps = 100
    config.max_checkpoints_to_keep = 3

    # Multi-host runs (see sdjax/multihost.py): `enabled` alone suits managed clusters, which
    # jax detects; plain hosts set the rest here or through SDJAX_* environment variables.
    config.multihost = ml_collections.ConfigDict()
    config.multihost.enabled = False
    config.multihost.coordinator_address = ""  # host:port of process 0
    config.multihost.num_processes = 0  # 0 = from the environment or the cluster
    config.multihost.process_id = -1  # -1 = from the environment or the cluster
    config.multihost.initialization_timeout_s = 0  # 0 = from the environment, else 300

    return config_lib.apply_profile(config, profile, tiny=tiny)


def tiny(config: ml_collections.ConfigDict) -> None:
    """The tiny profile's model: one stage of width 8, small heads, a faster rate."""
    config.model.encoder.stage_sizes = (1,)
    config.model.encoder.width = 8
    config.model.projection_hidden_dim = 32
    config.model.projection_dim = 16
    config.optimizer.learning_rate = 1e-2
