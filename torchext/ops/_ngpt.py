"""nGPT ops (arXiv 2410.01131) as torch.library custom ops: torch.ops.torchext.<name>.

Each op checks its inputs, dispatches (Triton / CUDA C++ kernel, or the reference on CPU), and has a
fake for torch.compile and, where differentiable, an autograd rule whose backward is itself an op.
"""

import math

import torch
from torch import Tensor

from torchext._backend import CUDA_EXT, HAS_TRITON, cuda_dtype_code, use_cuda_ext, use_triton
from torchext._dtensor import DTensor, check_not_partial, mesh_dims_splitting
from torchext._dtypes import accumulator_dtype
from torchext.ops._checks import (as_rows, check_dim, check_float, check_int, check_ints, check_same_device,
                                  check_shape, check_tensor, check_tensor_list, check_tensors, check_unit_last_stride)
from torchext.reference import ngpt as ref

if HAS_TRITON:
    from torchext.triton_kernels import ngpt as kernels

DEFAULT_EPS = ref.DEFAULT_EPS

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"l2_normalize": "triton", "hypersphere_update": "triton", "qk_norm_rope": "triton",
           "scaled_swiglu": "triton", "renormalize_": "cuda"}


DISPATCH = {"renormalize_": "on CUDA the reference for float64 tensors"}

# The smallest eps: the kernels divide by max(norm, eps) in fp32, and 1 / eps overflows for a subnormal eps.
MIN_EPS = torch.finfo(torch.float32).tiny


def _check_eps(op: str, eps: float) -> None:
    check_float(op, "eps", eps)
    if not eps >= MIN_EPS:
        raise ValueError(f"{op}: eps must be >= {MIN_EPS:.4g} (the smallest normal float32), got {eps}")


# ---- l2_normalize -----------------------------------------------------------------------------------------------


def _check_l2_normalize(x: Tensor, eps: float) -> None:
    check_tensor("l2_normalize", "x", x)
    check_unit_last_stride("l2_normalize", "x", x)
    _check_eps("l2_normalize", eps)


@torch.library.custom_op("torchext::l2_normalize", mutates_args=())
def _l2_normalize(x: Tensor, eps: float) -> Tensor:
    _check_l2_normalize(x, eps)
    if x.numel() == 0 or not use_triton(x):
        return ref.l2_normalize(x, eps=eps).contiguous()
    return kernels.l2_normalize_fwd(as_rows("l2_normalize", "x", x), eps).view(x.shape)


@_l2_normalize.register_fake
def _(x, eps):
    _check_l2_normalize(x, eps)
    return x.new_empty(x.shape)


@torch.library.custom_op("torchext::l2_normalize_backward", mutates_args=())
def _l2_normalize_backward(grad_y: Tensor, x: Tensor, eps: float) -> Tensor:
    grad_y = grad_y.contiguous()
    if x.numel() == 0 or not use_triton(x):
        return ref.l2_normalize_backward(grad_y, x, eps)
    rows = as_rows("l2_normalize_backward", "x", x)
    return kernels.l2_normalize_bwd(grad_y.view(rows.shape), rows, eps).view(x.shape)


@_l2_normalize_backward.register_fake
def _(grad_y, x, eps):
    return x.new_empty(x.shape)


def _l2_normalize_setup(ctx, inputs, output):
    x, ctx.eps = inputs
    ctx.save_for_backward(x)


def _l2_normalize_grad(ctx, grad_y):
    return torch.ops.torchext.l2_normalize_backward(grad_y, ctx.saved_tensors[0], ctx.eps), None


_l2_normalize.register_autograd(_l2_normalize_grad, setup_context=_l2_normalize_setup)


