"""Pure-PyTorch reference for nGPT (Loshchilov et al., arXiv 2410.01131), written from the paper.

Every function computes in fp32 (fp64 for fp64 inputs) and casts the result back to the input
dtype. The forward functions are the ground truth the kernels are tested against (gradients by
autograd through them); they and the explicit ``*_backward`` functions are also the CPU path of the
ops (a custom op's implementation runs below autograd, so it cannot differentiate the forward itself).
"""

import math

import torch
from torch import Tensor

from torchext._dtypes import upcast

DEFAULT_EPS = 1e-6


def _scaled(x: Tensor, dim: int = -1) -> tuple[Tensor, Tensor]:
    """(x / s, s) with s = max|x| along dim (kept; 1 for a zero or empty vector): LAPACK nrm2's scaling, so that
    ||x / s|| neither overflows nor flushes to zero where x is representable (the kernels do the same)."""
    if x.shape[dim] == 0:  # amax has no identity to reduce an empty vector to
        return x, x.new_ones(x.shape[:dim % x.dim()] + (1,) + x.shape[dim % x.dim() + 1:])
    scale = x.abs().amax(dim, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return x / scale, scale


def _unit(x: Tensor, eps: float, dim: int = -1) -> tuple[Tensor, Tensor, Tensor]:
    """(y, inv, above_eps) along dim (kept): y = x / max(||x||, eps), inv = 1 / max(||x||, eps), ||x|| > eps.

    y is computed as (x / s) / max(||x / s||, eps / s), without forming ||x||: it overflows for vectors near the
    top of the range (peaks of 3e38 in fp32) whose unit vector is representable. NaN in x gives NaN."""
    xs, scale = _scaled(x, dim)
    norm_s, eps_s = xs.norm(dim=dim, keepdim=True), eps / scale
    clamped = torch.maximum(norm_s, eps_s)  # propagates NaN
    return xs / clamped, 1 / clamped / scale, norm_s > eps_s


def _unit_backward(grad_y: Tensor, y: Tensor, inv: Tensor, above_eps: Tensor) -> Tensor:
    """dx for y = x / max(||x||, eps): (dy - y (y.dy)) / ||x||, or dy / eps where the norm was clamped."""
    y_dot_grad = torch.where(above_eps, (y * grad_y).sum(-1, keepdim=True), 0.0)
    return (grad_y - y * y_dot_grad) * inv


def l2_normalize(x: Tensor, dim: int = -1, eps: float = DEFAULT_EPS) -> Tensor:
    """Norm(x) = x / max(||x||_2, eps) along ``dim`` (the paper's Norm, with an eps guard)."""
    return _unit(upcast(x), eps, dim)[0].to(x.dtype)


def l2_normalize_backward(grad_y: Tensor, x: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Gradient of ``l2_normalize(x, -1, eps)``: grad_y, x [..., n] -> dx [..., n] in x.dtype."""
    return _unit_backward(upcast(grad_y), *_unit(upcast(x), eps)).to(x.dtype)


def hypersphere_update(h: Tensor, h_branch: Tensor, alpha: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """h' = Norm(h + |alpha| * (Norm(h_branch) - h)), eqs. 10-11.

    h, h_branch: [..., d]; alpha: [d] (the eigen learning rates, any float dtype). Returns h.dtype.
    """
    hf, b_unit = upcast(h), _unit(upcast(h_branch), eps)[0]
    return _unit(hf + upcast(alpha).abs() * (b_unit - hf), eps)[0].to(h.dtype)


def hypersphere_update_backward(grad_out: Tensor, h: Tensor, h_branch: Tensor, alpha: Tensor,
                                eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``hypersphere_update``: (dh, dh_branch, dalpha) in the dtypes of (h, h_branch, alpha)."""
    hf, a = upcast(h), upcast(alpha).abs()
    b_unit, *b_inv = _unit(upcast(h_branch), eps)
    out, *r_inv = _unit(hf + a * (b_unit - hf), eps)
    dr = _unit_backward(upcast(grad_out), out, *r_inv)
    db = _unit_backward(dr * a, b_unit, *b_inv)
    dalpha = (dr * (b_unit - hf)).reshape(-1, h.shape[-1]).sum(0) * torch.sign(upcast(alpha))
    return (dr * (1 - a)).to(h.dtype), db.to(h_branch.dtype), dalpha.to(alpha.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of the RoPE angles t * base^(-2i/head_dim): two fp32 tensors [seq_len, head_dim // 2]."""
    if head_dim % 2:
        raise ValueError(f"rope_cos_sin: head_dim must be even, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def rotate_half_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) of x [..., D] by angles whose cos, sin broadcast against [..., D/2], in
    fp32 (fp64 for fp64 inputs): Hugging Face's "rotate_half" RoPE."""
    x1, x2 = upcast(x).chunk(2, dim=-1)
    c, s = upcast(cos), upcast(sin)
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + D/2}) by the angle of each position (half-split RoPE), in fp32.

    x: [B, T, H, D]; cos, sin: [T, D/2]. A true rotation: it preserves ||x|| and makes q.k depend
    only on the position offset (the official nGPT code's RoPE does neither, see the research note).
    """
    return rotate_half_rope(x, cos[None, :, None, :], sin[None, :, None, :])


def qk_norm_rope(
    q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, s_qk: Tensor, eps: float = DEFAULT_EPS
) -> tuple[Tensor, Tensor]:
    """q <- Norm(RoPE(q)) * s_qk and k <- Norm(RoPE(k)) * s_qk, per head over head_dim (section 2.3.2).

    q: [B, T, H, D], k: [B, T, Hk, D]; cos, sin: [T, D/2]; s_qk: [D] or [H, D] (then Hk == H).
    Returns q, k in the attention layout [B, H, T, D] / [B, Hk, T, D], dtype of q.
    """
    scale = upcast(s_qk)
    q_out = _unit(apply_rope(q, cos, sin), eps)[0] * scale
    k_out = _unit(apply_rope(k, cos, sin), eps)[0] * scale
    return q_out.transpose(1, 2).to(q.dtype), k_out.transpose(1, 2).to(k.dtype)


def qk_norm_rope_backward(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                          s_qk: Tensor, eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of ``qk_norm_rope``: grads in [B, H, T, D] -> (dq, dk [B, T, H, D], ds_qk like s_qk)."""
    scale, ds_qk, grads = upcast(s_qk), torch.zeros_like(upcast(s_qk)), []
    for x, grad in ((q, grad_q), (k, grad_k)):
        y, *inv = _unit(apply_rope(x, cos, sin), eps)
        g = upcast(grad).transpose(1, 2)  # [B, T, H, D]
        per_head = (g * y).sum((0, 1))  # [H, D]
        ds_qk = ds_qk + (per_head.sum(0) if s_qk.dim() == 1 else per_head)
        dr = _unit_backward(g * scale, y, *inv)
        grads.append(apply_rope(dr, cos, -sin).to(x.dtype))  # the inverse rotation
    return grads[0], grads[1], ds_qk.to(s_qk.dtype)


def scaled_swiglu(u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor, d_model: int) -> Tensor:
    """(u * s_u) * SiLU(v * s_v * sqrt(d_model)), section 2.4.

    u, v: [..., d_mlp]; s_u, s_v: [d_mlp]. Returns u.dtype.
    """
    a = upcast(u) * upcast(s_u)
    z = upcast(v) * upcast(s_v) * math.sqrt(d_model)
    return (a * torch.nn.functional.silu(z)).to(u.dtype)


def scaled_swiglu_backward(grad_out: Tensor, u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor,
                           d_model: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradient of ``scaled_swiglu``: (du, dv, ds_u, ds_v) in the dtypes of the inputs."""
    uf, vf, s_uf, s_vf = upcast(u), upcast(v), upcast(s_u), upcast(s_v) * math.sqrt(d_model)
    g, z = upcast(grad_out), vf * s_vf
    sig = torch.sigmoid(z)
    da = g * z * sig  # at a = u * s_u
    dz = g * uf * s_uf * sig * (1 + z * (1 - sig))  # SiLU'(z) = sig (1 + z (1 - sig))
    rows = lambda t: t.reshape(-1, u.shape[-1]).sum(0)  # noqa: E731
    return ((da * s_uf).to(u.dtype), (dz * s_vf).to(v.dtype), rows(da * uf).to(s_u.dtype),
            (rows(dz * vf) * math.sqrt(d_model)).to(s_v.dtype))


def _as_counts(zero_counts: list[Tensor], tensors: list[Tensor]) -> Tensor:
    """The per-tensor zero-vector counts as one int32 tensor on the tensors' device."""
    device = tensors[0].device if tensors else "cpu"
    return torch.stack(zero_counts).to(torch.int32) if zero_counts else torch.zeros(0, dtype=torch.int32, device=device)


def renormalize_(tensors: list[Tensor], dims: list[int], eps: float = DEFAULT_EPS) -> Tensor:
    """In place: tensors[i] <- tensors[i] / max(||tensors[i]||, eps) along dims[i], in fp32 math.

    Returns an int32 tensor [len(tensors)] counting the zero vectors (rows/columns with norm 0)
    of each tensor, which the paper's retraction cannot map to the sphere.
    """
    zero_counts = []
    with torch.no_grad():
        for t, dim in zip(tensors, dims):
            zero_counts.append((t == 0).all(dim).sum())
            t.copy_(_unit(upcast(t), eps, dim)[0])
    return _as_counts(zero_counts, tensors)


def renormalize_parts_(tensors: list[Tensor], dims: list[int], reduce, eps: float = DEFAULT_EPS) -> Tensor:
    """``renormalize_`` where each tensor holds only a part of every vector along dims[i] (the local shard of a DTensor
    split along the normalised dim, e.g. a column-normalised weight under FSDP2's dim-0 sharding).

    The squared norms of the parts of all the tensors go, as one flat fp64 buffer, through one call of ``reduce``
    (buffer -> the sum of that buffer over the parts, e.g. one all_reduce); then every part is divided by its whole
    vector's norm. fp64 squares of 16/32-bit values neither overflow nor lose a norm above eps, so no rescaling (and
    no second collective for a max) is needed; an fp64 vector with entries beyond ~1e154 would overflow and is set
    to NaN rather than to a wrong direction. A NaN or Inf anywhere in a vector makes the whole vector NaN.

    Returns int32 [len(tensors)]: the zero vectors among the vectors this part belongs to (every holder of a part
    of a zero vector counts it).
    """
    with torch.no_grad():
        squares = [t.double().square().sum(dim, keepdim=True) for t, dim in zip(tensors, dims)]
        total = reduce(torch.cat([s.flatten() for s in squares]))
        zero_counts = []
        for t, square, whole in zip(tensors, squares, total.split([s.numel() for s in squares])):
            whole = whole.view(square.shape)
            norm = torch.where(whole.isfinite(), whole.sqrt(), float("nan")).clamp(min=eps)  # clamp keeps NaN
            zero_counts.append((whole == 0).sum())
            t.copy_(t.double() / norm)
    return _as_counts(zero_counts, tensors)
