"""Example aic plugins: `sinusoidal` positions, the `gpt-relu2` model and the `bytes` tokenizer."""

__version__ = "0.1.0"
