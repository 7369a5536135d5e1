"""The base of sdjax's tfds builders: `source_dir` says where local source files are."""

from __future__ import annotations

import tensorflow_datasets as tfds


class LocalSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder that reads files already on this machine, never the network.

    `tfds.builder(name, source_dir=DIR)` points it at DIR; "" means the builder's default
    location (its module docstring says which). tfds's manual dir is not used because tfds
    requires it to exist, and these builders have fallbacks.
    """

    def __init__(self, *, source_dir: str = "", **kwargs):
        super().__init__(**kwargs)
        self.source_dir = source_dir
