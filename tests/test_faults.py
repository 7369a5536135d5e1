"""One test per fault of issue 13: each asserts the outcome a user gets, not the absence of a crash."""

import contextlib
import signal
import socket
import time

import pytest
import tensorflow_datasets as tfds

from sdjax import input_pipeline

# --------------------------------------------------------------------------------------------
# Trainer: workdir, checkpoints, config errors, multi-host
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Data sources and the experiment runner
# --------------------------------------------------------------------------------------------

# The archives tfds builds each dataset from, written out here rather than read from the module.
TFDS_SOURCES = {
    "voc2007": ("voc/2007", ["VOCtrainval_06-Nov-2007.tar", "VOCtest_06-Nov-2007.tar"]),
    "coco2017": (
        "coco/2017",
        [
            "train2017.zip",
            "val2017.zip",
            "test2017.zip",
            "annotations_trainval2017.zip",
            "image_info_test2017.zip",
        ],
    ),
}


@contextlib.contextmanager
def deadline(seconds):
    """Raises TimeoutError in the block after `seconds`, so a hanging call fails the test."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine: every host name fails to resolve, as it does offline."""

    def no_resolution(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_resolution)


@pytest.mark.parametrize("name", sorted(TFDS_SOURCES))
def test_tfds_dataset_without_network_fails_at_once_saying_what_to_download_where(
    name, tmp_path, offline
):
    tfds_name, filenames = TFDS_SOURCES[name]
    infos = tfds.builder_cls(tfds_name.split("/")[0]).url_infos
    urls = {info.filename: url for url, info in infos.items()}
    data_dir = tmp_path / "tfds"  # empty: nothing prepared, nothing downloaded
    manual_dir = data_dir / "downloads" / "manual"
    # Then a file put in tfds's manual dir is no longer asked for.
    for already_there in ([], filenames[:1]):
        for filename in already_there:
            manual_dir.mkdir(parents=True, exist_ok=True)
            (manual_dir / filename).write_bytes(b"")
        start = time.monotonic()
        # tfds alone retries for minutes; the deadline turns that into a failure.
        with deadline(60), pytest.raises(FileNotFoundError) as raised:
            input_pipeline.load_split(name, "train", data_dir=str(data_dir), image_size=32)
        # One failed name lookup, plus making tfds's builder (its imports take seconds on a busy
        # 2-core machine); tfds alone fails after 3.5 minutes of retries here.
        assert time.monotonic() - start < 20
        message = str(raised.value)
        assert str(manual_dir) in message and "config.dataset.data_dir" in message
        for filename in filenames:
            assert (urls[filename] in message) == (filename not in already_there), filename


# --------------------------------------------------------------------------------------------
# Loss edge inputs
# --------------------------------------------------------------------------------------------
