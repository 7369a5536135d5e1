"""Gradient caching gives the loss and gradients of the whole batch, chunk by chunk."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from sdjax import config_lib, losses, models, objectives
from sdjax.gradient_cache import chunked_value_and_grad
from sdjax.recipe import Recipe
from sdjax.sharding import BATCH_AXIS, data_parallel_mesh, replicate, shard_global_batch

NUM_CLASSES = 10


def tiny_batch(batch_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.random((batch_size, 56, 56, 1), dtype=np.float32)
    labels = (rng.random((batch_size, NUM_CLASSES)) < 0.3).astype(np.float32)
    labels[np.arange(batch_size), rng.integers(0, NUM_CLASSES, batch_size)] = 1.0
    return images, labels


def assert_grads_close(grads, expected):
    """Float32 gradients that differ only in summation order.

    A sum of n terms in another order moves by up to ~n * 2^-24 times the sum of the terms'
    sizes, not of the result: some leaves (the last bias, whose per-example terms nearly
    cancel through the normalisation) are 1000x smaller than their terms. So the bound is
    relative to the largest gradient entry of the model: n = 64 views gives 64 * 6e-8 ~ 4e-6,
    and the loss's gradient at initialisation is itself a difference (positives' softmax
    weights minus all) ~100x smaller than its terms, so 4e-4; 1e-4 is what holds in practice
    (measured <= 1.1e-5). A lost, doubled or misplaced chunk moves gradients by O(1) of it.
    """
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(expected))
    assert scale > 0
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 8])
def test_the_trainers_cached_gradient_is_that_of_the_loss_on_one_device(num_devices):
    """The recipe's gradient-cached loss and gradients (its sharded S-D loss of the views'
    embeddings, chunk by chunk) against the loss's definition on one device, no sharding."""
    config = config_lib.load_config_file("default", "tiny")
    model = models.create_model(config, NUM_CLASSES, seed=0)
    images, labels = tiny_batch(32)
    views = Recipe(config, data_parallel_mesh(jax.devices()[:1])).views(jnp.asarray(images), 3)
    flat_views = views.reshape((-1, *views.shape[2:]))  # each example's 2 views adjacent

    def loss_of_views(model):
        embeddings = model(flat_views).reshape((32, 2, -1))
        return losses.multilabel_supcon_loss(
            embeddings,
            labels,
            positives=config.loss.positives,
            temperature=config.loss.temperature,
            jaccard_threshold=config.loss.jaccard_threshold,
        )

    expected_loss, expected_grads = nnx.jit(nnx.value_and_grad(loss_of_views))(model)

    mesh = data_parallel_mesh(jax.devices()[:num_devices])
    nnx.update(model, replicate(nnx.state(model), mesh))
    inputs, labels = (
        shard_global_batch(np.asarray(flat_views), mesh),
        shard_global_batch(labels, mesh),
    )
    for chunk_size in (8, 16, 64):  # 64 = the whole batch of 32 examples x 2 views
        recipe = Recipe(config_lib.override(config, embedding_chunk_size=chunk_size), mesh)
        loss, grads = nnx.jit(recipe.value_and_grad)(model, inputs, labels, None)
        # One scalar from the same embeddings up to summation order: a few ulps.
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
        assert_grads_close(grads, expected_grads)


@pytest.mark.slow
def test_outputs_may_be_a_pytree_of_arrays():
    """A joint model's embeddings and classifier logits, chunked together: the gradient of a loss
    of both is the plain one."""
    config = config_lib.load_config_file("default", "tiny")
    model = objectives.create_model(config_lib.override(config, method="joint"), NUM_CLASSES)
    images, labels = tiny_batch(16, seed=2)

    def forward(model, x):
        return {"embeddings": model(x), "logits": model.classify(x)}

    def loss_of_outputs(outputs):
        embeddings = outputs["embeddings"] / jnp.linalg.norm(outputs["embeddings"], axis=1)[:, None]
        similarity = jnp.mean((embeddings @ embeddings.T) ** 2)
        return similarity + optax.sigmoid_binary_cross_entropy(outputs["logits"], labels).mean()

    expected_loss, expected_grads = nnx.jit(
        nnx.value_and_grad(lambda model: loss_of_outputs(forward(model, jnp.asarray(images))))
    )(model)
    loss, grads = nnx.jit(chunked_value_and_grad, static_argnums=(2, 3, 4))(
        model, jnp.asarray(images), loss_of_outputs, 4, forward
    )
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    assert set(grads) == {"encoder", "head", "classifier"}
    assert_grads_close(grads, expected_grads)


