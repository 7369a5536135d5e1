"""The loss over a batch sharded across a mesh: `multilabel_supcon_loss` inside `shard_map`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdjax.losses._api import multilabel_supcon_loss
from sdjax.losses._checks import (
    _check_keys_type,
    _keys_as_array_like,
    _num_rows,
    _reject_removed_arguments,
    _takes_keys,
)
from sdjax.losses._types import DEFAULT_TEMPERATURE, Keys, LabelIndices


def make_sharded_loss(
    mesh: jax.sharding.Mesh, axis_name: Hashable = "data", **loss_kwargs: Any
) -> Callable[..., jax.Array]:
    """The loss over a batch sharded along `axis_name` of `mesh`: the one right way to scale out.

    Wraps `multilabel_supcon_loss(..., axis_name=axis_name)` in `jax.shard_map`. Call the result
    on global arrays (under `jit`) and take `jax.grad` outside it, around your whole model: the
    gradient is then exactly the single-device gradient on the global batch, with no psum or
    pmean of yours to get wrong.

    Args:
      mesh: a mesh whose axis `axis_name` splits the batch. The batch size must divide evenly;
        pad uneven batches and mark the padding False in `sample_mask`.
      axis_name: the batch axis of `mesh`.
      **loss_kwargs: keyword arguments of `multilabel_supcon_loss`, except `axis_name` and the
        per-batch arrays (`sample_mask` and the keys), which are the returned function's.

    Returns:
      `loss(features, labels, sample_mask=None, *, keys=None, temperature=None) -> scalar`,
      replicated. `keys` (`Keys`) are sharded along `axis_name` like the batch (their count
      must divide evenly too) and their `sample_ids` index the global batch. A `temperature`
      given here (a replicated scalar, e.g. a learned one) replaces the one in `loss_kwargs`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from sdjax.losses import make_sharded_loss
      >>> mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> loss_fn = make_sharded_loss(mesh, positives="sd")
      >>> features = jnp.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
      >>> labels = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
      >>> round(float(jax.jit(loss_fn)(features, labels)), 4)
      0.014
    """
    _reject_removed_arguments(loss_kwargs)
    for name in ("axis_name", "sample_mask", "keys"):
        if name in loss_kwargs:
            raise ValueError(f"`{name}`: pass it to the returned loss function, not here.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name`: got {axis_name!r}, expected one of {mesh.axis_names}.")
    batch = jax.sharding.PartitionSpec(axis_name)  # type: ignore[no-untyped-call]
    replicated = jax.sharding.PartitionSpec()  # type: ignore[no-untyped-call]
    num_shards = mesh.shape[axis_name]
    temperature_default = loss_kwargs.pop("temperature", DEFAULT_TEMPERATURE)

    @_takes_keys
    def loss_fn(
        features: ArrayLike,
        labels: ArrayLike | LabelIndices,
        sample_mask: ArrayLike | None = None,
        *,
        keys: Keys | None = None,
        temperature: ArrayLike | None = None,
    ) -> jax.Array:
        if sample_mask is None:
            sample_mask = jnp.ones((np.shape(features)[0],), bool)
        rows = [("features", features, "samples", "`sample_mask`")]
        if keys is not None:
            _check_keys_type(keys)
            keys = _keys_as_array_like(keys)
            for field in dataclasses.fields(keys):
                rows.append(
                    (f"keys.{field.name}", getattr(keys, field.name), "keys", "`keys.mask`")
                )
        for name, value, what, mask in rows:
            if value is not None and _num_rows(value) % num_shards:
                raise ValueError(
                    f"`{name}`: got {_num_rows(value)} {what}, expected a multiple of the "
                    f"{num_shards} shards of mesh axis {axis_name!r}; pad the batch and mark the "
                    f"padding False in {mask}."
                )
        if temperature is None:
            temperature = temperature_default
        # A traced temperature enters replicated; a Python number stays a compile-time constant.
        traced_temperature = isinstance(temperature, jax.Array)
        operands: tuple[Any, ...] = (features, labels, sample_mask)
        if keys is not None:  # one pytree: every field sharded like the batch
            operands = (*operands, keys)
        specs = (batch,) * len(operands)
        if traced_temperature:
            operands, specs = (*operands, temperature), (*specs, replicated)

        def body(f: jax.Array, y: Any, m: jax.Array, *rest: Any) -> jax.Array:
            tau = rest[-1] if traced_temperature else temperature
            local_keys = rest[0] if keys is not None else None
            return multilabel_supcon_loss(
                f,
                y,
                sample_mask=m,
                temperature=tau,
                axis_name=axis_name,
                keys=local_keys,
                **loss_kwargs,
            )

        per_shard = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=replicated)
        loss: jax.Array = per_shard(*operands)
        return loss

    return loss_fn
