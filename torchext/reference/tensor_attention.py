"""Tensor (triple-wise) attention, pure PyTorch: Alman & Song (arXiv 2310.04064) and the sliding windows of
2-simplicial attention (Roy et al., arXiv 2507.02754).

For queries q_i and key/value pairs (k1_j, v1_j), (k2_k, v2_k), every query attends to every pair (j, k):

    s_ijk = scale * <q_i, k1_j * k2_k>          (the trilinear logit; scale = 1/sqrt(d) by default)
    o_i   = sum_(j,k) softmax_(j,k)(s_i..) (v1_j * v2_k)
    lse_i = log sum_(j,k) exp(s_ijk)            (natural log)

Masks. Causal: j <= i and k <= i. A window (w1, w2) keeps j in (i - w1, i] and k in (i - w2, i] (half-open,
both include i, so no row is ever empty). Windows are causal by definition, as in Roy et al.

Layout [batch, heads, seq, dim] like SDPA; k1, k2, v1, v2 carry heads_kv heads with heads % heads_kv == 0 (GQA:
query head h reads key/value head h // (heads / heads_kv)).

Three functions: ``kronecker_definition`` builds the paper's matrices (the column-wise Kronecker products
K1 ⊘ K2 and V1 ⊘ V2, [n^2, d]) in fp64, for tiny n; ``tensor_attention`` is the chunked reference (over j) for
medium n, differentiable by autograd, and the CPU path of the op; ``tensor_attention_backward`` is the explicit
gradient (the CPU path of the backward op), from the formulas below, with D_i = <dO_i, o_i> - dlse_i:

    P_ijk = exp(s_ijk - lse_i),   dP_ijk = <dO_i, v1_j * v2_k>,   dS_ijk = P_ijk (dP_ijk - D_i)
    dq_i  = scale sum_jk dS_ijk (k1_j * k2_k)     dk1_j = scale sum_ik dS_ijk (q_i * k2_k)
    dk2_k = scale sum_ij dS_ijk (q_i * k1_j)      dv1_j = sum_ik P_ijk (dO_i * v2_k)
    dv2_k = sum_ij P_ijk (dO_i * v1_j)
"""

import math

import torch
from torch import Tensor

from torchext._dtypes import upcast
from torchext.reference._attention import nonfinite_heads_as_nan

# Elements of one chunk of the [B, H, n, chunk, n] logit tensor the chunked reference materialises.
CHUNK_ELEMENTS = 1 << 24


def default_scale(head_dim: int) -> float:
    """1 / sqrt(head_dim), Roy et al.'s scale (Alman & Song use 1 / head_dim: pass it as ``scale``)."""
    return 1.0 / math.sqrt(head_dim)


def pair_masks(n: int, window: tuple[int, int] | None, causal: bool, device=None) -> tuple[Tensor, Tensor]:
    """The allowed (i, j) and (i, k): two bool [n, n] masks whose outer AND is the [n, n, n] triple mask."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    if not causal:
        full = torch.ones(n, n, dtype=torch.bool, device=device)
        return full, full
    w1, w2 = window if window is not None else (n, n)
    return (j <= i) & (j > i - w1), (j <= i) & (j > i - w2)


def _expand_heads(q: Tensor, *kv: Tensor) -> list[Tensor]:
    """k/v tensors with heads_kv heads repeated to q's heads (GQA), so gradients sum back over each group."""
    group = q.shape[1] // kv[0].shape[1]
    return [x.repeat_interleave(group, dim=1) if group > 1 else x for x in kv]


def kronecker_definition(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor,
                         window: tuple[int, int] | None = None, causal: bool = True,
                         scale: float | None = None) -> tuple[Tensor, Tensor]:
    """Alman & Song's matrix form in fp64: D^-1 A (V1 ⊘ V2) with A = exp(Q (K1 ⊘ K2)^T * scale), masked.

    Row (j, k) = j * n + k of K1 ⊘ K2 is k1_j * k2_k: the column-wise Kronecker product, [n^2, d]. Materialises
    [B, H, n, n^2] logits, so it is for tiny n only.

    Args:
        q: [B, H, n, d]; k1, k2, v1, v2: [B, Hkv, n, d] (any float dtype).
        window, causal, scale: as in ``tensor_attention``.

    Returns:
        (out [B, H, n, d], lse [B, H, n]), both float64.
    """
    q, k1, k2, v1, v2 = (x.double() for x in (q, k1, k2, v1, v2))
    k1, k2, v1, v2 = _expand_heads(q, k1, k2, v1, v2)
    B, H, n, d = q.shape
    scale = default_scale(d) if scale is None else scale
    kron_k = (k1[:, :, :, None, :] * k2[:, :, None, :, :]).reshape(B, H, n * n, d)  # K1 ⊘ K2
    kron_v = (v1[:, :, :, None, :] * v2[:, :, None, :, :]).reshape(B, H, n * n, d)  # V1 ⊘ V2
    mask_j, mask_k = pair_masks(n, window, causal, q.device)
    mask = (mask_j[:, :, None] & mask_k[:, None, :]).reshape(n, n * n)
    logits = (q @ kron_k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # [B, H, n, n^2]
    return torch.softmax(logits, dim=-1) @ kron_v, torch.logsumexp(logits, dim=-1)


def _chunks(q: Tensor, chunk: int | None):
    B, H, n, _ = q.shape
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(B * H * n * n, 1))
    return [(j0, min(j0 + chunk, n)) for j0 in range(0, n, chunk)]


