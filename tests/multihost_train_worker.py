"""One process of the 2-process training test: configs/tiny.py on 2 of 4 global CPU devices.

Usage: python multihost_train_worker.py PORT PROCESS_ID DATA_DIR WORKDIR
"""

import json
import sys


def main(port, process_id, data_dir, workdir):
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    from sdjax import config_lib, train

    config = config_lib.load_config_file("tiny")
    config.dataset.data_dir = data_dir
    results = train.train_and_evaluate(config, workdir)
    print("RESULTS " + json.dumps(results))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
