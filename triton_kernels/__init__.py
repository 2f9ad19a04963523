"""Triton kernels, one module per family; installed as torchext.triton_kernels (never top-level)."""
