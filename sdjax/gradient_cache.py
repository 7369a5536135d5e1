"""Gradient caching: the loss and parameter gradients of a global batch whose encoder
activations would not fit in memory at once.

A contrastive loss couples every pair of examples, so the batch cannot simply be split into
micro-batches whose gradients add up. Gradient caching (Gao et al., 2021) splits the work
instead of the loss, in three phases:

1. embed the batch chunk by chunk, keeping only the [M, D] embeddings (no activations);
2. the loss and its gradient with respect to the embeddings, on the whole batch at once;
3. for each chunk again, recompute its forward pass and pull that chunk's embedding gradient
   back to the parameters (`jax.vjp`), summing the parameter gradients over chunks.

Memory then holds one chunk's activations plus O(M * D) for the embeddings and their
gradient, whatever the global batch M; the price is a second forward pass of every chunk but
the last, whose activations phase 1 keeps (they are the one chunk's that memory holds
anyway). The result is the gradient of the same loss: exact up to float summation order
when the model treats examples independently (GroupNorm, LayerNorm; not BatchNorm).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def chunked_value_and_grad(
    model: nnx.Module,
    inputs: jax.Array,
    loss_of_outputs: Callable[[Any], jax.Array],
    chunk_size: int,
    forward: Callable[[nnx.Module, jax.Array], Any] | None = None,
) -> tuple[jax.Array, nnx.State]:
    """`(loss, grads)` of `loss_of_outputs(forward(model, inputs))`, one chunk of inputs at a
    time.

    Equals `nnx.value_and_grad(lambda model: loss_of_outputs(forward(model, inputs)))(model)`
    (the same `nnx.State` of `nnx.Param` gradients) up to float summation order, while the
    encoder's activations are held for `chunk_size` inputs at a time. Call it inside `nnx.jit`.

    Chunk `k` holds inputs `k, k + M/chunk_size, k + 2 M/chunk_size, ...` (M = len(inputs)):
    strided, so that when the batch is sharded in contiguous blocks over devices, every chunk
    spreads evenly over all of them and no input moves between devices. Models with random
    state (dropout) fold the chunk index into their keys, so both forward passes of a chunk
    draw the same mask and chunks draw different ones; their random counters then advance
    as after one call.

    Args:
      model: an `nnx.Module` called on a batch of inputs, treating examples independently.
      inputs: [M, ...], every encoder input of the global batch (views flattened into it);
        M must be a multiple of `chunk_size`.
      loss_of_outputs: the scalar loss of the model's outputs for all M inputs, e.g. the
        sharded S-D loss of the [M, D] embeddings reshaped to [N, V, D], the labels closed over.
      chunk_size: inputs per chunk (across all devices): a divisor of M and, for data
        parallelism, a multiple of the number of devices.
      forward: `forward(model, inputs)`, the outputs of [m, ...] inputs: one array or a pytree
        of arrays with m rows, row i a function of input i alone (e.g. a joint model's
        embeddings and logits). None: `model(inputs)`.

    Returns:
      `(loss, grads)`, `grads` an `nnx.State` shaped like `nnx.state(model, nnx.Param)`.

    References:
      Gao, Zhang, Han and Callan, "Scaling Deep Contrastive Learning Batch Size under Memory
      Limited Setup", RepL4NLP 2021.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from sdjax.gradient_cache import chunked_value_and_grad
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> x = jnp.arange(24.0).reshape(8, 3) / 10
      >>> loss_of_outputs = lambda y: jnp.sum(jnp.tanh(y) ** 2)
      >>> loss, grads = nnx.jit(chunked_value_and_grad, static_argnums=(2, 3))(
      ...     model, x, loss_of_outputs, 2)
      >>> full_loss, full_grads = nnx.value_and_grad(lambda m: loss_of_outputs(m(x)))(model)
      >>> bool(jnp.allclose(loss, full_loss) and jnp.allclose(
      ...     grads["kernel"].value, full_grads["kernel"].value, atol=1e-6))
      True
    """
    if chunk_size < 1 or inputs.shape[0] % chunk_size:
        raise ValueError(
            f"`chunk_size`: got {chunk_size}, expected a positive divisor of the number of "
            f"inputs, {inputs.shape[0]} (inputs of shape {inputs.shape})."
        )
    num_chunks = inputs.shape[0] // chunk_size
    graphdef, params, rng_keys, rest = nnx.split(model, nnx.Param, nnx.RngKey, ...)  # type: ignore[misc]

    def apply(params, chunk_index, chunk):
        keys = jax.tree.map(lambda key: jax.random.fold_in(key, chunk_index), rng_keys)
        chunk_model = nnx.merge(graphdef, params, keys, rest, copy=True)
        outputs = chunk_model(chunk) if forward is None else forward(chunk_model, chunk)
        return outputs, nnx.state(chunk_model, nnx.RngCount)

    # [M, ...] -> [num_chunks, chunk_size, ...] with chunk k = rows k, k + num_chunks, ...:
    # the chunk axis splits like the batch axis, so each device embeds its own rows.
    chunks = _to_chunks(inputs, num_chunks)
    last = num_chunks - 1
    indices = jnp.arange(last)

    # Phase 1: embeddings only; lax.map keeps no activations for the backward pass. The last
    # chunk is the exception: its activations are kept, so phase 3 starts with its pullback
    # instead of a second forward pass. The barrier runs it after the other chunks, so that
    # its activations are not held while they are embedded.
    head_outputs, _ = jax.lax.map(
        lambda args: apply(params, *args), (indices, jax.lax.stop_gradient(chunks[:last]))
    )
    head_outputs, last_chunk = jax.lax.optimization_barrier(
        (head_outputs, jax.lax.stop_gradient(chunks[last]))
    )
    last_outputs, last_pullback, counts = jax.vjp(
        lambda params: apply(params, last, last_chunk), params, has_aux=True
    )
    outputs = jax.tree.map(
        lambda head, tail: _from_chunks(jnp.concatenate([head, tail[None]])),
        head_outputs,
        jax.lax.stop_gradient(last_outputs),
    )

    # Phase 2: the loss of the whole batch and its gradient with respect to the outputs.
    loss, output_grads = jax.value_and_grad(loss_of_outputs)(outputs)
    chunk_output_grads = jax.tree.map(lambda g: _to_chunks(g, num_chunks), output_grads)

    # Phase 3: the last chunk's pullback, then each other chunk's forward pass again and its
    # pullback, the parameter gradients summed. Starting the sum from the last chunk's
    # gradients also frees its activations before the loop.
    def accumulate(grads, args):
        chunk_index, chunk, chunk_output_grads = args
        _, pullback = jax.vjp(lambda params: apply(params, chunk_index, chunk)[0], params)
        (chunk_grads,) = pullback(chunk_output_grads)
        return jax.tree.map(jnp.add, grads, chunk_grads), None

    (last_grads,) = last_pullback(jax.tree.map(lambda g: g[last], chunk_output_grads))
    # The barrier keeps the second forward passes after the last chunk's pullback: XLA would
    # otherwise merge a one-chunk loop's with phase 1's and hold its activations throughout.
    last_grads, other_chunks = jax.lax.optimization_barrier((last_grads, chunks[:last]))
    grads, _ = jax.lax.scan(
        accumulate,
        last_grads,
        (indices, other_chunks, jax.tree.map(lambda g: g[:last], chunk_output_grads)),
    )
    # Random counters advance as after one forward call (every chunk advanced them alike).
    nnx.update(model, counts)
    return loss, grads


def _to_chunks(batch: jax.Array, num_chunks: int) -> jax.Array:
    """[M, ...] -> [num_chunks, M / num_chunks, ...], row r going to chunk r % num_chunks."""
    strided = batch.reshape((-1, num_chunks, *batch.shape[1:]))
    return jnp.swapaxes(strided, 0, 1)


def _from_chunks(chunked: jax.Array) -> jax.Array:
    """The inverse of `_to_chunks`."""
    strided = jnp.swapaxes(chunked, 0, 1)
    return strided.reshape((-1, *strided.shape[2:]))
