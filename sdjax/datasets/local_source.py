"""The base of sdjax's tfds builders (`source_dir` says where local source files are), and a
guard against the empty folders tfds leaves in the system temp directory."""

from __future__ import annotations

import contextlib
import tempfile

import tensorflow_datasets as tfds


class LocalSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
    """A builder that reads files already on this machine, never the network.

    `tfds.builder(name, source_dir=DIR)` points it at DIR; "" means the builder's default
    location (its module docstring says which). tfds's manual dir is not used because tfds
    requires it to exist, and these builders have fallbacks.
    """

    def __init__(self, *, source_dir: str = "", **kwargs):
        self.source_dir = source_dir  # first: tfds's __init__ calls `_info`, which may read it
        super().__init__(**kwargs)


@contextlib.contextmanager
def no_stray_tfds_temp_dirs():
    """Makes the `tmp*tfds` folders that tfds creates in the block land in a removed scratch dir.

    Every builder made for a data dir without its `dataset_info.json` (any dataset not yet
    built) calls `DatasetInfo.initialize_from_bucket`, which makes `tempfile.mkdtemp("tfds")`
    and never removes it (tfds 4.9). Not thread-safe: it sets the process's `tempfile.tempdir`.
    """
    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="sdjax_tfds_") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = previous
