"""Transformer building blocks."""

from aic_core.model.nn.kv_cache import KVCache
from aic_core.model.nn.transformer import Transformer, TransformerConfig

__all__ = ["KVCache", "Transformer", "TransformerConfig"]
