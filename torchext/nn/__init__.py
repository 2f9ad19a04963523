"""Drop-in nn.Modules and model-level helpers, one module per family."""

from torchext.nn.gram_iteration import (GramSpectralNorm, gram_spectral_norm, lipschitz_bound, lipschitz_penalty,
                                        record_input_sizes)
from torchext.nn.int8_matmul import Int8Linear, calibrate_outliers, replace_linear
from torchext.nn.ngpt import (NGPT, HypersphereResidual, NGPTBlock, NGPTConfig, NormalizedAttention,
                              NormalizedEmbedding, NormalizedLinear, NormalizedSwiGLU, ScaledVector, renormalize_,
                              renormalize_after_step)

__all__ = ["GramSpectralNorm", "gram_spectral_norm", "lipschitz_bound", "lipschitz_penalty", "record_input_sizes",
           "NGPT", "HypersphereResidual", "Int8Linear", "NGPTBlock", "NGPTConfig", "NormalizedAttention",
           "NormalizedEmbedding", "NormalizedLinear", "NormalizedSwiGLU", "ScaledVector", "calibrate_outliers",
           "renormalize_", "renormalize_after_step", "replace_linear"]
