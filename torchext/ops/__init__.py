"""Functional API: every torchext op as a plain function (also reachable as torch.ops.torchext.<name>)."""

from torchext.ops import ngpt
from torchext.ops.ngpt import hypersphere_update, l2_normalize, qk_norm_rope, renormalize_, scaled_swiglu

# family name -> ops module (each has KERNELS: op -> "triton" | "cuda")
FAMILIES = {"ngpt": ngpt}

__all__ = ["hypersphere_update", "l2_normalize", "qk_norm_rope", "renormalize_", "scaled_swiglu"]
