"""Drop-in nn.Modules and model-level helpers, one module per family."""

from torchext.nn.ngpt import (NGPT, HypersphereResidual, NGPTBlock, NGPTConfig, NormalizedAttention,
                              NormalizedEmbedding, NormalizedLinear, NormalizedSwiGLU, ScaledVector, renormalize_,
                              renormalize_after_step)

__all__ = ["NGPT", "HypersphereResidual", "NGPTBlock", "NGPTConfig", "NormalizedAttention", "NormalizedEmbedding",
           "NormalizedLinear", "NormalizedSwiGLU", "ScaledVector", "renormalize_", "renormalize_after_step"]