def l2_normalize(x: Tensor, dim: int = -1, eps: float = DEFAULT_EPS) -> Tensor:
    """Norm(x) = x / max(||x||_2, eps) along ``dim`` (nGPT's Norm), fp32 math.

    Args:
        x: [..., n] float32/bfloat16/float16 with unit stride along its last dim.
        dim: the axis to normalise. The kernel works on the last axis; any other costs a transposed copy.
        eps: lower bound on the norm, so an all-zero vector maps to zero instead of NaN; finite and at least
            torch.finfo(torch.float32).tiny (ValueError otherwise).

    Returns:
        A tensor of x's shape and dtype. The norm is never formed itself: rows peaking near the top of the
        range (3e38 in fp32) give unit rows, and a NaN anywhere in a row makes the row NaN.
    """
    check_tensor("l2_normalize", "x", x)
    check_dim("l2_normalize", dim, x.dim())
    _check_eps("l2_normalize", eps)
    if x.dim() > 1 and dim % x.dim() != x.dim() - 1:
        return torch.ops.torchext.l2_normalize(x.movedim(dim, -1).contiguous(), eps).movedim(-1, dim)
    return torch.ops.torchext.l2_normalize(x, eps)


# ---- hypersphere_update -------------------------------------------------------------------------------------------


def _check_hypersphere_update(h: Tensor, h_branch: Tensor, alpha: Tensor, eps: float) -> None:
    op = "hypersphere_update"
    for name, x in (("h", h), ("h_branch", h_branch), ("alpha", alpha)):
        check_tensor(op, name, x)
    check_shape(op, "h_branch", h_branch, h.shape)
    check_shape(op, "alpha", alpha, h.shape[-1:])
    check_same_device(op, h=h, h_branch=h_branch, alpha=alpha)
    check_unit_last_stride(op, "h", h)
    check_unit_last_stride(op, "h_branch", h_branch)
    _check_eps(op, eps)


@torch.library.custom_op("torchext::hypersphere_update", mutates_args=())
def _hypersphere_update(h: Tensor, h_branch: Tensor, alpha: Tensor, eps: float) -> Tensor:
    _check_hypersphere_update(h, h_branch, alpha, eps)
    if h.numel() == 0 or not use_triton(h):
        return ref.hypersphere_update(h, h_branch, alpha, eps).contiguous()
    op = "hypersphere_update"
    out = kernels.hypersphere_update_fwd(as_rows(op, "h", h), as_rows(op, "h_branch", h_branch),
                                         alpha.contiguous(), eps)
    return out.view(h.shape)


@_hypersphere_update.register_fake
def _(h, h_branch, alpha, eps):
    _check_hypersphere_update(h, h_branch, alpha, eps)
    return h.new_empty(h.shape)


@torch.library.custom_op("torchext::hypersphere_update_backward", mutates_args=())
def _hypersphere_update_backward(grad_out: Tensor, h: Tensor, h_branch: Tensor, alpha: Tensor,
                                 eps: float) -> tuple[Tensor, Tensor, Tensor]:
    grad_out = grad_out.contiguous()
    if h.numel() == 0 or not use_triton(h):
        return ref.hypersphere_update_backward(grad_out, h, h_branch, alpha, eps)
    op = "hypersphere_update_backward"
    rows = as_rows(op, "h", h)
    dh, db, dalpha = kernels.hypersphere_update_bwd(grad_out.view(rows.shape), rows,
                                                    as_rows(op, "h_branch", h_branch), alpha.contiguous(), eps)
    return dh.view(h.shape), db.view(h.shape), dalpha


@_hypersphere_update_backward.register_fake
def _(grad_out, h, h_branch, alpha, eps):
    return h.new_empty(h.shape), h_branch.new_empty(h.shape), alpha.new_empty(alpha.shape)


def _hypersphere_update_setup(ctx, inputs, output):
    h, h_branch, alpha, ctx.eps = inputs
    ctx.save_for_backward(h, h_branch, alpha)


def _hypersphere_update_grad(ctx, grad_out):
    return *torch.ops.torchext.hypersphere_update_backward(grad_out, *ctx.saved_tensors, ctx.eps), None


_hypersphere_update.register_autograd(_hypersphere_update_grad, setup_context=_hypersphere_update_setup)