@pytest.mark.slow
def test_sums_chunks_of_a_bfloat16_model_in_float32():
    config = config_lib.load_config_file("default", "tiny")
    config.compute_dtype = "bfloat16"
    model = models.create_model(config, NUM_CLASSES, seed=0)
    images, labels = tiny_batch(16, seed=1)
    loss_fn = losses.make_sharded_loss(data_parallel_mesh(jax.devices()[:1]), BATCH_AXIS)

    def loss_of_outputs(outputs):
        return loss_fn(outputs.reshape((16, 1, -1)), labels)

    expected_loss, expected_grads = nnx.jit(
        nnx.value_and_grad(lambda model: loss_of_outputs(model(images)))
    )(model)
    loss, grads = nnx.jit(chunked_value_and_grad, static_argnums=(2, 3))(
        model, jnp.asarray(images), loss_of_outputs, 4
    )
    assert loss.dtype == jnp.float32
    # A convolution over 4 images may round its bfloat16 outputs otherwise than over 16 (XLA
    # picks the order of its sums per shape): single roundings flip by a bfloat16 ulp, 2^-8,
    # and the loss averages many of them.
    np.testing.assert_allclose(loss, expected_loss, rtol=2**-8 / 4)
    # Backward passes in bfloat16 are noisy (cosines to float32 gradients are ~0.84 for some
    # leaves here; chunked to unchunked measured >= 0.978), so this bar only catches a wrong
    # structure, chunk order or accumulation dtype, which give cosines near 0.
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        assert got.dtype == jnp.float32
        cosine = jnp.vdot(got, want) / (jnp.linalg.norm(got) * jnp.linalg.norm(want))
        assert float(cosine) > 0.95


