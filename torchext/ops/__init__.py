"""Functional API: every torchext op as a plain function (also reachable as torch.ops.torchext.<name>)."""

from torchext.ops import gram_iteration, int8_matmul, kv_quant, ngpt
from torchext.ops import kde_attention as _kde_attention_module  # before the function import shadows the name
from torchext.ops.gram_iteration import conv_spectral_norm, gram_spectral_norm
from torchext.ops.int8_matmul import int8_linear, int8_mm, int8_vectorwise_quant
from torchext.ops.kde_attention import kde_attention
from torchext.ops.kv_quant import allocate_storage, kv_quant_append_, kv_quant_decode_attention, make_codebook
from torchext.ops.ngpt import hypersphere_update, l2_normalize, qk_norm_rope, renormalize_, scaled_swiglu

# family name -> ops module (each has KERNELS: op -> "triton" | "cuda")
FAMILIES = {"ngpt": ngpt, "int8_matmul": int8_matmul, "gram_iteration": gram_iteration,
            "kv_quant": kv_quant, "kde_attention": _kde_attention_module}

__all__ = ["allocate_storage", "conv_spectral_norm", "gram_spectral_norm", "hypersphere_update", "int8_linear",
           "int8_mm", "int8_vectorwise_quant", "kde_attention", "kv_quant_append_", "kv_quant_decode_attention",
           "l2_normalize", "make_codebook", "qk_norm_rope", "renormalize_", "scaled_swiglu"]
