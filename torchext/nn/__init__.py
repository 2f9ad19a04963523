"""Drop-in nn.Modules and model-level helpers, one module per family."""

from torchext.nn.int8_matmul import Int8Linear, calibrate_outliers, replace_linear
from torchext.nn.ngpt import (NGPT, HypersphereResidual, NGPTBlock, NGPTConfig, NormalizedAttention,
                              NormalizedEmbedding, NormalizedLinear, NormalizedSwiGLU, ScaledVector, renormalize_,
                              renormalize_after_step)

__all__ = ["NGPT", "HypersphereResidual", "Int8Linear", "NGPTBlock", "NGPTConfig", "NormalizedAttention",
           "NormalizedEmbedding", "NormalizedLinear", "NormalizedSwiGLU", "ScaledVector", "calibrate_outliers",
           "renormalize_", "renormalize_after_step", "replace_linear"]
