"""The NAME KIND plugin for aic."""

__version__ = "0.1.0"
