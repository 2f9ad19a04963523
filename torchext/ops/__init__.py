"""Functional API: every torchext op as a plain function (also reachable as torch.ops.torchext.<name>)."""

from torchext.ops import gram_iteration, int8_matmul, ngpt
from torchext.ops.gram_iteration import conv_spectral_norm, gram_spectral_norm
from torchext.ops.int8_matmul import int8_linear, int8_mm, int8_vectorwise_quant
from torchext.ops.ngpt import hypersphere_update, l2_normalize, qk_norm_rope, renormalize_, scaled_swiglu

# family name -> ops module (each has KERNELS: op -> "triton" | "cuda")
FAMILIES = {"ngpt": ngpt, "int8_matmul": int8_matmul, "gram_iteration": gram_iteration}

__all__ = ["conv_spectral_norm", "gram_spectral_norm", "hypersphere_update", "int8_linear", "int8_mm",
           "int8_vectorwise_quant", "l2_normalize", "qk_norm_rope", "renormalize_", "scaled_swiglu"]
