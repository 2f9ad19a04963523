"""Deprecated: the module of the int8_matmul ops is private now; call them as torchext.ops.<name>."""

from torchext import _deprecation, ops

_deprecation.alias_module(__name__, *ops._MOVED_MODULES["int8_matmul"])
