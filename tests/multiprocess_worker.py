"""One process of the 2-process loopback test: 2 CPU devices here, 4 in the global mesh.

Usage: python multiprocess_worker.py PORT PROCESS_ID OUT_DIR
"""

import itertools
import json
import sys
from pathlib import Path

import numpy as np

POSITIVES_CHECKED = ("sd", "mulsupcon", "jaccard")
NUM_SAMPLES = 16


def global_batch():
    rng = np.random.default_rng(7)
    features = rng.normal(size=(NUM_SAMPLES, 2, 8)).astype(np.float32)
    labels = (rng.random((NUM_SAMPLES, 6)) < 0.3).astype(np.float32)
    mask = np.ones(NUM_SAMPLES, bool)
    mask[[3, 12, 13]] = False
    return features, labels, mask


def main(port, process_id, out_dir):
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sdjax import losses

    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    features, labels, mask = global_batch()
    rows = np.arange(NUM_SAMPLES).reshape(2, -1)[process_id]  # this process's samples
    put = lambda x: jax.make_array_from_process_local_data(sharding, x[rows])
    for positives, exchange in itertools.product(POSITIVES_CHECKED, losses.EXCHANGES):
        loss_fn = losses.make_sharded_loss(mesh, positives=positives, exchange=exchange)
        loss, grad = jax.jit(jax.value_and_grad(loss_fn))(put(features), put(labels), put(mask))
        local = sorted(grad.addressable_shards, key=lambda s: s.index[0].start)
        local_rows = np.concatenate([np.arange(NUM_SAMPLES)[s.index[0]] for s in local])
        result = {
            "loss": float(loss),
            "rows": local_rows.tolist(),
            "grad": np.concatenate([np.asarray(s.data) for s in local]).tolist(),
            "num_global_devices": jax.device_count(),
            "num_local_devices": jax.local_device_count(),
        }
        name = f"{positives}_{exchange}_{process_id}.json"
        (Path(out_dir) / name).write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
