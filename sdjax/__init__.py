"""sdjax: the Similarity-Dissimilarity loss for multi-label supervised contrastive learning."""

__version__ = "0.1.0"
