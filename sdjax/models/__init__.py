"""Flax NNX encoders and heads."""

from sdjax.models.contrastive import ContrastiveModel
from sdjax.models.heads import LinearClassifier, ProjectionHead
from sdjax.models.mlp import MLPEncoder
from sdjax.models.resnet import ResNetEncoder

__all__ = [
    "ContrastiveModel",
    "LinearClassifier",
    "MLPEncoder",
    "ProjectionHead",
    "ResNetEncoder",
    "create_encoder",
]


def create_encoder(config, *, rngs):
    """An encoder from `config.name` ("resnet" or "mlp") and that encoder's fields."""
    if config.name == "resnet":
        return ResNetEncoder(
            stage_sizes=tuple(config.stage_sizes),
            width=config.width,
            in_channels=config.in_channels,
            stem_stride=config.get("stem_stride", 4),
            rngs=rngs,
        )
    if config.name == "mlp":
        return MLPEncoder(
            in_features=config.in_features,
            hidden_sizes=tuple(config.hidden_sizes),
            dropout_rate=config.get("dropout_rate", 0.0),
            rngs=rngs,
        )
    raise ValueError(f"config.model.encoder.name: got {config.name!r}, expected 'resnet' or 'mlp'.")
