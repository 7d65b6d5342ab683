"""steerprune: per-class attention-head pruning for ViTs, steered through a sparse autoencoder."""
__version__ = "0.1.0"
__all__ = ["__version__"]
