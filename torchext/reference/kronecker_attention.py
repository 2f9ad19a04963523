"""Pure-PyTorch reference for Kronecker attention operators (Gao, Wang, Ji, "Kronecker Attention Networks",
KDD 2020, arXiv 2007.08442), written from the paper's equations for 2-D [B, C, H, W] and 3-D [B, C, T, H, W].

Notation (one batch element, one head of d = C / heads channels, N = T*H*W positions, T = 1 in 2-D):
    X in R^{d x N}                    the unfolded input X_(3); column p = (t, i, j) is one position.
    C = X M in R^{d x L}              the averaged tokens: L = H + W in 2-D, T + H + W in 3-D. M in R^{N x L}
                                      has M[p, l] = 1 / |group l| if p is in group l: each token is the mean
                                      of x over the positions that share one index (row token i: positions with
                                      row i; column token j: column j; time token t: frame t).
    KAO_KV:  O  = C softmax(scale C^T X)  in R^{d x N}   hw (thw) queries attend to L summary tokens.
    KAO_QKV: O' = C softmax(scale C^T C)  in R^{d x L}   the L tokens attend among themselves, and the output
             is their outer sum  O[:, (t, i, j)] = O'[:, t] + O'[:, T + i] + O'[:, T + H + j]  (O' F^T with F the
             0/1 group indicator; no time term in 2-D).
softmax runs over the keys (the L axis); scale defaults to 1 / sqrt(d).

Tokens are ordered [time tokens (3-D only), row tokens (H, mean over T and W), column tokens (W, mean over
T and H)]. The paper lists the column means first; attention without positional terms is equivariant to the
token order, so the output is the same.

Every function computes in fp32 (fp64 for fp64 inputs) and casts back to the input dtype. The forward is the
ground truth the kernels are tested against (gradients by autograd through it); ``kronecker_attention_backward``
is the explicit backward, the CPU path of the op (a custom op's implementation runs below autograd).
"""

import math

import torch
from torch import Tensor

from torchext._dtypes import upcast

MODES = ("kv", "qkv")