def hypersphere_update(h: Tensor, h_branch: Tensor, alpha: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """nGPT's residual step on the hypersphere: h' = Norm(h + |alpha| * (Norm(h_branch) - h)) (eqs. 10-11).

    One pass over h and h_branch; the backward also returns d(alpha), reduced over all rows.

    Args:
        h: [..., d] float32/bfloat16/float16, unit-norm hidden states.
        h_branch: [..., d] the attention or MLP output (any float dtype; need not be normalised).
        alpha: [d] the eigen learning rates (the forward uses |alpha|).
        eps: lower bound on both norms (finite, >= torch.finfo(torch.float32).tiny).

    Returns:
        h' of h's shape and dtype.
    """
    check_tensors("hypersphere_update", h=h, h_branch=h_branch, alpha=alpha)
    _check_eps("hypersphere_update", eps)
    return torch.ops.torchext.hypersphere_update(h, h_branch, alpha, eps)


# ---- qk_norm_rope -----------------------------------------------------------------------------------------------


def _check_qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, s_qk: Tensor, eps: float) -> None:
    op = "qk_norm_rope"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "k", k, ndim=4)
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(f"{op}: k must be [B, T, Hk, D] = [{B}, {T}, Hk, {D}] like q, got {tuple(k.shape)}")
    if D % 2:
        raise ValueError(f"{op}: head_dim must be even for RoPE, got {D}")
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(op, name, table, ndim=2)
        if table.shape[0] < T or table.shape[1] != D // 2:
            raise ValueError(f"{op}: {name} must be [>= T, D/2] = [>= {T}, {D // 2}], got {tuple(table.shape)}")
    check_tensor(op, "s_qk", s_qk)
    if tuple(s_qk.shape) not in ((D,), (H, D)):
        raise ValueError(f"{op}: s_qk must be [D] = [{D}] or [H, D] = [{H}, {D}], got {tuple(s_qk.shape)}")
    if s_qk.dim() == 2 and k.shape[2] != H:
        raise ValueError(f"{op}: a per-head s_qk [H, D] needs as many k heads as q heads ({H}), "
                         f"got {k.shape[2]}; pass one shared [D] row for GQA")
    check_same_device(op, q=q, k=k, cos=cos, sin=sin, s_qk=s_qk)
    check_unit_last_stride(op, "q", q)
    check_unit_last_stride(op, "k", k)
    _check_eps(op, eps)


def _rope_tables(cos: Tensor, sin: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """The first T rows of the tables, contiguous, in fp32 (fp64 when q is fp64): the kernels' compute dtype."""
    dtype = accumulator_dtype(q.dtype)
    T = q.shape[1]
    return cos[:T].to(dtype).contiguous(), sin[:T].to(dtype).contiguous()


@torch.library.custom_op("torchext::qk_norm_rope", mutates_args=())
def _qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, s_qk: Tensor,
                  eps: float) -> tuple[Tensor, Tensor]:
    _check_qk_norm_rope(q, k, cos, sin, s_qk, eps)
    cos, sin = _rope_tables(cos, sin, q)
    if q.numel() == 0 or k.numel() == 0 or not use_triton(q):
        q_out, k_out = ref.qk_norm_rope(q, k, cos, sin, s_qk, eps)
        return q_out.contiguous(), k_out.contiguous()
    return kernels.qk_norm_rope_fwd(q, k, cos, sin, s_qk.contiguous(), eps)


@_qk_norm_rope.register_fake
def _(q, k, cos, sin, s_qk, eps):
    _check_qk_norm_rope(q, k, cos, sin, s_qk, eps)
    B, T, H, D = q.shape
    return q.new_empty((B, H, T, D)), k.new_empty((B, k.shape[2], T, D))


