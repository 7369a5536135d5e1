"""The loss over a batch sharded across a mesh: `multilabel_supcon_loss` inside `shard_map`."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from sdjax.losses._api import multilabel_supcon_loss
from sdjax.losses._checks import _num_rows
from sdjax.losses._types import LabelIndices

_KEY_ARGUMENTS = ("contrast_features", "contrast_labels", "contrast_mask", "contrast_sample_ids")


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
      `loss(features, labels, sample_mask=None, *, contrast_features=None,
      contrast_labels=None, contrast_mask=None, contrast_sample_ids=None, temperature=None)
      -> scalar`, replicated. Keys are sharded along `axis_name` like the batch (their count
      must divide evenly too) and `contrast_sample_ids` index the global batch. A `temperature`
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
    per_batch = ("axis_name", "sample_mask", *_KEY_ARGUMENTS)
    for name in per_batch:
        if name in loss_kwargs:
            raise ValueError(f"`{name}`: pass it to the returned loss function, not here.")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"`axis_name`: got {axis_name!r}, expected one of {mesh.axis_names}.")
    batch = jax.sharding.PartitionSpec(axis_name)  # type: ignore[no-untyped-call]
    replicated = jax.sharding.PartitionSpec()  # type: ignore[no-untyped-call]
    num_shards = mesh.shape[axis_name]

    def loss_fn(
        features: ArrayLike,
        labels: ArrayLike | LabelIndices,
        sample_mask: ArrayLike | None = None,
        *,
        temperature: float | ArrayLike | None = None,
        **keys: Any,
    ) -> jax.Array:
        unknown = set(keys) - set(_KEY_ARGUMENTS)
        if unknown:
            raise TypeError(f"unexpected keyword arguments {sorted(unknown)}.")
        if sample_mask is None:
            sample_mask = jnp.ones((np.shape(features)[0],), bool)
        for name, value in (("features", features), *keys.items()):
            if value is not None and _num_rows(value) % num_shards:
                rows, mask = ("samples", "`sample_mask`")
                if name != "features":
                    rows, mask = ("keys", "`contrast_mask`")
                raise ValueError(
                    f"`{name}`: got {_num_rows(value)} {rows}, expected a multiple of the "
                    f"{num_shards} shards of mesh axis {axis_name!r}; pad the batch and mark the "
                    f"padding False in {mask}."
                )
        if temperature is None:
            temperature = loss_kwargs.get("temperature", 0.07)
        kwargs = {k: v for k, v in loss_kwargs.items() if k != "temperature"}
        key_names = [k for k in _KEY_ARGUMENTS if keys.get(k) is not None]
        # A traced temperature enters replicated; a Python number stays a compile-time constant.
        traced_temperature = isinstance(temperature, jax.Array)
        operands = (features, labels, sample_mask, *(keys[k] for k in key_names))
        specs = (batch,) * len(operands)
        if traced_temperature:
            operands, specs = (*operands, temperature), (*specs, replicated)

        def body(f: jax.Array, y: Any, m: jax.Array, *rest: Any) -> jax.Array:
            tau = rest[-1] if traced_temperature else temperature
            key_values = dict(zip(key_names, rest[: len(key_names)], strict=True))
            return multilabel_supcon_loss(
                f, y, sample_mask=m, temperature=tau, axis_name=axis_name, **key_values, **kwargs
            )

        per_shard = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=replicated)
        loss: jax.Array = per_shard(*operands)
        return loss

    return loss_fn