def _masked_logits(q, k1, k2, mask_j, mask_k, j0, j1, scale):
    """[B, H, n, j1 - j0, n] logits of one chunk of j, -inf where the triple is masked."""
    s = torch.einsum("bhid,bhjd,bhkd->bhijk", q, k1[:, :, j0:j1], k2) * scale
    return s.masked_fill(~(mask_j[:, j0:j1, None] & mask_k[:, None, :]), float("-inf"))


def tensor_attention(q: Tensor, k1: Tensor, k2: Tensor, v1: Tensor, v2: Tensor,
                     window: tuple[int, int] | None = None, causal: bool = True, scale: float | None = None,
                     chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Tensor attention by chunks of j: O(n^3 d) time, O(B H n chunk n) memory; differentiable by autograd.

    Args:
        q: [B, H, n, d]; k1, k2, v1, v2: [B, Hkv, n, d], H % Hkv == 0; float32/bfloat16/float16/float64.
        window: None (every causal pair, or every pair when not causal) or (w1, w2), w >= 1: j in (i - w1, i],
            k in (i - w2, i]. Needs causal.
        causal: j <= i and k <= i.
        scale: logit scale, default 1 / sqrt(d).
        chunk: j-values per chunk (default: about CHUNK_ELEMENTS logits per chunk).

    Returns:
        out [B, H, n, d] in q.dtype, lse [B, H, n] natural log in float32 (float64 for float64 inputs).
        Math in fp32 (fp64 for fp64 inputs).
    """
    dtype = q.dtype
    q, k1, k2, v1, v2 = (upcast(x) for x in (q, k1, k2, v1, v2))
    k1, k2, v1, v2 = _expand_heads(q, k1, k2, v1, v2)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    mask_j, mask_k = pair_masks(q.shape[2], window, causal, q.device)
    lses, parts = [], []
    for j0, j1 in _chunks(q, chunk):
        s = _masked_logits(q, k1, k2, mask_j, mask_k, j0, j1, scale)
        m = s.amax(dim=(-2, -1))
        m = torch.where(torch.isfinite(m), m, 0.0).detach()  # a fully masked chunk: exp(-inf - 0) = 0
        e = torch.exp(s - m[..., None, None])  # [B, H, n, c, n]
        lses.append(m + torch.log(e.sum(dim=(-2, -1))))
        # sum_jk e_ijk (v1_j * v2_k) = sum_j v1_j * (sum_k e_ijk v2_k): the Khatri-Rao identity, per query.
        parts.append((m, torch.einsum("bhijd,bhjd->bhid", torch.einsum("bhijk,bhkd->bhijd", e, v2), v1[:, :, j0:j1])))
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    out = sum(acc * torch.exp(m - lse)[..., None] for m, acc in parts)
    return nonfinite_heads_as_nan(out.to(dtype), lse, k1, k2, v1, v2)


def _sum_groups(grad: Tensor, heads_kv: int) -> Tensor:
    B, H, n, d = grad.shape
    return grad.view(B, heads_kv, H // heads_kv, n, d).sum(2)


def tensor_attention_backward(grad_out: Tensor, grad_lse: Tensor | None, q: Tensor, k1: Tensor, k2: Tensor,
                              v1: Tensor, v2: Tensor, out: Tensor, lse: Tensor,
                              window: tuple[int, int] | None = None, causal: bool = True,
                              scale: float | None = None, chunk: int | None = None) -> tuple[Tensor, ...]:
    """Explicit gradients of ``tensor_attention`` (module docstring), recomputing P from lse by chunks of j.

    Args:
        grad_out: [B, H, n, d]; grad_lse: [B, H, n] or None; q, k1, k2, v1, v2, window, causal, scale: the
            forward's; out, lse: its outputs.

    Returns:
        (dq, dk1, dk2, dv1, dv2) in the dtypes of the inputs; k/v gradients summed over each GQA group.
    """
    heads_kv = k1.shape[1]
    dtypes = [x.dtype for x in (q, k1, k2, v1, v2)]
    q, k1, k2, v1, v2, do, out, lse = (upcast(x) for x in (q, k1, k2, v1, v2, grad_out, out, lse))
    k1, k2, v1, v2 = _expand_heads(q, k1, k2, v1, v2)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    mask_j, mask_k = pair_masks(q.shape[2], window, causal, q.device)
    delta = (do * out).sum(-1)  # D_i = <dO_i, o_i> (- dlse_i): the softmax Jacobian's row term
    if grad_lse is not None:
        delta = delta - upcast(grad_lse)
    dq, dk2, dv2 = torch.zeros_like(q), torch.zeros_like(k2), torch.zeros_like(v2)
    dk1, dv1 = torch.zeros_like(k1), torch.zeros_like(v1)
    for j0, j1 in _chunks(q, chunk):
        k1c, v1c = k1[:, :, j0:j1], v1[:, :, j0:j1]
        p = torch.exp(_masked_logits(q, k1, k2, mask_j, mask_k, j0, j1, scale) - lse[..., None, None])
        dp = torch.einsum("bhid,bhjd,bhkd->bhijk", do, v1c, v2)
        ds = p * (dp - delta[..., None, None])  # [B, H, n, c, n]
        dq += scale * torch.einsum("bhijk,bhjd,bhkd->bhid", ds, k1c, k2)
        dk1[:, :, j0:j1] = scale * torch.einsum("bhijk,bhid,bhkd->bhjd", ds, q, k2)
        dk2 += scale * torch.einsum("bhijk,bhid,bhjd->bhkd", ds, q, k1c)
        dv1[:, :, j0:j1] = torch.einsum("bhijk,bhid,bhkd->bhjd", p, do, v2)
        dv2 += torch.einsum("bhijk,bhid,bhjd->bhkd", p, do, v1c)
    grads = [dq] + [_sum_groups(g, heads_kv) for g in (dk1, dk2, dv1, dv2)]
    return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes))
