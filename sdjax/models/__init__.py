"""Flax NNX encoders and heads."""

import jax.numpy as jnp
from flax import nnx

from sdjax.models.bag_of_ngrams import BagOfNgramsEncoder
from sdjax.models.contrastive import ContrastiveModel, JointModel
from sdjax.models.heads import LinearClassifier, ProjectionHead
from sdjax.models.mlp import MLPEncoder
from sdjax.models.momentum_encoder import MomentumEncoder, QueueState
from sdjax.models.resnet import ResNetEncoder
from sdjax.models.transformer import TextTransformerEncoder

__all__ = [
    "COMPUTE_DTYPES",
    "BagOfNgramsEncoder",
    "ContrastiveModel",
    "JointModel",
    "LinearClassifier",
    "MLPEncoder",
    "MomentumEncoder",
    "ProjectionHead",
    "QueueState",
    "ResNetEncoder",
    "TextTransformerEncoder",
    "compute_dtype",
    "create_encoder",
    "create_model",
    "evaluation_view",
]

# Mixed precision: parameters (and so the optimiser state) are float32 whatever this is;
# activations are in the compute dtype; the heads' outputs and the loss are float32.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
    """The jnp dtype of the config field `compute_dtype` ("float32" or "bfloat16")."""
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"config.compute_dtype: got {name!r}, expected one of {sorted(COMPUTE_DTYPES)}."
        )
    return COMPUTE_DTYPES[name]


def evaluation_view(model: nnx.Module) -> nnx.Module:
    """`model` with its dropout layers off (nnx.view, sharing the parameters), for evaluation.

    A model without dropout is returned as it is (nnx.view rejects attributes no module has).
    """
    if any(isinstance(node, nnx.Dropout) for _, node in nnx.iter_graph(model)):
        return nnx.view(model, only=nnx.Dropout, deterministic=True)
    return model


def create_model(
    config, num_classes: int, seed: int, *, classifier_head: bool = False
) -> ContrastiveModel:
    """Encoder plus a stage-1 head: the projection head of `config.model`, or with
    `classifier_head` a linear classifier over `num_classes` (the BCE baseline's).

    Both compute in `config.compute_dtype` (absent: "float32"); their parameters are float32.
    """
    rngs = nnx.Rngs(seed)
    dtype = compute_dtype(config.get("compute_dtype", "float32"))
    encoder = create_encoder(config.model.encoder, rngs=rngs, dtype=dtype)
    head: nnx.Module
    if classifier_head:
        head = LinearClassifier(encoder.features_dim, num_classes, rngs=rngs, dtype=dtype)
    else:
        head = ProjectionHead(
            encoder.features_dim,
            config.model.projection_hidden_dim,
            config.model.projection_dim,
            rngs=rngs,
            dtype=dtype,
        )
    return ContrastiveModel(encoder, head)


def create_encoder(config, *, rngs, dtype=None):
    """An encoder from `config.name` ("resnet", "mlp", "transformer" or "bag_of_ngrams") and its
    fields, computing in `dtype` (None: float32)."""
    if config.name == "resnet":
        return ResNetEncoder(
            stage_sizes=tuple(config.stage_sizes),
            width=config.width,
            in_channels=config.in_channels,
            stem_stride=config.get("stem_stride", 4),
            block=config.get("block", "basic"),
            rngs=rngs,
            dtype=dtype,
        )
    if config.name == "mlp":
        return MLPEncoder(
            in_features=config.in_features,
            hidden_sizes=tuple(config.hidden_sizes),
            dropout_rate=config.get("dropout_rate", 0.0),
            rngs=rngs,
            dtype=dtype,
        )
    if config.name == "transformer":
        return TextTransformerEncoder(
            vocab_size=config.vocab_size,
            max_length=config.max_length,
            width=config.width,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_dim=config.mlp_dim,
            rngs=rngs,
            dtype=dtype,
        )
    if config.name == "bag_of_ngrams":
        return BagOfNgramsEncoder(
            vocab_size=config.vocab_size,
            width=config.width,
            num_buckets=config.get("num_buckets", 0),
            hidden_dim=config.get("hidden_dim", 0),
            token_weights=config.get("token_weights", False),
            dropout_rate=config.get("dropout_rate", 0.0),
            layer_norm=config.get("layer_norm", False),
            rngs=rngs,
            dtype=dtype,
        )
    raise ValueError(
        f"config.model.encoder.name: got {config.name!r}, expected 'resnet', 'mlp', "
        "'transformer' or 'bag_of_ngrams'."
    )
