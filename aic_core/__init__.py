"""aic: a small typed core for building, training and running decoder-only transformers."""

__version__ = "0.1.0"
