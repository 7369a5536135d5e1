"""Flax NNX encoders and heads."""

from flax import nnx

from sdjax.models.contrastive import ContrastiveModel
from sdjax.models.heads import LinearClassifier, ProjectionHead
from sdjax.models.mlp import MLPEncoder
from sdjax.models.resnet import ResNetEncoder
from sdjax.models.transformer import TextTransformerEncoder

__all__ = [
    "ContrastiveModel",
    "LinearClassifier",
    "MLPEncoder",
    "ProjectionHead",
    "ResNetEncoder",
    "TextTransformerEncoder",
    "create_encoder",
    "create_model",
]


def create_model(config, num_classes: int, seed: int) -> ContrastiveModel:
    """Encoder plus the stage-1 head: projection (contrastive) or linear classifier (bce)."""
    rngs = nnx.Rngs(seed)
    encoder = create_encoder(config.model.encoder, rngs=rngs)
    if config.method == "bce":
        head = LinearClassifier(encoder.features_dim, num_classes, rngs=rngs)
    else:
        head = ProjectionHead(
            encoder.features_dim,
            config.model.projection_hidden_dim,
            config.model.projection_dim,
            rngs=rngs,
        )
    return ContrastiveModel(encoder, head)


def create_encoder(config, *, rngs):
    """An encoder from `config.name` ("resnet", "mlp" or "transformer") and its fields."""
    if config.name == "resnet":
        return ResNetEncoder(
            stage_sizes=tuple(config.stage_sizes),
            width=config.width,
            in_channels=config.in_channels,
            stem_stride=config.get("stem_stride", 4),
            block=config.get("block", "basic"),
            rngs=rngs,
        )
    if config.name == "mlp":
        return MLPEncoder(
            in_features=config.in_features,
            hidden_sizes=tuple(config.hidden_sizes),
            dropout_rate=config.get("dropout_rate", 0.0),
            rngs=rngs,
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
        )
    raise ValueError(
        f"config.model.encoder.name: got {config.name!r}, expected 'resnet', 'mlp' or "
        "'transformer'."
    )