@torch.library.custom_op("torchext::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward(grad_q: Tensor, grad_k: Tensor, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor,
                           s_qk: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    grad_q, grad_k = grad_q.contiguous(), grad_k.contiguous()
    cos, sin = _rope_tables(cos, sin, q)
    if q.numel() == 0 or k.numel() == 0 or not use_triton(q):
        return ref.qk_norm_rope_backward(grad_q, grad_k, q, k, cos, sin, s_qk, eps)
    return kernels.qk_norm_rope_bwd(grad_q, grad_k, q, k, cos, sin, s_qk.contiguous(), eps)


@_qk_norm_rope_backward.register_fake
def _(grad_q, grad_k, q, k, cos, sin, s_qk, eps):
    return q.new_empty(q.shape), k.new_empty(k.shape), s_qk.new_empty(s_qk.shape)


def _qk_norm_rope_setup(ctx, inputs, output):
    q, k, cos, sin, s_qk, ctx.eps = inputs
    ctx.save_for_backward(q, k, cos, sin, s_qk)


def _qk_norm_rope_grad(ctx, grad_q, grad_k):
    q, k, cos, sin, s_qk = ctx.saved_tensors
    dq, dk, ds_qk = torch.ops.torchext.qk_norm_rope_backward(grad_q, grad_k, q, k, cos, sin, s_qk, ctx.eps)
    return dq, dk, None, None, ds_qk, None


_qk_norm_rope.register_autograd(_qk_norm_rope_grad, setup_context=_qk_norm_rope_setup)


def qk_norm_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, s_qk: Tensor,
                 eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """nGPT's query/key path in one launch: RoPE, then Norm over head_dim, then * s_qk, for q and k.

    q.k of the outputs is s_qk^2 * cos(angle), so attention should use softmax scale sqrt(D) (section 2.3.2).

    Args:
        q: [B, T, H, D] float32/bfloat16/float16 (e.g. a view of a fused QKV projection; unit stride on D).
        k: [B, T, Hk, D], same dtype family; Hk may differ from H (GQA/MQA) when s_qk is one shared row.
        cos, sin: [>= T, D/2] RoPE tables for positions 0..T-1 (see ``rope_cos_sin``); no gradient.
        s_qk: [D] or [H, D] scale applied to both q and k.
        eps: lower bound on the norms (finite, >= torch.finfo(torch.float32).tiny).

    Returns:
        (q, k) in the attention layout [B, H, T, D] and [B, Hk, T, D], contiguous, dtypes of q and k.
    """
    check_tensors("qk_norm_rope", q=q, k=k, cos=cos, sin=sin, s_qk=s_qk)
    _check_eps("qk_norm_rope", eps)
    return torch.ops.torchext.qk_norm_rope(q, k, cos, sin, s_qk, eps)


# ---- scaled_swiglu ------------------------------------------------------------------------------------------------


def _check_scaled_swiglu(u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor, d_model: int) -> None:
    op = "scaled_swiglu"
    for name, x in (("u", u), ("v", v), ("s_u", s_u), ("s_v", s_v)):
        check_tensor(op, name, x)
    check_shape(op, "v", v, u.shape)
    check_shape(op, "s_u", s_u, u.shape[-1:])
    check_shape(op, "s_v", s_v, u.shape[-1:])
    check_same_device(op, u=u, v=v, s_u=s_u, s_v=s_v)
    check_unit_last_stride(op, "u", u)
    check_unit_last_stride(op, "v", v)
    if d_model < 1:
        raise ValueError(f"{op}: d_model must be >= 1, got {d_model}")


@torch.library.custom_op("torchext::scaled_swiglu", mutates_args=())
def _scaled_swiglu(u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor, d_model: int) -> Tensor:
    _check_scaled_swiglu(u, v, s_u, s_v, d_model)
    if u.numel() == 0 or not use_triton(u):
        return ref.scaled_swiglu(u, v, s_u, s_v, d_model).contiguous()
    out = kernels.scaled_swiglu_fwd(as_rows("scaled_swiglu", "u", u), as_rows("scaled_swiglu", "v", v),
                                    s_u.contiguous(), s_v.contiguous(), d_model)
    return out.view(u.shape)


@_scaled_swiglu.register_fake
def _(u, v, s_u, s_v, d_model):
    _check_scaled_swiglu(u, v, s_u, s_v, d_model)
    return u.new_empty(u.shape)


@torch.library.custom_op("torchext::scaled_swiglu_backward", mutates_args=())
def _scaled_swiglu_backward(grad_out: Tensor, u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor,
                            d_model: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_out = grad_out.contiguous()
    if u.numel() == 0 or not use_triton(u):
        return ref.scaled_swiglu_backward(grad_out, u, v, s_u, s_v, d_model)
    op = "scaled_swiglu_backward"
    u_rows, v_rows = as_rows(op, "u", u), as_rows(op, "v", v)
    du, dv, ds_u, ds_v = kernels.scaled_swiglu_bwd(grad_out.view(u_rows.shape), u_rows, v_rows,
                                                   s_u.contiguous(), s_v.contiguous(), d_model)
    return du.view(u.shape), dv.view(u.shape), ds_u, ds_v


@_scaled_swiglu_backward.register_fake
def _(grad_out, u, v, s_u, s_v, d_model):
    return u.new_empty(u.shape), v.new_empty(u.shape), s_u.new_empty(s_u.shape), s_v.new_empty(s_v.shape)


def _scaled_swiglu_setup(ctx, inputs, output):
    u, v, s_u, s_v, ctx.d_model = inputs
    ctx.save_for_backward(u, v, s_u, s_v)


def _scaled_swiglu_grad(ctx, grad_out):
    return *torch.ops.torchext.scaled_swiglu_backward(grad_out, *ctx.saved_tensors, ctx.d_model), None


_scaled_swiglu.register_autograd(_scaled_swiglu_grad, setup_context=_scaled_swiglu_setup)


def scaled_swiglu(u: Tensor, v: Tensor, s_u: Tensor, s_v: Tensor, d_model: int) -> Tensor:
    """nGPT's gated MLP activation: (u * s_u) * SiLU(v * s_v * sqrt(d_model)) (section 2.4).

    The sqrt(d_model) factor moves the cosine-valued v into SiLU's non-linear range (appendix A.1).

    Args:
        u, v: [..., d_mlp] float32/bfloat16/float16 (e.g. the two halves of one fused projection).
        s_u, s_v: [d_mlp] scaling factors (gradients are reduced over all rows).
        d_model: the model width whose square root scales v.

    Returns:
        A tensor of u's shape and dtype.
    """
    check_tensors("scaled_swiglu", u=u, v=v, s_u=s_u, s_v=s_v)
    check_int("scaled_swiglu", "d_model", d_model, minimum=1)
    return torch.ops.torchext.scaled_swiglu(u, v, s_u, s_v, d_model)


# ---- renormalize_ -------------------------------------------------------------------------------------------------


def _check_renormalize(tensors: list[Tensor], dims: list[int], eps: float) -> None:
    op = "renormalize_"
    if len(tensors) != len(dims):
        raise ValueError(f"{op}: got {len(tensors)} tensors but {len(dims)} dims")
    for i, (t, dim) in enumerate(zip(tensors, dims)):
        check_tensor(op, f"tensors[{i}]", t)
        if not t.is_contiguous():
            raise ValueError(f"{op}: tensors[{i}] must be contiguous (it is updated in place)")
        if not -t.dim() <= dim < t.dim():
            raise ValueError(f"{op}: dims[{i}] = {dim} is out of range for a {t.dim()}-D tensor")
    check_same_device(op, **{f"tensors[{i}]": t for i, t in enumerate(tensors)})
    _check_eps(op, eps)


# The block table of each tensor list, pinned on the host and copied to the device once: an optimizer step then
# launches with no host-to-device copy, and a CUDA graph that captured the copy replays it from a host buffer that
# stays alive (a per-call pinned buffer would be freed and reused after capture). Keyed by what the table holds.
_RENORMALIZE_TABLES: dict[tuple, tuple[Tensor, Tensor]] = {}


def _renormalize_table(tensors: list[Tensor], dims: list[int]) -> tuple[Tensor, int]:
    """([tensors, 6] int64 on the tensors' device, number of blocks) for the CUDA C++ multi-tensor kernel.

    Each tensor is seen as [outer, n, inner] and normalised along n. A thread block takes one vector
    when inner == 1 (a contiguous row) or one tile of columns otherwise; the table tells every block
    which tensor and which piece it owns.
    """
    table, first_block = [], 0
    for t, dim in zip(tensors, dims):
        dim %= t.dim()
        outer, n, inner = math.prod(t.shape[:dim]), t.shape[dim], math.prod(t.shape[dim + 1:])
        table.append((t.data_ptr(), outer, n, inner, cuda_dtype_code(t.dtype), first_block))
        first_block += outer if inner == 1 else outer * -(-inner // CUDA_EXT.RENORMALIZE_COLUMNS_PER_BLOCK)
    key = (tensors[0].device, *map(tuple, table))
    if key not in _RENORMALIZE_TABLES:
        host = torch.tensor(table, dtype=torch.int64).pin_memory()
        _RENORMALIZE_TABLES[key] = host, host.to(tensors[0].device, non_blocking=True)
    return _RENORMALIZE_TABLES[key][1], first_block


def _renormalize_cuda(tensors: list[Tensor], dims: list[int], eps: float) -> Tensor:
    """One launch of the CUDA C++ multi-tensor kernel (csrc/ngpt/renormalize.cu)."""
    device = tensors[0].device
    table, num_blocks = _renormalize_table(tensors, dims)
    zero_counts = torch.zeros(len(tensors), dtype=torch.int32, device=device)
    CUDA_EXT.renormalize(table.data_ptr(), len(tensors), num_blocks, zero_counts.data_ptr(), eps,
                         torch.cuda.current_stream(device).cuda_stream)
    return zero_counts


@torch.library.custom_op("torchext::renormalize_", mutates_args=("tensors",))
def _renormalize(tensors: list[Tensor], dims: list[int], eps: float) -> Tensor:
    _check_renormalize(tensors, dims, eps)
    # The CUDA kernel handles 16- and 32-bit floats; fp64 (tests, gradcheck set-ups) takes the reference.
    if tensors and use_cuda_ext(tensors[0]) and all(t.dtype != torch.float64 for t in tensors):
        return _renormalize_cuda(tensors, dims, eps)
    return ref.renormalize_(tensors, dims, eps)


@_renormalize.register_fake
def _(tensors, dims, eps):
    _check_renormalize(tensors, dims, eps)
    return torch.empty(len(tensors), dtype=torch.int32, device=tensors[0].device if tensors else "cpu")


def _all_reduce_over(mesh, mesh_dims: tuple[int, ...]):
    """buffer -> its sum over the ranks that differ only in ``mesh_dims`` of ``mesh`` (one all_reduce per mesh dim:
    one for FSDP2's 1-D mesh), in place."""
    def reduce(buffer: Tensor) -> Tensor:
        for mesh_dim in mesh_dims:
            torch.distributed.all_reduce(buffer, group=mesh.get_group(mesh_dim))
        return buffer
    return reduce


@torch.no_grad()
def _renormalize_dtensors(tensors: list[Tensor], dims: list[int], eps: float) -> Tensor:
    """renormalize_ for DTensors: vectors whole on each rank (rows under FSDP2's dim-0 sharding) in one launch of the
    op on the local tensors; vectors split across ranks (columns under FSDP2) by ``renormalize_parts_``, with one
    collective for all the tensors split over the same mesh dims. Returns the local counts (see renormalize_)."""
    if len(tensors) != len(dims):
        raise ValueError(f"renormalize_: got {len(tensors)} tensors but {len(dims)} dims")
    whole, split = [], {}
    for i, (t, dim) in enumerate(zip(tensors, dims)):
        if not isinstance(t, DTensor):
            raise TypeError(f"renormalize_: tensors[{i}] is a {type(t).__name__} but tensors[0] is a DTensor: pass "
                            f"all DTensors (the parameters of one fully_shard / parallelize_module model) or none")
        if not -t.dim() <= dim < t.dim():
            raise ValueError(f"renormalize_: dims[{i}] = {dim} is out of range for a {t.dim()}-D tensor")
        check_not_partial("renormalize_", f"tensors[{i}]", t)
        mesh_dims = mesh_dims_splitting(t, dim)
        if mesh_dims:
            split.setdefault((t.device_mesh, mesh_dims), []).append(i)
        else:
            whole.append(i)
    zero_counts = torch.zeros(len(tensors), dtype=torch.int32, device=tensors[0].to_local().device)
    if whole:
        zero_counts[whole] = torch.ops.torchext.renormalize_([tensors[i].to_local() for i in whole],
                                                             [dims[i] for i in whole], eps)
    for (mesh, mesh_dims), members in split.items():
        parts = [tensors[i].to_local() for i in members]
        zero_counts[members] = ref.renormalize_parts_(parts, [dims[i] for i in members],
                                                      _all_reduce_over(mesh, mesh_dims), eps)
    return zero_counts


def renormalize_(tensors: list[Tensor], dims: list[int], eps: float = DEFAULT_EPS, check: bool = False) -> Tensor:
    """In place, in one launch: tensors[i] <- tensors[i] / ||tensors[i]|| along dims[i] (fp32 math).

    The retraction nGPT runs after every optimizer step (section 2.1). On CUDA one multi-tensor CUDA C++
    launch covers every matrix; elsewhere it runs the reference. Nothing is read back to the host by default,
    so an optimizer step that calls it can be captured in a CUDA graph.

    DTensors (the parameters of a model under FSDP2's ``fully_shard`` or tensor parallelism) are normalised as the
    whole tensors they stand for: vectors that lie whole on each rank (rows of a weight sharded on dim 0) in one
    launch on the local shards, vectors split across ranks (columns of a weight sharded on dim 0) from squared norms
    summed by one all_reduce for all such tensors together. Pass all DTensors or no DTensor. Plain tensors (DDP,
    one device) take the one-launch path unchanged.

    Args:
        tensors: a list of contiguous float32/bfloat16/float16/float64 tensors on one device (TypeError for a
            single tensor), or a list of DTensors.
        dims: a list of ints, the axis to normalise in each tensor (e.g. 1 for rows of an [out, in] weight, 0 for
            columns).
        eps: lower bound on the norms (finite, >= torch.finfo(torch.float32).tiny).
        check: raise ValueError if any vector has norm zero (one host sync: a debug mode).

    Returns:
        int32 [len(tensors)] on the tensors' device: the zero vectors of each tensor. A zero vector has no
        direction and stays zero; a vector holding a NaN becomes NaN; norms cannot overflow or underflow.
        torchext.nn.renormalize_after_step sums these counts on the device for a later ``check()``. For DTensors,
        the counts of this rank's vectors (a split vector is counted by every rank holding part of it).
    """
    check_tensor_list("renormalize_", "tensors", tensors)
    check_ints("renormalize_", "dims", dims)
    _check_eps("renormalize_", eps)
    if tensors and isinstance(tensors[0], DTensor):
        zero_counts = _renormalize_dtensors(list(tensors), list(dims), eps)
    else:
        zero_counts = torch.ops.torchext.renormalize_(list(tensors), list(dims), eps)
    if check and bool(zero_counts.any()):
        bad = {i: int(c) for i, c in enumerate(zero_counts.tolist()) if c}
        raise ValueError(f"renormalize_: zero vectors (norm 0) in tensors {bad} (index: count); nGPT needs every "
                         f"row/column to have a direction (was a weight zero-initialised?)")
    return zero_counts
