"""KDE attention as a drop-in for the core of an attention layer (KDEformer / HyperAttention).

    kde = KDEAttention(bucket_size=256, num_samples=256)
    y = kde(q, k, v, is_causal=True)                     # called like F.scaled_dot_product_attention

    with use_kde_attention(model.layers[-4:], kde):      # an existing model, unchanged: its SDPA calls go to kde
        loss = model(tokens).loss                        # (here only in its last four layers)

``use_kde_attention`` reroutes the ``F.scaled_dot_product_attention`` calls made during the forward of the given
modules, so any layer written with SDPA (HuggingFace "sdpa" attention, nanoGPT, torchtune, ...) switches without
editing or copying its code, and the layer's projections, RoPE and caches stay as they are. HyperAttention's
recipe is to replace only the last layers: approximating every layer of a pretrained model costs perplexity.
"""

import contextlib
from collections.abc import Iterable

import torch.nn.functional as F
from torch import Tensor, nn

from torchext.ops._checks import check_int
from torchext.ops._kde_attention import DEFAULT_EXACT_WINDOW, check_params, kde_attention
from torchext.ops._kde_attention import _sdpa as _ORIGINAL_SDPA  # the real SDPA, bound before any swap


class KDEAttention(nn.Module):
    """softmax(q k^T * scale) v by LSH blocks plus sampled keys, with F.scaled_dot_product_attention's signature.

    Args (the estimator's budget, see ``torchext.ops.kde_attention``): bucket_size, num_samples, num_hash_bits,
    sampling, exact_window, min_seq_len (exact SDPA below it), seed (None: a fresh plan per call, as KDEformer
    draws one per forward).

    forward(q [B, H, N, D], k [B, Hk, N, D], v [B, Hk, N, Dv], attn_mask=None, dropout_p=0.0, is_causal=False,
    scale=None, enable_gqa=False) -> [B, H, N, Dv]. Calls the estimator does not cover run exact SDPA with the same
    arguments: query and key lengths that differ (decoding with a KV cache), an attn_mask (padding) and attention
    dropout. GQA works whatever enable_gqa says.
    """

    def __init__(self, bucket_size: int = 256, num_samples: int = 256, num_hash_bits: int | None = None,
                 sampling: str = "uniform", exact_window: int = DEFAULT_EXACT_WINDOW,
                 min_seq_len: int | None = None, seed: int | None = None):
        super().__init__()
        check_params("KDEAttention", False, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
        if min_seq_len is not None:
            check_int("KDEAttention", "min_seq_len", min_seq_len, minimum=0)
        self.bucket_size, self.num_samples, self.num_hash_bits = bucket_size, num_samples, num_hash_bits
        self.sampling, self.exact_window, self.min_seq_len, self.seed = sampling, exact_window, min_seq_len, seed

    def forward(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        if attn_mask is not None or dropout_p > 0 or (q.dim() == 4 and k.dim() == 4 and q.shape[2] != k.shape[2]):
            return _ORIGINAL_SDPA(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                  enable_gqa=q.dim() == 4 and k.dim() == 4 and k.shape[1] != q.shape[1])
        return kde_attention(q, k, v, causal=is_causal, scale=scale, bucket_size=self.bucket_size,
                             num_samples=self.num_samples, num_hash_bits=self.num_hash_bits, seed=self.seed,
                             sampling=self.sampling, exact_window=self.exact_window, min_seq_len=self.min_seq_len)

    def extra_repr(self) -> str:
        return (f"bucket_size={self.bucket_size}, num_samples={self.num_samples}, num_hash_bits={self.num_hash_bits}, "
                f"sampling={self.sampling!r}, exact_window={self.exact_window}, min_seq_len={self.min_seq_len}")


_active: list[nn.Module] = []  # the KDEAttention of each swapped forward running now (innermost last)


def _dispatch(*args, **kwargs) -> Tensor:
    return _active[-1](*args, **kwargs) if _active else _ORIGINAL_SDPA(*args, **kwargs)


class _Swap(contextlib.AbstractContextManager):
    """Hooks that route SDPA to a KDEAttention during the forwards of some modules; remove() undoes them."""

    def __init__(self, modules: Iterable[nn.Module], kde: nn.Module):
        self.handles = []
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(lambda *_: self._enter(kde)))
            self.handles.append(module.register_forward_hook(lambda *_: self._exit(), always_call=True))

    @staticmethod
    def _enter(kde):
        _active.append(kde)
        F.scaled_dot_product_attention = _dispatch

    @staticmethod
    def _exit():
        _active.pop()
        if not _active:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __exit__(self, *exc) -> None:
        self.remove()


def use_kde_attention(modules: nn.Module | Iterable[nn.Module], kde: nn.Module | None = None, **kwargs) -> _Swap:
    """Route ``F.scaled_dot_product_attention`` calls made inside the forward of ``modules`` to ``kde``.

    Works as a context manager (``with use_kde_attention(model, kde): ...``) or permanently (keep the returned
    handle, call ``.remove()`` to undo). Only calls that look the function up as ``F.scaled_dot_product_attention``
    (or ``torch.nn.functional.scaled_dot_product_attention``) at call time are rerouted, and only while a hooked
    forward runs (one thread at a time: the switch is process-wide while it runs).

    Args:
        modules: a model, or the layers to switch (e.g. ``model.layers[-4:]``).
        kde: the KDEAttention to use; by default ``KDEAttention(**kwargs)``.

    Returns:
        The handle (a context manager with ``remove()``).
    """
    kde = KDEAttention(**kwargs) if kde is None else kde
    return _Swap([modules] if isinstance(modules, nn.Module) else list(modules), kde)
