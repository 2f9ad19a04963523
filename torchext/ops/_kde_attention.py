"""KDE attention (KDEformer, arXiv 2302.02451, fused as in HyperAttention, arXiv 2310.05869) as torch.library
custom ops: torch.ops.torchext.kde_attention and torch.ops.torchext.kde_attention_backward.

The op draws its plan (LSH hashes, sort order, blocks, samples) from an int64 seed tensor with
torchext.reference.kde_attention.make_plan; the backward rebuilds the same plan from the same seed and inputs, so
forward and backward see the same estimator and the gradient is its exact gradient. The seed is a tensor so that
``seed=None`` (a fresh plan per call, from torch's default generator) traces under torch.compile.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from torchext._backend import HAS_TRITON, use_triton
from torchext._dtypes import accumulator_dtype
from torchext.ops._checks import (check_bool, check_float, check_int, check_same_device, check_tensor,
                                  check_unit_last_stride)
from torchext.reference import kde_attention as ref
from torchext.reference._attention import nonfinite_heads_as_nan

if HAS_TRITON:
    from torchext.triton_kernels import kde_attention as kernels

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"kde_attention": "triton"}

# Below these sequence lengths `kde_attention` runs exact attention (SDPA) instead of the estimator: where the
# roofline estimate of bench/kde_roofline.py (H100 SXM peaks, the plan's ~800 eager operations non-causal and
# ~2,200-3,100 causal at 4 us each, B 1, H 32, d 64) first puts the forward ahead of FlashAttention: 1.5x at 32K
# non-causal (below 1x at 16K) and 1.5x at 128K causal (below 1x at 64K). An ESTIMATE: no GPU has timed it; the
# plan's eager operations dominate below these lengths, so fusing it moves both down. Read at each call: assigning
# torchext.ops.FAMILIES["kde_attention"].MIN_SEQ_LEN changes the default (the min_seq_len argument, one call's).
MIN_SEQ_LEN = 32768
MIN_SEQ_LEN_CAUSAL = 131072
DISPATCH = {"kde_attention": f"exact SDPA below {MIN_SEQ_LEN} tokens ({MIN_SEQ_LEN_CAUSAL} causal) unless "
                             "min_seq_len says otherwise"}
# Causal: exact attention inside aligned windows of this many tokens (the recursion's leaves).
DEFAULT_EXACT_WINDOW = 2048
MAX_HEAD_DIM = 256
# Bound at import: torchext.nn.kde_attention.use_kde_attention may reroute F.scaled_dot_product_attention to this op.
_sdpa = F.scaled_dot_product_attention


def _check_inputs(op: str, q: Tensor, k: Tensor, v: Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, x, ndim=4)
        check_unit_last_stride(op, name, x)
    check_same_device(op, q=q, k=k, v=v)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, n, D = q.shape
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"{op}: head dims must be >= 1, got q {tuple(q.shape)} and v {tuple(v.shape)}")
    if k.shape[0] != B or k.shape[2] != n or k.shape[3] != D:
        raise ValueError(f"{op}: k must be [B, Hk, N, D] = [{B}, Hk, {n}, {D}] like q (self-attention: equal query "
                         f"and key lengths), got {tuple(k.shape)}")
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"{op}: v must be [B, Hk, N, Dv] = [{B}, {k.shape[1]}, {n}, Dv] like k, got {tuple(v.shape)}")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"{op}: the number of kv heads ({k.shape[1]}) must divide the number of query heads ({H})")
    if D > MAX_HEAD_DIM or v.shape[3] > MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dims must be <= {MAX_HEAD_DIM}, got q/k {D} and v {v.shape[3]}")


def check_params(op: str, causal: bool, bucket_size: int, num_samples: int, num_hash_bits: int | None, sampling: str,
                 exact_window: int) -> None:
    """The estimator's budget (kde_attention's arguments): TypeError for a non-int, ValueError out of range;
    exact_window is checked against bucket_size only when causal (it is unused otherwise)."""
    for name, value in (("bucket_size", bucket_size), ("num_samples", num_samples), ("exact_window", exact_window)):
        check_int(op, name, value)
    if num_hash_bits is None:  # the default: chosen from the sequence length
        num_hash_bits = ref.MIN_HASH_BITS
    check_int(op, "num_hash_bits", num_hash_bits)
    if bucket_size < 16 or bucket_size & (bucket_size - 1):
        raise ValueError(f"{op}: bucket_size must be a power of two >= 16, got {bucket_size}")
    if num_samples < 0:
        raise ValueError(f"{op}: num_samples must be >= 0, got {num_samples}")
    if not 0 <= num_hash_bits <= ref.MAX_HASH_BITS:
        raise ValueError(f"{op}: num_hash_bits must be in [0, {ref.MAX_HASH_BITS}], got {num_hash_bits}")
    if sampling not in ref.SAMPLING:
        raise ValueError(f"{op}: sampling must be one of {ref.SAMPLING}, got {sampling!r}")
    if causal and (exact_window < bucket_size or exact_window % bucket_size):
        raise ValueError(f"{op}: exact_window must be a positive multiple of bucket_size ({bucket_size}), "
                         f"got {exact_window}")


def _check(op, q, k, v, seed, causal, scale, bucket_size, num_samples, num_hash_bits, sampling, exact_window):
    _check_inputs(op, q, k, v)
    check_params(op, causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
    if not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    _check_seed_tensor(op, seed)


def _check_seed_tensor(op: str, seed: Tensor) -> None:
    if seed.dtype != torch.int64:
        raise TypeError(f"{op}: a seed tensor must be int64, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"{op}: a seed tensor must have one element, got shape {tuple(seed.shape)}")


def _plan(q, k, v, seed, causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window) -> ref.KDEPlan:
    return ref.make_plan(q, k, v, seed, causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window)


@torch.library.custom_op("torchext::kde_attention", mutates_args=())
def _kde_attention(q: Tensor, k: Tensor, v: Tensor, seed: Tensor, causal: bool, scale: float, bucket_size: int,
                   num_samples: int, num_hash_bits: int, sampling: str, exact_window: int) -> tuple[Tensor, Tensor]:
    args = (causal, scale, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
    _check("kde_attention", q, k, v, seed, *args)
    B, H, n, _ = q.shape
    if q.numel() == 0 or v.numel() == 0:
        return q.new_zeros((B, H, n, v.shape[3])), q.new_zeros((B, H, n), dtype=accumulator_dtype(q.dtype))
    plan = _plan(q, k, v, seed, causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
    if use_triton(q):
        return nonfinite_heads_as_nan(*kernels.kde_attention_fwd(q, k, v, plan, scale), k, v)
    out, lse = ref.kde_attention(q, k, v, plan, scale)
    return out.contiguous(), lse


@_kde_attention.register_fake
def _(q, k, v, seed, causal, scale, bucket_size, num_samples, num_hash_bits, sampling, exact_window):
    _check("kde_attention", q, k, v, seed, causal, scale, bucket_size, num_samples, num_hash_bits, sampling,
           exact_window)
    B, H, n, _ = q.shape
    return q.new_empty((B, H, n, v.shape[3])), q.new_empty((B, H, n), dtype=accumulator_dtype(q.dtype))


@torch.library.custom_op("torchext::kde_attention_backward", mutates_args=())
def _kde_attention_backward(grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                            lse: Tensor, seed: Tensor, causal: bool, scale: float, bucket_size: int, num_samples: int,
                            num_hash_bits: int, sampling: str,
                            exact_window: int) -> tuple[Tensor, Tensor, Tensor]:
    if q.numel() == 0 or v.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    plan = _plan(q, k, v, seed, causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
    if use_triton(q):
        return kernels.kde_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, plan, scale)
    dq, dk, dv = ref.kde_attention_backward(grad_out, grad_lse, q, k, v, plan, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_kde_attention_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, seed, causal, scale, bucket_size, num_samples, num_hash_bits, sampling,
      exact_window):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _kde_attention_setup(ctx, inputs, output):
    q, k, v, seed, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, seed, *output)


def _kde_attention_grad(ctx, grad_out, grad_lse):
    q, k, v, seed, out, lse = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse
    dq, dk, dv = torch.ops.torchext.kde_attention_backward(grad_out, grad_lse, q, k, v, out, lse, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_kde_attention.register_autograd(_kde_attention_grad, setup_context=_kde_attention_setup)


def kde_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None,
                  bucket_size: int = 256, num_samples: int = 256, num_hash_bits: int | None = None,
                  seed: int | Tensor | None = None, sampling: str = "uniform",
                  exact_window: int = DEFAULT_EXACT_WINDOW, min_seq_len: int | None = None,
                  return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Sub-quadratic softmax attention by LSH blocks plus importance-sampled keys (KDEformer / HyperAttention).

    Each query attends exactly to the keys of its SimHash block (``bucket_size`` keys of the hash-sorted order) and
    to ``num_samples`` keys drawn from the other keys with probability p_j / Q (p: value-row norm mixed with uniform,
    or uniform; Q: the sum of p outside the query's block), stratified in hash order, weighted Q / (m p_j):
    numerator and denominator of the softmax are unbiased estimates of the exact sums. Causal: exact attention in
    aligned windows of ``exact_window`` tokens plus HyperAttention's recursive split of the rest (see
    torchext.reference.kde_attention). Cost O(N (bucket_size + num_samples) D)
    per head against O(N^2 D). Below ``min_seq_len`` tokens it is exact attention (SDPA).

    Args:
        q: [B, H, N, D] float32/bfloat16/float16/float64 (unit stride on D; other strides are fine).
        k: [B, Hk, N, D], Hk dividing H (GQA/MQA); same dtype and length as q (self-attention).
        v: [B, Hk, N, Dv].
        causal: causal masking (no output depends on a later token, hashing included).
        scale: softmax scale, default 1 / sqrt(D).
        bucket_size: keys per LSH block, a power of two >= 16.
        num_samples: m, sampled keys per query tile (min(bucket_size, 128) queries of one LSH block, each tile
            drawing its own keys); 0 gives block-sparse attention.
        num_hash_bits: SimHash hyperplanes r (2^r buckets, ordered by the inverse Gray code); None: grows with N
            (torchext.reference.kde_attention.default_hash_bits: 8 up to 1024 tokens at bucket 256, 12 at 16K,
            15 at 128K), so a bucket stays smaller than a block and recall holds at long context.
        seed: seeds hyperplanes and samples: an int, a one-element int64 tensor (best on q's device: a CUDA graph
            then replays with whatever seed it holds), or None to draw one from torch's generator on q's device
            (a new plan per call). Nothing is read back to the host.
        sampling: "uniform" (the default, HyperAttention's) or "value_norm" (KDEformer's value-row norms mixed with
            uniform: outputs no more accurate in examples/kde_quality.py, a less noisy lse in the tests; its
            backward carries the weights' gradient to v, one more reduction in the dq kernel).
        exact_window: causal only, a multiple of bucket_size.
        min_seq_len: run exact attention below this length; None: the family default,
            ``torchext.ops.FAMILIES["kde_attention"].MIN_SEQ_LEN`` (``MIN_SEQ_LEN_CAUSAL`` when causal), read at
            each call (assign there to change the default of every call that passes None).
        return_lse: also return the log-sum-exp of the (estimated) softmax denominator.

    Returns:
        out [B, H, N, Dv] in q's dtype, and with return_lse lse [B, H, N] (fp32; fp64 for fp64 inputs).
    """
    _check_inputs("kde_attention", q, k, v)
    check_params("kde_attention", causal, bucket_size, num_samples, num_hash_bits, sampling, exact_window)
    if isinstance(seed, Tensor):
        _check_seed_tensor("kde_attention", seed)
    elif seed is not None:
        check_int("kde_attention", "seed", seed)
        if not -2**63 <= seed < 2**63:
            raise ValueError(f"kde_attention: seed must fit in int64, got {seed}")
    if scale is not None:
        check_float("kde_attention", "scale", scale)
    if min_seq_len is not None:
        check_int("kde_attention", "min_seq_len", min_seq_len, minimum=0)
    check_bool("kde_attention", "return_lse", return_lse)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    n = q.shape[2]
    if num_hash_bits is None:
        num_hash_bits = ref.default_hash_bits(n, bucket_size)
    threshold = (MIN_SEQ_LEN_CAUSAL if causal else MIN_SEQ_LEN) if min_seq_len is None else min_seq_len
    if n < threshold:
        if not return_lse:
            return _sdpa(q, k, v, is_causal=causal, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
        # Exact attention with its lse: one block holding every key, no samples.
        bucket_size = exact_window = max(16, 1 << max(n - 1, 0).bit_length())
        num_samples = 0
    # The seed lives on q's device and is made without a host-to-device copy (a fill, or torch's capturable
    # generator), so the whole call can be captured in a CUDA graph.
    if seed is None:
        seed = torch.randint(-2**63, 2**63 - 1, (), dtype=torch.int64, device=q.device)
    elif not isinstance(seed, Tensor):
        seed = torch.full((), seed, dtype=torch.int64, device=q.device)
    out, lse = torch.ops.torchext.kde_attention(q, k, v, seed, causal, scale, bucket_size, num_samples,
                                                num_hash_bits, sampling, exact_window)
    return (out, lse) if return_lse else out
