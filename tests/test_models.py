"""Flax NNX encoders and heads: shapes, normalisation, errors, and a training step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import config_lib, losses, models


def encoder_config(**fields):
    return ml_collections.ConfigDict(fields)


def test_resnet_family_shapes_and_determinism():
    for stage_sizes, width, dim in [((1,), 8, 8), ((1, 1), 16, 32), ((2, 1, 1), 8, 32)]:
        config = encoder_config(name="resnet", stage_sizes=stage_sizes, width=width, in_channels=1)
        encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
        features = encoder(jnp.ones((3, 56, 56, 1)))
        assert features.shape == (3, dim) == (3, encoder.features_dim)
        again = models.create_encoder(config, rngs=nnx.Rngs(0))(jnp.ones((3, 56, 56, 1)))
        np.testing.assert_array_equal(features, again)


@pytest.mark.parametrize(
    ("block", "stage_sizes", "torchvision_total", "fc", "shortcut_norms"),
    [
        ("basic", (2, 2, 2, 2), 11_689_512, 513_000, 2 * (128 + 256 + 512)),  # resnet18
        ("basic", (3, 4, 6, 3), 21_797_672, 513_000, 2 * (128 + 256 + 512)),  # resnet34
        ("bottleneck", (3, 4, 6, 3), 25_557_032, 2_049_000, 0),  # resnet50
    ],
)
def test_resnet_parameter_counts_match_torchvision(
    block, stage_sizes, torchvision_total, fc, shortcut_norms
):
    # torchvision's totals less its 1000-way classifier, with its 7x7x3x64 stem swapped for the
    # 4x4 patchify stem; GroupNorm has BatchNorm's two parameters per channel. Basic blocks here
    # have no norm on a projected shortcut, bottleneck blocks do (as torchvision's both do).
    expected = torchvision_total - fc - 7 * 7 * 3 * 64 + 4 * 4 * 3 * 64 - shortcut_norms
    config = encoder_config(
        name="resnet", stage_sizes=stage_sizes, width=64, in_channels=3, block=block
    )
    # Shapes only: initialising and running 11-26M parameters eagerly would take most of a minute.
    encoder = nnx.eval_shape(lambda: models.create_encoder(config, rngs=nnx.Rngs(0)))
    count = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(encoder, nnx.Param)))
    assert count == expected
    assert encoder.features_dim == (2048 if block == "bottleneck" else 512)
    images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    assert nnx.eval_shape(lambda e, x: e(x), encoder, images).shape == (2, encoder.features_dim)


def test_mlp_encoder_and_heads():
    config = encoder_config(name="mlp", in_features=103, hidden_sizes=[64, 32], dropout_rate=0.1)
    encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
    head = models.ProjectionHead(encoder.features_dim, 16, 8, rngs=nnx.Rngs(1))
    model = models.ContrastiveModel(encoder, head)
    x = jax.random.normal(jax.random.key(0), (5, 103))
    embeddings = model(x)
    assert embeddings.shape == (5, 8) and model.encode(x).shape == (5, 32)
    np.testing.assert_allclose(jnp.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    zero = head(jnp.zeros((2, 32)))
    assert np.all(np.isfinite(zero))
    assert models.LinearClassifier(32, 14, rngs=nnx.Rngs(0))(jnp.ones((4, 32))).shape == (4, 14)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(name="vit"), "config.model.encoder.name: got 'vit'"),
        (dict(name="resnet", stage_sizes=[], width=8, in_channels=1), "stage_sizes: got"),
        (
            dict(name="resnet", stage_sizes=[1], width=8, in_channels=1, block="wide"),
            r"block: got 'wide', expected one of \['basic', 'bottleneck'\]",
        ),
        (dict(name="mlp", in_features=0, hidden_sizes=[4]), "in_features=0"),
    ],
)
def test_bad_encoder_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        models.create_encoder(encoder_config(**fields), rngs=nnx.Rngs(0))


def test_a_training_step_reduces_a_loss_and_state_round_trips():
    config = encoder_config(name="resnet", stage_sizes=[1], width=8, in_channels=1)
    encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
    model = models.ContrastiveModel(
        encoder, models.LinearClassifier(encoder.features_dim, 3, rngs=nnx.Rngs(1))
    )
    x = jax.random.uniform(jax.random.key(1), (16, 28, 28, 1))
    y = (jax.random.uniform(jax.random.key(2), (16, 3)) < 0.5).astype(jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return optax.sigmoid_binary_cross_entropy(model(x), y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(15)]
    assert losses[-1] < losses[0] - 0.05, losses
    graph, state = nnx.split(model)
    rebuilt = nnx.merge(graph, state)
    np.testing.assert_array_equal(rebuilt(x), model(x))
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(pure) == {"encoder", "head"}


MIXED_PRECISION_ENCODERS = {
    "resnet": (dict(name="resnet", stage_sizes=(1, 1), width=16, in_channels=1), (8, 56, 56, 1)),
    "bottleneck": (
        dict(name="resnet", stage_sizes=(1, 1), width=16, in_channels=3, block="bottleneck"),
        (8, 32, 32, 3),
    ),
    "mlp": (dict(name="mlp", in_features=20, hidden_sizes=(32, 16)), (8, 20)),
    "transformer": (
        dict(
            name="transformer",
            vocab_size=50,
            max_length=12,
            width=16,
            depth=2,
            num_heads=2,
            mlp_dim=32,
        ),
        (8, 12),
    ),
}


def mixed_precision_model(name, dtype):
    fields, _ = MIXED_PRECISION_ENCODERS[name]
    encoder = models.create_encoder(encoder_config(**fields), rngs=nnx.Rngs(0), dtype=dtype)
    head = models.ProjectionHead(encoder.features_dim, 32, 8, rngs=nnx.Rngs(1), dtype=dtype)
    return models.ContrastiveModel(encoder, head)


def mixed_precision_inputs(name):
    _, shape = MIXED_PRECISION_ENCODERS[name]
    if name == "transformer":
        return jax.random.randint(jax.random.key(1), shape, 0, 50)
    return jax.random.uniform(jax.random.key(1), shape)


@pytest.mark.parametrize("name", sorted(MIXED_PRECISION_ENCODERS))
def test_bfloat16_keeps_float32_parameters_and_close_outputs(name):
    x = mixed_precision_inputs(name)
    full = mixed_precision_model(name, jnp.float32)
    mixed = mixed_precision_model(name, jnp.bfloat16)
    params = jax.tree.leaves(nnx.state(mixed, nnx.Param))
    assert params and all(leaf.dtype == jnp.float32 for leaf in params)
    # Same initialisation: the compute dtype does not touch the parameters.
    for got, want in zip(params, jax.tree.leaves(nnx.state(full, nnx.Param)), strict=True):
        np.testing.assert_array_equal(got, want)
    # Jitted, as the trainer runs them (and one compile is faster than eager op-by-op calls).
    embed_and_encode = nnx.jit(lambda model, x: (model(x), model.encode(x)))
    embeddings, features = embed_and_encode(mixed, x)
    full_embeddings, full_features = embed_and_encode(full, x)
    assert embeddings.dtype == features.dtype == jnp.float32
    # bfloat16 keeps 8 significant bits: each rounding is within 2^-9 relative, and the
    # ~8 rounded layers between input and embedding add up to at most ~8 * 2^-8 = 2^-5 on
    # these unit vectors (measured <= 0.013); the features are checked relative to their size.
    np.testing.assert_allclose(embeddings, full_embeddings, rtol=0, atol=2**-5)
    scale = float(jnp.max(jnp.abs(full_features)))
    np.testing.assert_allclose(features, full_features, rtol=0, atol=2**-5 * scale)
    # ...and it is not float32 in disguise: the activations really were rounded.
    assert float(jnp.max(jnp.abs(embeddings - full_embeddings))) > 2**-12


def test_float32_compute_dtype_is_todays_model():
    config = config_lib.load_config_file("default", "tiny")
    x = jax.random.uniform(jax.random.key(0), (4, 56, 56, 1))
    default = models.create_model(config, 10, seed=0)
    config.compute_dtype = "float32"
    explicit = models.create_model(config, 10, seed=0)
    np.testing.assert_array_equal(explicit(x), default(x))
    config.compute_dtype = "float16"
    with pytest.raises(ValueError, match=r"config.compute_dtype: got 'float16', expected one of"):
        models.create_model(config, 10, seed=0)


def test_a_bfloat16_training_step_reduces_the_sd_loss():
    config = config_lib.load_config_file("default", "tiny")
    config.compute_dtype = "bfloat16"
    model = models.create_model(config, 10, seed=0)
    x = jax.random.uniform(jax.random.key(1), (16, 56, 56, 1))
    y = (jax.random.uniform(jax.random.key(2), (16, 10)) < 0.3).astype(jnp.float32)
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(model):
            return losses.multilabel_supcon_loss(model(x), y, positives="sd")

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
        optimizer.update(model, grads)
        return loss

    values = [float(step(model, optimizer)) for _ in range(15)]
    assert values[-1] < values[0] - 0.05, values
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
