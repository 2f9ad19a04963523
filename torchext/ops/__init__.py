"""Functional API: every torchext op as a plain function, ``torchext.ops.<function>`` (the registered ones also as
torch.ops.torchext.<name>).

Each family's ops live in a private module, ``torchext.ops._<family>``, reached as ``FAMILIES[family]``: its
KERNELS (op -> "triton" | "cuda"), its DISPATCH (op -> where it leaves its kernel for another path on the same
device, printed by `python -m torchext info`) and its tunable defaults (e.g. FAMILIES["kde_attention"].MIN_SEQ_LEN,
read at each call).
"""

import torch

from torchext import _deprecation
from torchext.ops import (_gram_iteration, _int8_matmul, _kde_attention, _kronecker_attention, _kv_quant, _ngpt,
                          _tensor_attention)
from torchext.ops._gram_iteration import conv_spectral_norm, gram_spectral_norm
from torchext.ops._int8_matmul import int8_linear, int8_mm, int8_vectorwise_quant
from torchext.ops._kde_attention import kde_attention
from torchext.ops._kronecker_attention import kronecker_attention
from torchext.ops._kv_quant import allocate_storage, kv_quant_append_, kv_quant_decode_attention, make_codebook
from torchext.ops._ngpt import hypersphere_update, l2_normalize, qk_norm_rope, renormalize_, scaled_swiglu
from torchext.ops._tensor_attention import tensor_attention

FAMILIES = {"ngpt": _ngpt, "int8_matmul": _int8_matmul, "gram_iteration": _gram_iteration, "kv_quant": _kv_quant,
            "kde_attention": _kde_attention, "kronecker_attention": _kronecker_attention,
            "tensor_attention": _tensor_attention}

# The old public module paths that no function shadowed, now deprecated: `import torchext.ops.ngpt` (a module file
# that replaces itself) and `torchext.ops.ngpt` (__getattr__) warn and give the family's module.
_MOVED_MODULES = {family: (FAMILIES[family], f"the functions torchext.ops.<name>, or the family's module "
                                             f"torchext.ops.FAMILIES[{family!r}]")
                  for family in ("ngpt", "int8_matmul", "gram_iteration", "kv_quant")}


def __getattr__(name: str):
    return _deprecation.renamed_attribute(__name__, name, _MOVED_MODULES)


# The public functions of torchext.ops that are not registered ops: host-side setup that builds the NamedTuples the
# kv_quant ops take (checks read values on the host; allocation). Every other public function is a wrapper of the
# registered torch.ops.torchext op of its name.
PYTHON_HELPERS = ("allocate_storage", "make_codebook")

# The public functions (FAMILIES and PYTHON_HELPERS are public too, but not functions).
__all__ = ["allocate_storage", "conv_spectral_norm", "gram_spectral_norm", "hypersphere_update", "int8_linear",
           "int8_mm", "int8_vectorwise_quant", "kde_attention", "kronecker_attention", "kv_quant_append_",
           "kv_quant_decode_attention", "l2_normalize", "make_codebook", "qk_norm_rope", "renormalize_",
           "scaled_swiglu", "tensor_attention"]

# torch.ops.torchext lists an op only once it has been looked up (the torch.library.define'd ones, kv_quant's, are
# not looked up at import): look every registered one up, so dir(torch.ops.torchext) shows them after import.
for _name in __all__:
    getattr(torch.ops.torchext, _name, None)
del _name
