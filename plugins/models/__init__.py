"""Built-in aic plugins."""
