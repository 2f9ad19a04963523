"""torchext: hand-written GPU kernels for recent methods, as drop-in modules, functional ops and torch.ops.torchext.

    import torchext
    torchext.ops.hypersphere_update(h, h_branch, alpha)     # functional
    torch.ops.torchext.hypersphere_update(h, h_branch, alpha, 1e-6)  # registered op
    torchext.nn.NGPT(torchext.nn.NGPTConfig(vocab_size=256))           # modules
"""

from torchext import nn, ops  # noqa: F401  (importing ops registers torch.ops.torchext.*)

__version__ = "0.1.0"
