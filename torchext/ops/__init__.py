"""Functional API: every torchext op as a plain function (also reachable as torch.ops.torchext.<name>)."""

import torch

from torchext.ops import gram_iteration, int8_matmul, kv_quant, ngpt
# The modules whose name is also their op's name are bound first: the function import below shadows the name.
from torchext.ops import kde_attention as _kde_attention_module
from torchext.ops import kronecker_attention as _kronecker_attention_module
from torchext.ops import tensor_attention as _tensor_attention_module
from torchext.ops.gram_iteration import conv_spectral_norm, gram_spectral_norm
from torchext.ops.int8_matmul import int8_linear, int8_mm, int8_vectorwise_quant
from torchext.ops.kde_attention import kde_attention
from torchext.ops.kronecker_attention import kronecker_attention
from torchext.ops.kv_quant import allocate_storage, kv_quant_append_, kv_quant_decode_attention, make_codebook
from torchext.ops.ngpt import hypersphere_update, l2_normalize, qk_norm_rope, renormalize_, scaled_swiglu
from torchext.ops.tensor_attention import tensor_attention

# family name -> ops module (each has KERNELS: op -> "triton" | "cuda"; and DISPATCH: op -> where it leaves its
# kernel for another path on the same device, for the ops that do, printed by `python -m torchext info`)
FAMILIES = {"ngpt": ngpt, "int8_matmul": int8_matmul, "gram_iteration": gram_iteration,
            "kv_quant": kv_quant, "kde_attention": _kde_attention_module,
            "kronecker_attention": _kronecker_attention_module, "tensor_attention": _tensor_attention_module}

__all__ = ["allocate_storage", "conv_spectral_norm", "gram_spectral_norm", "hypersphere_update", "int8_linear",
           "int8_mm", "int8_vectorwise_quant", "kde_attention", "kronecker_attention", "kv_quant_append_",
           "kv_quant_decode_attention", "l2_normalize", "make_codebook", "qk_norm_rope", "renormalize_",
           "scaled_swiglu", "tensor_attention"]

# torch.ops.torchext lists an op only once it has been looked up (the torch.library.define'd ones, kv_quant's, are
# not looked up at import): look every registered one up, so dir(torch.ops.torchext) shows them after import.
for _name in __all__:
    getattr(torch.ops.torchext, _name, None)
del _name
