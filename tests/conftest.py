"""Every test process sees 8 fake CPU devices, so the cross-device tests can run."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
