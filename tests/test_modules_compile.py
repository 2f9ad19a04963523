"""Every trainable nn module of torchext, compiled with torch.compile(fullgraph=True), forward and backward, against
eager: the output, the gradient of every floating input and of every parameter. Compiled graphs hand the backward
ops layouts eager never does (channels-last saved inputs, transposed gradients), and check the strides the fakes
promise.

KVQuantCache / KVQuantLayer are inference only (no backward): tests/test_kv_quant.py compiles their decode.
"""

import copy

import pytest
import torch
from torch import nn

from torchext.nn import (HypersphereResidual, Int8Linear, KDEAttention, KroneckerAttention2d, KroneckerAttention3d,
                         NGPTBlock, NGPTConfig, NormalizedAttention, NormalizedEmbedding, NormalizedLinear,
                         NormalizedSwiGLU, ScaledVector, TensorAttention, register_gram_spectral_norm)
from torchext.reference import ngpt as ngpt_ref


def randn(*shape):
    return torch.randn(*shape)


def unit(*shape):
    return ngpt_ref.l2_normalize(torch.randn(*shape))


class Attention(nn.Module):
    """KDEAttention takes (q, k, v): one input split three ways."""

    def __init__(self):
        super().__init__()
        self.attention = KDEAttention(bucket_size=16, num_samples=8, exact_window=16, min_seq_len=0, seed=1)

    def forward(self, x):
        q, k, v = x.unbind(0)
        return self.attention(q, k, v, is_causal=True)


TINY_NGPT = NGPTConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=8)

# name -> (module, inputs), built inside the test (seeded)
MODULES = {
    "HypersphereResidual": lambda: (HypersphereResidual(16), (unit(2, 5, 16), randn(2, 5, 16))),
    "NormalizedLinear": lambda: (NormalizedLinear(16, 8), (randn(4, 16),)),
    "NormalizedEmbedding": lambda: (NormalizedEmbedding(10, 16), (torch.tensor([[1, 2, 3]]),)),
    "NormalizedAttention": lambda: (NormalizedAttention(16, 2, max_seq_len=8), (unit(2, 5, 16),)),
    "NormalizedSwiGLU": lambda: (NormalizedSwiGLU(16), (unit(2, 5, 16),)),
    "NGPTBlock": lambda: (NGPTBlock(TINY_NGPT), (unit(1, 5, 16),)),
    "ScaledVector": lambda: (ScaledVector(8, 1.0, 0.5), ()),
    "GramSpectralNorm(Linear, wide)": lambda: (register_gram_spectral_norm(nn.Linear(8, 3)), (randn(4, 8),)),
    "GramSpectralNorm(Conv2d)": lambda: (register_gram_spectral_norm(nn.Conv2d(2, 3, 3, padding=1,
                                                                               padding_mode="circular")),
                                         (randn(1, 2, 6, 6),)),
    "Int8Linear": lambda: (Int8Linear.from_float(nn.Linear(16, 8)), (randn(4, 16),)),
    "KDEAttention": lambda: (Attention(), (randn(3, 1, 2, 40, 16),)),
    "KroneckerAttention2d(kv)": lambda: (KroneckerAttention2d(8, heads=2, mode="kv"), (randn(1, 8, 5, 6),)),
    "KroneckerAttention2d(qkv)": lambda: (KroneckerAttention2d(8, heads=2, mode="qkv"), (randn(1, 8, 5, 6),)),
    "KroneckerAttention3d(kv)": lambda: (KroneckerAttention3d(8, heads=2, mode="kv"), (randn(1, 8, 3, 4, 5),)),
    "TensorAttention": lambda: (TensorAttention(16, 2, window=(3, 5)), (randn(1, 7, 16),)),
}


def forward_backward(module, inputs):
    """(output, gradients of the floating inputs and the parameters) of sum(output * fixed weights)."""
    inputs = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = module(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [x for x in inputs if x.requires_grad] + [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * weights).sum(), leaves, allow_unused=True)
    return out, grads


@pytest.mark.parametrize("name", list(MODULES))
def test_module_compiles_fullgraph_forward_and_backward(name):
    torch.manual_seed(0)
    module, inputs = MODULES[name]()
    compiled = torch.compile(copy.deepcopy(module), fullgraph=True)
    (out, grads), (out_c, grads_c) = forward_backward(module, inputs), forward_backward(compiled, inputs)
    torch.testing.assert_close(out_c, out, rtol=1e-4, atol=1e-5)
    assert len(grads_c) == len(grads)
    for i, (g_c, g) in enumerate(zip(grads_c, grads)):
        assert (g_c is None) == (g is None), f"gradient {i}"
        if g is not None:
            torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"gradient {i}: {m}")