@pytest.mark.slow
def test_dropout_masks_agree_between_the_two_forward_passes():
    """With dropout, the gradient is that of the loss the chunked forward pass computed.

    Checked by a central difference along the gradient: (L(p + h g) - L(p - h g)) / 2h = |g|^2
    up to O(h^2) and float32 rounding. Phase 3 drawing other masks than phase 1 would break it.
    """
    encoder_config = ml_collections.ConfigDict(
        dict(name="mlp", in_features=12, hidden_sizes=(32, 32), dropout_rate=0.3)
    )
    encoder = models.create_encoder(encoder_config, rngs=nnx.Rngs(0))
    model = models.ContrastiveModel(encoder, models.ProjectionHead(32, 32, 8, rngs=nnx.Rngs(1)))
    inputs = jax.random.normal(jax.random.key(2), (16, 12))
    target = jax.random.normal(jax.random.key(3), (16, 8))

    def loss_of_outputs(outputs):
        return jnp.mean(jnp.sum((outputs - target) ** 2, axis=1))

    def counts(model):
        return [int(count) for count in jax.tree.leaves(nnx.state(model, nnx.RngCount))]

    counts_before = counts(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_at(params, inputs=inputs, loss_of_outputs=loss_of_outputs):
        # The same random state each time, so the same masks.
        model = nnx.merge(graphdef, params, rest, copy=True)
        return chunked_value_and_grad(model, inputs, loss_of_outputs, 4)

    _, grads = loss_at(params)
    norm_squared = sum(float(jnp.sum(g * g)) for g in jax.tree.leaves(grads))
    h = 1e-3 / np.sqrt(norm_squared)
    step_along = lambda sign: jax.tree.map(lambda p, g: p + sign * h * g, params, grads)
    slope = (float(loss_at(step_along(1.0))[0]) - float(loss_at(step_along(-1.0))[0])) / (2 * h)
    # A step of length 1e-3: losses ~1 differ by ~2e-2, so float32 rounding (1e-7) gives
    # ~1e-5 relative, and the O(h^2) term measured 3e-3 at 10x the step, so ~3e-5 here.
    np.testing.assert_allclose(slope, norm_squared, rtol=1e-3)

    # Chunks draw different masks: chunk k of these 16 inputs holds rows k, k + 4, k + 8 and
    # k + 12, i.e. every chunk holds the same 4 inputs, whose outputs would then agree.
    repeated = jnp.repeat(inputs[:4], 4, axis=0)

    def spread_over_chunks(outputs):
        return jnp.sum(jnp.var(outputs.reshape((4, 4, -1)), axis=1))

    assert float(loss_at(params, repeated, spread_over_chunks)[0]) > 1e-3
    no_dropout = nnx.merge(graphdef, params, rest, copy=True)
    no_dropout.encoder.dropout.rate = 0.0
    assert float(spread_over_chunks(no_dropout(repeated))) == 0.0

    # The random counters advance as after one forward call of the model.
    reference = nnx.merge(graphdef, params, rest, copy=True)
    reference(inputs)
    chunked_value_and_grad(model, inputs, loss_of_outputs, 4)
    assert counts(reference) != counts_before
    assert counts(model) == counts(reference)


def test_each_chunk_runs_forward_twice_but_the_last_once():
    """Phase 3 reuses the last chunk's forward pass from phase 1: 2n - 1 forward passes."""
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    calls = []

    def forward(model, x):
        jax.debug.callback(lambda x: calls.append(x.shape), x)
        return model(x)

    inputs = jnp.arange(48.0).reshape(16, 3) / 10
    loss_of_outputs = lambda y: jnp.sum(jnp.tanh(y) ** 2)
    for chunk_size, num_chunks in ((16, 1), (8, 2), (4, 4), (1, 16)):
        calls.clear()
        loss, grads = nnx.jit(chunked_value_and_grad, static_argnums=(2, 3, 4))(
            model, inputs, loss_of_outputs, chunk_size, forward
        )
        jax.effects_barrier()
        assert calls == [(chunk_size, 3)] * (2 * num_chunks - 1)
        expected_loss, expected_grads = nnx.value_and_grad(lambda m: loss_of_outputs(m(inputs)))(
            model
        )
        np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
        assert_grads_close(grads, expected_grads)


def test_memory_falls_with_the_number_of_chunks():
    """XLA's buffer for the step's intermediates (compiled, not run) with n chunks, on the MLP
    encoder (4 layers of 256, whose activations outweigh its 1.1 MB of parameters): at most the
    plain step's over n plus what chunking holds whatever n: the gradient accumulator, one
    chunk's gradients and their sum (3 x the parameters, 3.3 MB), the outputs and their
    gradient (0.5 MB), and the inputs regrouped into chunks and sliced (2 x 1 MB). Holding a
    second chunk's activations (say, the last chunk's, kept from phase 1 into phase 3) adds the
    plain step's over n, 64 MB at n = 2, against 22 MB of slack (measured: 47.5 MB of 69.9; 83.3
    without the barrier that orders phase 3). Fewer chunks must always take more memory.
    """
    encoder = models.MLPEncoder(64, (256,) * 4, rngs=nnx.Rngs(0))
    model = models.ContrastiveModel(encoder, models.ProjectionHead(256, 256, 16, rngs=nnx.Rngs(1)))
    inputs = jnp.ones((4096, 64))
    loss_of_outputs = lambda y: jnp.sum(jnp.tanh(y) ** 2)

    def temp_mb(chunk_size):
        if chunk_size is None:
            step = nnx.jit(nnx.value_and_grad(lambda m, x: loss_of_outputs(m(x))))
            compiled = step.lower(model, inputs).compile()
        else:
            step = nnx.jit(chunked_value_and_grad, static_argnums=(2, 3))
            compiled = step.lower(model, inputs, loss_of_outputs, chunk_size).compile()
        return compiled.memory_analysis().temp_size_in_bytes / 2**20

    param_mb = sum(p.nbytes for p in jax.tree.leaves(nnx.state(model, nnx.Param))) / 2**20
    fixed_mb = 3 * param_mb + 2 * (4096 * 16 * 4) / 2**20 + 2 * inputs.nbytes / 2**20
    plain_mb = temp_mb(None)
    assert plain_mb >= 16  # 4096 inputs x 4 x 256 float32 activations, at least
    temps = [temp_mb(4096 // num_chunks) for num_chunks in (2, 4, 8)]
    for num_chunks, chunked_mb in zip((2, 4, 8), temps, strict=True):
        assert chunked_mb <= plain_mb / num_chunks + fixed_mb, (num_chunks, chunked_mb)
    assert plain_mb > temps[0] > temps[1] > temps[2]


@pytest.mark.parametrize("chunk_size", [0, 5, 32])
def test_a_chunk_size_that_does_not_divide_the_batch_is_named(chunk_size):
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"`chunk_size`: got {chunk_size}, .* inputs, 16"):
        chunked_value_and_grad(model, jnp.ones((16, 3)), jnp.sum, chunk_size)
