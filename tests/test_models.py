"""Flax NNX encoders and heads: shapes, normalisation, errors, and a training step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import config_lib, losses, models
from sdjax.evaluators.heldout_loss import HeldoutLoss
from sdjax.evaluators.linear_probe import LinearProbe
from sdjax.models import bag_of_ngrams
from sdjax.sharding import data_parallel_mesh
from sdjax.tokenizer import PAD_ID


def encoder_config(**fields):
    return ml_collections.ConfigDict(fields)


@pytest.mark.slow
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
        (
            dict(name="bag_of_ngrams", vocab_size=0, width=8),
            r"config.model.encoder.vocab_size: got 0, expected an int >= 1",
        ),
        (
            dict(name="bag_of_ngrams", vocab_size=10, width=8, num_buckets=-1),
            r"config.model.encoder.num_buckets: got -1, expected an int >= 0",
        ),
        (
            dict(name="bag_of_ngrams", vocab_size=10, width=8, hidden_dim=2.5),
            r"config.model.encoder.hidden_dim: got 2.5, expected an int >= 0",
        ),
        (
            dict(name="bag_of_ngrams", vocab_size=10, width=8, token_weights=1),
            r"config.model.encoder.token_weights: got 1, expected a bool",
        ),
        (
            dict(name="bag_of_ngrams", vocab_size=10, width=8, layer_norm="yes"),
            r"config.model.encoder.layer_norm: got 'yes', expected a bool",
        ),
        (
            dict(name="bag_of_ngrams", vocab_size=10, width=8, dropout_rate=1.0),
            r"config.model.encoder.dropout_rate: got 1.0, expected \[0, 1\)",
        ),
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
    "bag_of_ngrams": (
        dict(name="bag_of_ngrams", vocab_size=50, width=16, num_buckets=64, hidden_dim=24),
        (8, 12),
    ),
}
TEXT_ENCODERS = ("transformer", "bag_of_ngrams")


def mixed_precision_model(name, dtype):
    fields, _ = MIXED_PRECISION_ENCODERS[name]
    encoder = models.create_encoder(encoder_config(**fields), rngs=nnx.Rngs(0), dtype=dtype)
    head = models.ProjectionHead(encoder.features_dim, 32, 8, rngs=nnx.Rngs(1), dtype=dtype)
    return models.ContrastiveModel(encoder, head)


def mixed_precision_inputs(name):
    _, shape = MIXED_PRECISION_ENCODERS[name]
    if name in TEXT_ENCODERS:
        return jax.random.randint(jax.random.key(1), shape, 0, 50)
    return jax.random.uniform(jax.random.key(1), shape)


@pytest.mark.slow
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


def sd_loss_trajectory(compute_dtype: str, steps: int) -> list[float]:
    """The S-D loss over `steps` AdamW steps of the tiny encoder on a fixed random batch."""
    config = config_lib.load_config_file("default", "tiny")
    config.compute_dtype = compute_dtype
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

    values = [float(step(model, optimizer)) for _ in range(steps)]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return values


@pytest.mark.slow
def test_a_bfloat16_training_step_reduces_the_sd_loss_as_float32_does():
    # bfloat16 rounding sends the run along another path, so it is held to the float32 run's
    # progress, not to its values: at least half of float32's decrease over the same steps
    # (measured: 0.069 against 0.061 after 25 steps, on jax 0.12).
    float32 = sd_loss_trajectory("float32", 25)
    bfloat16 = sd_loss_trajectory("bfloat16", 25)
    assert bfloat16[0] == pytest.approx(float32[0], abs=2**-7)
    assert float32[0] - float32[-1] > 0.05, float32
    assert bfloat16[0] - bfloat16[-1] > 0.5 * (float32[0] - float32[-1]), (bfloat16, float32)


def numpy_bigram_buckets(tokens: np.ndarray, num_buckets: int) -> np.ndarray:
    """`bag_of_ngrams.bigram_buckets` in Python ints, reduced modulo 2^32 by hand."""
    mask = 2**32 - 1
    buckets = np.zeros((tokens.shape[0], tokens.shape[1] - 1), np.int64)
    for row, col in np.ndindex(buckets.shape):
        h = (int(tokens[row, col]) * 0x9E3779B1 + int(tokens[row, col + 1])) & mask
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & mask
        h ^= h >> 13
        buckets[row, col] = h % num_buckets
    return buckets


def numpy_bag_of_ngrams(tokens, token_table, bigram_table, num_buckets):
    """The mean of the embeddings of the non-pad tokens and of the bigrams of two non-pad
    tokens, a float64 loop; zeros for a text of padding only."""
    buckets = numpy_bigram_buckets(tokens, num_buckets) if bigram_table is not None else None
    features = np.zeros((tokens.shape[0], token_table.shape[1]))
    for row, text in enumerate(tokens):
        rows = [token_table[t] for t in text if t != PAD_ID]
        if bigram_table is not None:
            rows += [
                bigram_table[buckets[row, i]]
                for i in range(len(text) - 1)
                if text[i] != PAD_ID and text[i + 1] != PAD_ID
            ]
        if rows:
            features[row] = np.mean(np.asarray(rows, np.float64), axis=0)
    return features


def test_bigram_buckets_match_python_integers_and_spread():
    tokens = np.array([[0, 1, 7999, 31999], [31999, 7999, 1, 0], [5, 5, 5, 5]], np.int32)
    for num_buckets in (1, 7, 2**17):
        got = bag_of_ngrams.bigram_buckets(jnp.asarray(tokens), num_buckets)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, numpy_bigram_buckets(tokens, num_buckets))
    # All 50 x 50 pairs in 4096 buckets: a uniform hash fills 4096 (1 - e^(-2500/4096)) = 1868
    # buckets on average (sd ~ 20); a structured collision pattern would fill far fewer.
    a, b = np.meshgrid(np.arange(50), np.arange(50))
    pairs = jnp.asarray(np.stack([a.ravel(), b.ravel()], axis=1))
    assert len(np.unique(bag_of_ngrams.bigram_buckets(pairs, 4096))) > 1700


@pytest.mark.parametrize("num_buckets", [0, 13])
def test_bag_of_ngrams_is_the_mean_of_token_and_bigram_embeddings(num_buckets):
    config = encoder_config(name="bag_of_ngrams", vocab_size=30, width=8, num_buckets=num_buckets)
    encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
    tokens = np.array(
        [
            [3, 4, 5, 6, 7, 8],
            [3, PAD_ID, 5, 6, PAD_ID, PAD_ID],  # a dropped token splits the bigrams
            [29, 29, 29, 1, PAD_ID, PAD_ID],
            [PAD_ID] * 6,
            [PAD_ID, PAD_ID, 12, PAD_ID, PAD_ID, PAD_ID],
        ],
        np.int32,
    )
    token_table = np.asarray(encoder.token_embedding.embedding.value, np.float64)
    bigram_table = (
        np.asarray(encoder.bigram_embedding.embedding.value, np.float64) if num_buckets else None
    )
    want = numpy_bag_of_ngrams(tokens, token_table, bigram_table, num_buckets)
    got = encoder(jnp.asarray(tokens))
    assert got.shape == (5, 8) == (5, encoder.features_dim) and got.dtype == jnp.float32
    # float32 sums of n <= 11 terms of size <= m round by at most n * 2^-24 * m (one rounding
    # per addition), the division adds 2^-24 relative: 16 * 2^-24 * m bounds both.
    tables = [token_table] if bigram_table is None else [token_table, bigram_table]
    scale = max(np.abs(table).max() for table in tables)
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * 2**-24 * scale)
    np.testing.assert_array_equal(got[3], 0.0)
    # The single-token text is that token's embedding, exactly: nothing to round.
    np.testing.assert_array_equal(got[4], encoder.token_embedding.embedding.value[12])


def test_bag_of_ngrams_token_weights_make_a_weighted_mean_of_unigrams():
    config = encoder_config(
        name="bag_of_ngrams", vocab_size=30, width=8, num_buckets=13, token_weights=True
    )
    encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
    tokens = np.array([[3, 4, 5, PAD_ID, 7], [29, 29, 1, PAD_ID, PAD_ID]], np.int32)
    # Fresh log-weights are 0: the plain mean, bit for bit (exp(0) = 1 exactly).
    plain = models.create_encoder(
        encoder_config(name="bag_of_ngrams", vocab_size=30, width=8, num_buckets=13),
        rngs=nnx.Rngs(0),
    )
    np.testing.assert_array_equal(encoder(jnp.asarray(tokens)), plain(jnp.asarray(tokens)))
    log_weight = np.linspace(-1.5, 1.5, 30)
    encoder.token_log_weight.value = jnp.asarray(log_weight, jnp.float32)
    token_table = np.asarray(encoder.token_embedding.embedding.value, np.float64)
    bigram_table = np.asarray(encoder.bigram_embedding.embedding.value, np.float64)
    buckets = numpy_bigram_buckets(tokens, 13)
    want = np.zeros((2, 8))
    for row, text in enumerate(tokens):
        # sum_i w_i e_i + sum_pairs b_pair over sum_i w_i + number of pairs (weight 1 each).
        total, count = np.zeros(8), 0.0
        for i, token in enumerate(text):
            if token != PAD_ID:
                total += np.exp(log_weight[token]) * token_table[token]
                count += np.exp(log_weight[token])
            if i + 1 < len(text) and token != PAD_ID and text[i + 1] != PAD_ID:
                total += bigram_table[buckets[row, i]]
                count += 1
        want[row] = total / count
    # float32 exp is within a few ulps; sums of <= 8 terms of size <= 4.5 m (e^1.5 m) round
    # by <= 8 * 2^-24 * 4.5 m each, the division 2^-24 relative: 64 * 2^-24 * m bounds them.
    scale = max(np.abs(token_table).max(), np.abs(bigram_table).max())
    np.testing.assert_allclose(encoder(jnp.asarray(tokens)), want, rtol=0, atol=64 * 2**-24 * scale)


def test_bag_of_ngrams_dropout_trains_and_the_evaluation_view_turns_it_off():
    fields = dict(name="bag_of_ngrams", vocab_size=30, width=64)
    encoder = models.create_encoder(encoder_config(**fields, dropout_rate=0.5), rngs=nnx.Rngs(0))
    plain = models.create_encoder(encoder_config(**fields), rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[3, 4, 5, PAD_ID], [29, 1, PAD_ID, PAD_ID]], jnp.int32)
    pooled = np.asarray(plain(tokens))
    # Training: inverted dropout, each feature 0 or doubled (1 / (1 - 0.5), exact in binary).
    dropped = np.asarray(encoder(tokens))
    np.testing.assert_array_equal(np.where(dropped == 0, 0.0, 2 * pooled), dropped)
    assert 0.3 < np.mean(dropped == 0) < 0.7  # 128 Bernoulli(0.5) draws
    # Evaluation: the same parameters, no dropout, bit for bit, and the module itself unchanged.
    np.testing.assert_array_equal(models.evaluation_view(encoder)(tokens), pooled)
    assert not encoder.dropout.deterministic
    assert models.evaluation_view(plain.token_embedding) is plain.token_embedding


@pytest.mark.parametrize(
    "fields", [dict(hidden_dim=5), dict(layer_norm=True), dict(hidden_dim=5, layer_norm=True)]
)
def test_bag_of_ngrams_layer_norm_and_hidden_layer(fields):
    config = encoder_config(name="bag_of_ngrams", vocab_size=30, width=8, num_buckets=13, **fields)
    encoder = models.create_encoder(config, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (4, 9), 0, 30)
    pooled = numpy_bag_of_ngrams(
        np.asarray(tokens),
        np.asarray(encoder.token_embedding.embedding.value, np.float64),
        np.asarray(encoder.bigram_embedding.embedding.value, np.float64),
        13,
    )
    # LayerNorm (flax's epsilon 1e-6, fresh scale 1 and bias 0), then Linear and tanh-approximate
    # GELU when there is a hidden layer.
    assert np.all(np.asarray(encoder.norm.scale.value) == 1)
    assert np.all(np.asarray(encoder.norm.bias.value) == 0)
    centred = pooled - pooled.mean(axis=1, keepdims=True)
    want = centred / np.sqrt((centred**2).mean(axis=1, keepdims=True) + 1e-6)
    if fields.get("hidden_dim"):
        pre = want @ np.asarray(encoder.hidden.kernel.value, np.float64) + np.asarray(
            encoder.hidden.bias.value, np.float64
        )
        want = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    got = encoder(tokens)
    assert got.shape == want.shape == (4, encoder.features_dim)
    # float32 through a normalisation and an 8-term dot product on O(1) values: a few hundred
    # ulps of 1 at most (measured ~1e-6); 2^-14 ~ 6e-5 leaves room without hiding a wrong layer.
    np.testing.assert_allclose(got, want, rtol=0, atol=2**-14)


@pytest.mark.slow
def test_debtags_joint_config_builds_its_encoder_in_every_profile():
    for profile in config_lib.PROFILES:
        config = config_lib.load_config_file("debtags_joint", profile)
        assert config.method == "joint" and config.model.encoder.name == "bag_of_ngrams"
        config_lib.check_config(config, num_devices=8, num_processes=1)
        encoder = models.create_encoder(config.model.encoder, rngs=nnx.Rngs(0))
        assert encoder.vocab_size == config.dataset.vocab_size
        tokens = jnp.ones((2, config.dataset.max_length), jnp.int32)
        assert encoder(tokens).shape == (2, encoder.features_dim)


def test_check_data_fits_bounds_the_bag_of_ngrams_vocabulary():
    config = config_lib.load_config_file("debtags_joint", "tiny")
    train = {"inputs": np.array([[1, 2, 255]] * 64, np.int32), "labels": np.zeros((64, 3))}
    config_lib.check_data_fits(config, train)  # any length: no max_length to match
    train["inputs"][0, 0] = 256
    with pytest.raises(config_lib.ConfigError, match=r"vocab_size: got 256, expected > 256"):
        config_lib.check_data_fits(config, train)


def yeast_model_with_dropout(rate: float):
    """(config, model) of the tiny Yeast MLP at `rate`; the same parameters at any rate."""
    config = config_lib.load_config_file("yeast", "tiny")
    config.model.encoder.dropout_rate = rate
    return config, models.create_model(config, num_classes=14, seed=0)


def test_probe_features_are_the_encoder_without_dropout():
    config, model = yeast_model_with_dropout(0.5)
    _, plain = yeast_model_with_dropout(0.0)
    inputs = np.random.default_rng(0).normal(size=(37, 103)).astype(np.float32)
    got = LinearProbe(config, data_parallel_mesh()).features(model, inputs)
    want = np.asarray(plain.encode(jnp.asarray(inputs)))
    # The same float32 operations, eager against jitted: XLA may order LayerNorm's sums
    # differently, a few ulps of the largest feature. Dropout's masks would zero about half.
    np.testing.assert_allclose(got, want, rtol=0, atol=16 * 2**-24 * np.abs(want).max())


@pytest.mark.slow
def test_heldout_loss_is_the_model_without_dropout():
    config, model = yeast_model_with_dropout(0.5)
    config_without, plain = yeast_model_with_dropout(0.0)
    rng = np.random.default_rng(0)
    test = {
        "inputs": rng.normal(size=(64, 103)).astype(np.float32),
        "labels": (rng.random((64, 14)) < 0.3).astype(np.float32),
    }
    heldout = HeldoutLoss(config, data_parallel_mesh(), test)
    first, second = heldout(model), heldout(model)
    assert first == second  # with dropout on, each call would draw new masks
    # The same jitted float32 graph but for dropout's identity ops: a few ulps apart at most.
    np.testing.assert_allclose(
        first, HeldoutLoss(config_without, data_parallel_mesh(), test)(plain), rtol=1e-5
    )
