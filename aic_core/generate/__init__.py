"""Generation: the sampler chain (`sampling`) and the decoding loop with its static-cache step (`decode`)."""

from aic_core.generate.decode import generate, stream
from aic_core.generate.sampling import process_logits, sample_next

__all__ = ["generate", "process_logits", "sample_next", "stream"]
