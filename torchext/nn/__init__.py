"""Drop-in nn.Modules and model-level helpers, one module per family."""

from torchext import _deprecation
from torchext.nn import gram_iteration, ngpt
from torchext.nn.gram_iteration import (GramSpectralNorm, format_lipschitz_table, lipschitz_bound, lipschitz_penalty,
                                        record_input_sizes, register_gram_spectral_norm)
from torchext.nn.int8_matmul import Int8Linear, calibrate_outliers, replace_linear
from torchext.nn.kde_attention import KDEAttention, use_kde_attention
from torchext.nn.kronecker_attention import KroneckerAttention2d, KroneckerAttention3d
from torchext.nn.kv_quant import (KVQuantCache, KVQuantConfig, KVQuantLayer, Quantizer, cache_kwargs, calibrate,
                                  use_kvquant_attention)
from torchext.nn.ngpt import (NGPT, HypersphereResidual, NGPTBlock, NGPTConfig, NormalizedAttention,
                              NormalizedEmbedding, NormalizedLinear, NormalizedSwiGLU, RenormalizeAfterStep,
                              ScaledVector, renormalize_after_step, renormalize_model_)
from torchext.nn.tensor_attention import TensorAttention

__all__ = ["GramSpectralNorm", "HypersphereResidual", "Int8Linear", "KDEAttention", "KVQuantCache", "KVQuantConfig",
           "KVQuantLayer", "KroneckerAttention2d", "KroneckerAttention3d", "NGPT", "NGPTBlock", "NGPTConfig",
           "NormalizedAttention", "NormalizedEmbedding", "NormalizedLinear", "NormalizedSwiGLU", "Quantizer",
           "RenormalizeAfterStep", "ScaledVector", "TensorAttention", "cache_kwargs", "calibrate", "calibrate_outliers",
           "format_lipschitz_table", "lipschitz_bound", "lipschitz_penalty", "record_input_sizes",
           "register_gram_spectral_norm", "renormalize_after_step", "renormalize_model_", "replace_linear",
           "use_kde_attention", "use_kvquant_attention"]

# The old names of helpers that shared an op's name but not its arguments: deprecated, they warn and still work.
_RENAMED = {**gram_iteration._RENAMED, **ngpt._RENAMED}


def __getattr__(name: str):
    return _deprecation.renamed_attribute(__name__, name, _RENAMED)
