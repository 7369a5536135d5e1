"""Local tfds builders; importing this package registers them with tfds."""

from sdjax.datasets import debtags, fashion_mosaic, mnist_mosaic, yeast

__all__ = ["debtags", "fashion_mosaic", "mnist_mosaic", "yeast"]
