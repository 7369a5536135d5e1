"""Dataset builders that need no network: tfds builders over data that ships in packages."""