def default_scale(channels: int, heads: int) -> float:
    """1 / sqrt(d) with d = channels / heads, the usual dot-product attention scale (1 for a map with no channels,
    whose output is empty)."""
    return 1.0 / math.sqrt(max(channels // heads, 1))


def group_sizes(spatial: tuple[int, ...]) -> list[int]:
    """How many positions each token averages, per token group: [H*W, T*W, T*H] (3-D) or [W, H] (2-D)."""
    return [math.prod(spatial[:i] + spatial[i + 1:]) for i in range(len(spatial))]


def token_counts(spatial: tuple[int, ...], device=None, dtype=torch.float32) -> Tensor:
    """[L] the number of positions behind every token, in token order."""
    return torch.cat([torch.full((s,), float(size), device=device, dtype=dtype)
                      for s, size in zip(spatial, group_sizes(spatial))])


def kronecker_means(x: Tensor) -> Tensor:
    """The averaged tokens C = X M of every channel: x [B, C, *spatial] -> [B, C, L] in fp32 (fp64 for fp64).

    spatial is (H, W) or (T, H, W); L = sum(spatial), in token order (time, rows, columns).
    """
    xf = upcast(x)
    axes = list(range(2, x.dim()))
    return torch.cat([xf.mean(dim=[a for a in axes if a != axis]) for axis in axes], dim=-1)


def outer_sum(tokens: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """The fold of KAO_QKV: tokens [B, C, L] -> [B, C, *spatial] with out[.., t, i, j] = tok_t + tok_i + tok_j."""
    out = 0
    for axis, part in enumerate(tokens.split(list(spatial), dim=-1)):
        shape = [1] * len(spatial)
        shape[axis] = spatial[axis]
        out = out + part.reshape(*part.shape[:2], *shape)
    return out


def _heads(t: Tensor, heads: int) -> Tensor:
    """[B, C, n] -> [B, heads, d, n]."""
    return t.reshape(t.shape[0], heads, t.shape[1] // heads, t.shape[2])


def _probabilities(keys: Tensor, queries: Tensor, scale: float) -> Tensor:
    """softmax over keys of scale * keys^T queries: keys [B, h, d, L], queries [B, h, d, n] -> [B, h, L, n]."""
    return torch.softmax(scale * torch.einsum("bhdl,bhdn->bhln", keys, queries), dim=2)


def kronecker_attention(x: Tensor, mode: str = "kv", heads: int = 1, scale: float | None = None) -> Tensor:
    """KAO_KV or KAO_QKV of x, materialising the means and the attention matrix (see the module docstring).

    Args:
        x: [B, C, H, W] or [B, C, T, H, W], any float dtype; C divisible by heads.
        mode: "kv" (hw queries, L keys) or "qkv" (L tokens attend among themselves, then the outer sum).
        heads: channel groups attending independently.
        scale: softmax scale; None means 1 / sqrt(C / heads).

    Returns:
        A tensor of x's shape and dtype.
    """
    if scale is None:
        scale = default_scale(x.shape[1], heads)
    B, C, *spatial = x.shape
    N, L = math.prod(spatial), sum(spatial)  # explicit: a -1 is ambiguous for an empty batch
    tokens = _heads(kronecker_means(x), heads)  # [B, h, d, L]
    if mode == "kv":
        queries = _heads(upcast(x).reshape(B, C, N), heads)  # [B, h, d, N]
        out = torch.einsum("bhdl,bhln->bhdn", tokens, _probabilities(tokens, queries, scale))
        return out.reshape(x.shape).to(x.dtype)
    attended = torch.einsum("bhdl,bhlm->bhdm", tokens, _probabilities(tokens, tokens, scale))  # O' [B, h, d, L]
    return outer_sum(attended.reshape(B, C, L), tuple(spatial)).to(x.dtype)


def _softmax_backward(probs: Tensor, grad_probs: Tensor) -> Tensor:
    """dS for P = softmax(S) over dim 2: P * (dP - sum_l P dP)."""
    return probs * (grad_probs - (probs * grad_probs).sum(dim=2, keepdim=True))


def kronecker_attention_backward(grad_out: Tensor, x: Tensor | None, means: Tensor, mode: str, heads: int,
                                 scale: float) -> Tensor:
    """Gradient of ``kronecker_attention`` wrt x, from the saved tokens.

    Args:
        grad_out: [B, C, *spatial], the gradient of the output.
        x: the input (needed for "kv", where x is also the query); None for "qkv", whose gradient depends on
            x only through the tokens.
        means: [B, C, L] the tokens ``kronecker_means(x)``, fp32 (fp64 for fp64 inputs).
        mode, heads, scale: as in the forward (scale already resolved).

    Returns:
        dx of grad_out's shape and dtype.

    With dS = P * (dP - sum_l P dP) (softmax backward) and spread(G) = G M^T (each token's gradient shared
    equally by the positions it averages):
        kv:  dP = C^T dO, dX = scale C dS + spread(dO P^T + scale X dS^T)
        qkv: dO' = dO F (sums of dO over each token's positions), dP = C^T dO',
             dX = spread(dO' P^T + scale C dS^T + scale C dS)
    """
    B, C, *spatial = grad_out.shape
    spatial, N, L = tuple(spatial), math.prod(spatial), sum(spatial)
    tokens = _heads(means, heads)  # [B, h, d, L]
    counts = token_counts(spatial, device=means.device, dtype=means.dtype)
    g = upcast(grad_out)
    if mode == "kv":
        queries = _heads(upcast(x).reshape(B, C, N), heads)  # [B, h, d, N]
        grad = _heads(g.reshape(B, C, N), heads)
        probs = _probabilities(tokens, queries, scale)  # [B, h, L, N]
        grad_scores = _softmax_backward(probs, torch.einsum("bhdl,bhdn->bhln", tokens, grad))
        dx = scale * torch.einsum("bhdl,bhln->bhdn", tokens, grad_scores)
        d_tokens = (torch.einsum("bhdn,bhln->bhdl", grad, probs)
                    + scale * torch.einsum("bhdn,bhln->bhdl", queries, grad_scores))
        dx = dx.reshape(B, C, *spatial) + outer_sum(d_tokens.reshape(B, C, L) / counts, spatial)
        return dx.to(grad_out.dtype)
    grad = _heads(kronecker_means(g) * counts, heads)  # dO' [B, h, d, L]
    probs = _probabilities(tokens, tokens, scale)  # [B, h, L(keys), L(queries)]
    grad_scores = _softmax_backward(probs, torch.einsum("bhdl,bhdm->bhlm", tokens, grad))
    d_tokens = (torch.einsum("bhdm,bhlm->bhdl", grad, probs)
                + scale * torch.einsum("bhdm,bhlm->bhdl", tokens, grad_scores)
                + scale * torch.einsum("bhdl,bhlm->bhdm", tokens, grad_scores))
    return outer_sum(d_tokens.reshape(B, C, L) / counts, spatial).to(grad_out.dtype)
