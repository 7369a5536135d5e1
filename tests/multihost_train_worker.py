"""One process of a multi-host training test: configs/default.py:tiny.

Usage: python multihost_train_worker.py DEVICES_PER_PROCESS DATA_DIR WORKDIR [--config.X=V ...]

The process count, process id and coordinator come from the SDJAX_* environment variables
(sdjax/multihost.py), as on plain hosts; without them the process runs alone.
"""

import ast
import json
import sys


def main(devices_per_process, data_dir, workdir, *overrides):
    import jax

    jax.config.update("jax_num_cpu_devices", int(devices_per_process))
    from sdjax import config_lib, multihost, train

    config = config_lib.load_config_file("default", "tiny")
    config.dataset.data_dir = data_dir
    fields = dict(arg.removeprefix("--config.").split("=", 1) for arg in overrides)
    config_lib.override(config, **{k: ast.literal_eval(v) for k, v in fields.items()})
    multihost.initialize(config)
    try:
        results = train.train_and_evaluate(config, workdir)
    except train.Preempted as stop:
        print(f"PREEMPTED {stop}", flush=True)
        return
    print("RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
