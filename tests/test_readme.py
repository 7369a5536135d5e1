"""The README's usage example runs as written and trains."""

import re
from pathlib import Path

import jax
import numpy as np
import optax

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_trains():
    example = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    namespace = {}
    exec(compile(example, "README.md", "exec"), namespace)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (784, 64)) * 0.01}
    images = jax.random.normal(k2, (32, 2, 784))
    labels = jax.random.bernoulli(k3, 0.3, (32, 10))
    opt_state = optax.adamw(1e-3).init(params)
    losses = []
    for _ in range(5):
        params, opt_state, loss = namespace["train_step"](params, opt_state, images, labels)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
