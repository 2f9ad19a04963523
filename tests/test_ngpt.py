"""nGPT family: every op against its reference (forward, gradients), gradcheck, opcheck, compile, bad
inputs; the modules; and the paper's invariants (unit norms after every step, a true RoPE)."""

import functools
import math

import pytest
import torch
from harness import (DEVICE, TOLERANCES, check_against_reference, check_compile, check_gradcheck, check_opcheck,
                     check_raises, given, settings, st)

import torchext
from torchext import ops
from torchext.nn import NGPT, NGPTConfig, NormalizedAttention, NormalizedLinear, renormalize_after_step
from torchext.reference import ngpt as ref
from torchext.triton_kernels._launch import MAX_ROW_ELEMENTS

DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, device="cpu", grad=True):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def unit(*shape, dtype=torch.float32, device="cpu"):
    return ref.l2_normalize(torch.randn(*shape, device=device)).to(dtype).requires_grad_()


# ---- l2_normalize ---------------------------------------------------------------------------------------------
# Shapes: a single element, a non-power-of-two row, rows just past a block (65 > 64), a 3-D batch.
L2_SHAPES = [(1, 1), (3, 37), (65, 64), (2, 5, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", L2_SHAPES, ids=str)
def test_l2_normalize_matches_reference(shape, dtype, device):
    x = randn(*shape, dtype=dtype, device=device)
    check_against_reference(ops.l2_normalize, ref.l2_normalize, [x])


def test_l2_normalize_other_dim(device):
    x = randn(6, 5, 7, device=device)
    check_against_reference(functools.partial(ops.l2_normalize, dim=1), functools.partial(ref.l2_normalize, dim=1),
                            [x])


def test_l2_normalize_zero_rows_give_zero_not_nan(device):
    x = torch.zeros(4, 16, device=device, requires_grad=True)
    y = ops.l2_normalize(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and x.grad.isfinite().all()


def test_l2_normalize_empty(device):
    assert ops.l2_normalize(torch.empty(0, 8, device=device)).shape == (0, 8)


def test_l2_normalize_gradcheck_opcheck_compile(device):
    x = randn(3, 10, device=device)
    check_gradcheck(ops.l2_normalize, [x])
    check_opcheck(torch.ops.torchext.l2_normalize.default, (x, 1e-6))
    check_opcheck(torch.ops.torchext.l2_normalize_backward.default, (torch.randn_like(x), x.detach(), 1e-6))
    check_compile(ops.l2_normalize, [x])


# ---- hypersphere_update ---------------------------------------------------------------------------------------
HS_SHAPES = [(1, 1), (7, 48), (65, 37), (2, 3, 65)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", HS_SHAPES, ids=str)
def test_hypersphere_update_matches_reference(shape, dtype, device):
    h, b = unit(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device)
    alpha = randn(shape[-1], device=device) * 0.1  # signed: the forward uses |alpha|
    alpha = alpha.detach().requires_grad_()
    check_against_reference(ops.hypersphere_update, ref.hypersphere_update, [h, b, alpha], reduced=[2],
                            rows=math.prod(shape[:-1]))


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 70), cols=st.integers(1, 130), bf16=st.booleans())
def test_hypersphere_update_any_shape(rows, cols, bf16):
    """Random shapes: masking must hold at every row/column remainder, not just the ones picked above."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    h, b = unit(rows, cols, dtype=dtype, device=DEVICE), randn(rows, cols, dtype=dtype, device=DEVICE)
    alpha = (torch.randn(cols, device=DEVICE) * 0.1).requires_grad_()
    check_against_reference(ops.hypersphere_update, ref.hypersphere_update, [h, b, alpha], reduced=[2], rows=rows)


def test_hypersphere_update_mixed_dtypes_and_strided_branch(device):
    """h in fp32, the branch a bf16 half of a wider tensor (a slice of a fused projection)."""
    h = unit(5, 24, device=device)
    b = randn(5, 48, dtype=torch.bfloat16, device=device)[:, :24]
    alpha = (torch.rand(24, device=device) * 0.2).requires_grad_()
    check_against_reference(ops.hypersphere_update, ref.hypersphere_update, [h, b, alpha], reduced=[2], rows=5)


def test_hypersphere_update_result_is_unit_norm(device):
    out = ops.hypersphere_update(unit(9, 40, device=device), randn(9, 40, device=device), torch.rand(40) * 0.3)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(9, device=device))


def test_hypersphere_update_gradcheck_opcheck_compile(device):
    h, b, alpha = unit(4, 12, device=device), randn(4, 12, device=device), randn(12, device=device)
    check_gradcheck(ops.hypersphere_update, [h, b, alpha])
    args = (h.detach(), b.detach(), alpha.detach(), 1e-6)
    check_opcheck(torch.ops.torchext.hypersphere_update.default, args)
    check_opcheck(torch.ops.torchext.hypersphere_update_backward.default, (torch.randn_like(h),) + args)
    check_compile(ops.hypersphere_update, [h, b, alpha])


# ---- rows past the register-resident limit: the split-row kernels (one program per row, streamed chunks) -----
LONG_ROW = MAX_ROW_ELEMENTS + 3  # a ragged last chunk


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_rows_match_reference(dtype, device):
    x = randn(2, LONG_ROW, dtype=dtype, device=device)
    check_against_reference(ops.l2_normalize, ref.l2_normalize, [x])
    h, b = unit(3, LONG_ROW, dtype=dtype, device=device), randn(3, LONG_ROW, dtype=dtype, device=device)
    alpha = (randn(LONG_ROW, device=device) * 0.1).detach().requires_grad_()
    check_against_reference(ops.hypersphere_update, ref.hypersphere_update, [h, b, alpha], reduced=[2], rows=3)


def test_long_zero_rows_give_zero_not_nan(device):
    x = torch.zeros(2, LONG_ROW, device=device, requires_grad=True)
    y = ops.l2_normalize(x)
    (y * torch.randn_like(y)).sum().backward()
    assert torch.equal(y, torch.zeros_like(y)) and x.grad.isfinite().all()


# ---- NaN and extreme magnitudes: a NaN in a row gives a NaN row (the reference's answer, on every path); rows of
# 1e30 normalise to unit rows (a plain sum of squares overflows to inf and gave 0) -------------------------------


def extreme_rows(cols, dtype, device):
    """Rows: normal, one NaN element, every element ~1e30, normal."""
    x = torch.randn(4, cols, device=device)
    x[1, cols // 2] = float("nan")
    x[2] *= 1e30
    return x.to(dtype)


def check_extreme(out, expected, dtype, scale=1.0):
    """out [4, cols] of extreme_rows against the reference; row 2 is a unit row once divided by `scale`."""
    torch.testing.assert_close(out, expected, equal_nan=True, **TOLERANCES[dtype])
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()
    torch.testing.assert_close((out[2].float() / scale).norm(), torch.tensor(1.0, device=out.device), atol=1e-2,
                               rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [37, LONG_ROW], ids=["rows", "split_rows"])
def test_nan_rows_stay_nan_and_huge_rows_are_unit(cols, dtype, device):
    x = extreme_rows(cols, dtype, device).requires_grad_()
    check_extreme(ops.l2_normalize(x), ref.l2_normalize(x), dtype)
    branch = torch.randn(4, cols, device=device).to(dtype)
    alpha = torch.full((cols,), 0.05, device=device)
    check_extreme(ops.hypersphere_update(x, branch, alpha), ref.hypersphere_update(x, branch, alpha), dtype)
    grad = torch.autograd.grad(ops.l2_normalize(x).float().sum(), x)[0]
    assert grad[1].isnan().all() and grad[[0, 2, 3]].isfinite().all()


def overflowing_rows(rows, cols, dtype, device):
    """Entries of +-2e38: ||x|| = 2e38 sqrt(cols) is past fp32's range, x / ||x|| is not (and RoPE's rotation of a
    pair stays below 3.4e38)."""
    return (torch.randn(rows, cols, device=device).sign() * 2e38).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cols", [37, LONG_ROW], ids=["rows", "split_rows"])
def test_rows_whose_norm_overflows_are_unit(cols, dtype, device):
    """The norm itself is never formed: y = (x / s) / max(||x / s||, eps / s), s = max|x| (these rows gave 0)."""
    x = overflowing_rows(3, cols, dtype, device).requires_grad_()
    y = ops.l2_normalize(x)
    torch.testing.assert_close(y, ref.l2_normalize(x), **TOLERANCES[dtype])
    torch.testing.assert_close(y.float().norm(dim=1), torch.ones(3, device=device), atol=1e-2, rtol=0)
    grad = torch.autograd.grad((y.float() * torch.randn(3, cols, device=device)).sum(), x)[0]
    assert grad.isfinite().all()  # ~1e-39: the norm's reciprocal
    h, alpha = unit(3, cols, dtype=dtype, device=device).detach(), torch.full((cols,), 0.05, device=device)
    out = ops.hypersphere_update(h, x.detach(), alpha)  # a branch output that overflows its norm
    torch.testing.assert_close(out, ref.hypersphere_update(h, x.detach(), alpha), **TOLERANCES[dtype])
    weight = x.detach().clone()
    ops.renormalize_([weight], [1])
    torch.testing.assert_close(weight, y.detach(), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_nan_and_huge_rows(dtype, device):
    q, k, cos, sin, s_qk = qk_inputs(1, 4, 1, 1, 16, False, dtype=dtype, device=device)
    q, k = q.detach().clone(), k.detach()
    q[0, 1, 0, 3], q[0, 2] = float("nan"), q[0, 2] * 1e30
    q_out, _ = ops.qk_norm_rope(q, k, cos[:4], sin[:4], s_qk)
    expected, _ = ref.qk_norm_rope(q, k, cos[:4], sin[:4], s_qk)
    check_extreme(q_out[0, 0], expected[0, 0], dtype, s_qk.detach())  # [T, D]: tokens 0-3 of the one head
    q[0, 3] = overflowing_rows(1, 16, dtype, device)[0]
    q_out, _ = ops.qk_norm_rope(q, k, cos[:4], sin[:4], s_qk)
    expected, _ = ref.qk_norm_rope(q, k, cos[:4], sin[:4], s_qk)
    torch.testing.assert_close(q_out[0, 0, 3], expected[0, 0, 3], **TOLERANCES[dtype])
    torch.testing.assert_close((q_out[0, 0, 3].float() / s_qk.detach()).norm(), torch.tensor(1.0, device=device),
                               atol=1e-2, rtol=0)


# ---- qk_norm_rope ---------------------------------------------------------------------------------------------
# (B, T, H, Hk, D, per-head s_qk): MHA with per-head scales, GQA with a shared row, one position, D past a block.
QK_CASES = [(2, 9, 3, 3, 16, True), (1, 1, 1, 1, 2, True), (2, 5, 4, 2, 8, False), (1, 4, 2, 1, 66, False)]


def qk_inputs(B, T, H, Hk, D, per_head, dtype=torch.float32, device="cpu"):
    cos, sin = ref.rope_cos_sin(T + 3, D, device=device)  # longer tables than T: the op uses the first T rows
    s_qk = (torch.rand((H, D) if per_head else (D,), device=device) + 0.5).requires_grad_()
    return randn(B, T, H, D, dtype=dtype, device=device), randn(B, T, Hk, D, dtype=dtype, device=device), cos, sin, s_qk


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", QK_CASES, ids=str)
def test_qk_norm_rope_matches_reference(case, dtype, device):
    q, k, cos, sin, s_qk = qk_inputs(*case, dtype=dtype, device=device)
    T = case[1]
    reference = lambda q, k, cos, sin, s: ref.qk_norm_rope(q, k, cos[:T], sin[:T], s)  # noqa: E731
    check_against_reference(ops.qk_norm_rope, reference, [q, k, cos, sin, s_qk], reduced=[4],
                            rows=2 * case[0] * T * case[2])


def test_qk_norm_rope_reads_a_fused_qkv_view(device):
    B, T, H, D = 2, 6, 2, 8
    qkv = randn(B, T, 3, H, D, device=device)
    q, k, _ = qkv.unbind(2)
    cos, sin = ref.rope_cos_sin(T, D, device=device)
    s_qk = torch.rand(H, D, device=device).requires_grad_()
    check_against_reference(ops.qk_norm_rope, ref.qk_norm_rope, [q, k, cos, sin, s_qk], reduced=[4], rows=2 * B * T)


def test_qk_norm_rope_gradcheck_opcheck_compile(device):
    q, k, cos, sin, s_qk = qk_inputs(1, 5, 2, 2, 8, True, device=device)
    check_gradcheck(lambda q, k, s: ops.qk_norm_rope(q, k, cos.double(), sin.double(), s), [q, k, s_qk])
    args = (q.detach(), k.detach(), cos, sin, s_qk.detach(), 1e-6)
    check_opcheck(torch.ops.torchext.qk_norm_rope.default, args)
    grads = (torch.randn(1, 2, 5, 8, device=device), torch.randn(1, 2, 5, 8, device=device))
    check_opcheck(torch.ops.torchext.qk_norm_rope_backward.default, grads + args)
    check_compile(lambda q, k, s: ops.qk_norm_rope(q, k, cos, sin, s), [q, k, s_qk])


def test_rope_is_a_rotation_that_depends_only_on_the_offset():
    """The official nGPT RoPE is not (NVIDIA/ngpt#10): norms must be kept and q.k must be shift-invariant."""
    T, D = 12, 16
    cos, sin = ref.rope_cos_sin(2 * T, D)
    x = torch.randn(1, T, 1, D).expand(1, T, 1, D).contiguous()
    x[:] = x[:, :1]  # the same vector at every position
    rotated = ref.apply_rope(x, cos[:T], sin[:T])[0, :, 0]
    torch.testing.assert_close(rotated.norm(dim=-1), x[0, :, 0].norm(dim=-1))
    dots = rotated @ rotated.T  # [T, T]: depends on i - j only
    for offset in range(T):
        diagonal = torch.diagonal(dots, offset)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), atol=1e-5, rtol=1e-5)


# ---- scaled_swiglu --------------------------------------------------------------------------------------------
SWIGLU_SHAPES = [(1, 1), (6, 40), (65, 33), (2, 3, 17)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SWIGLU_SHAPES, ids=str)
def test_scaled_swiglu_matches_reference(shape, dtype, device):
    u, v = randn(*shape, dtype=dtype, device=device), randn(*shape, dtype=dtype, device=device) * 0.2
    v = v.detach().requires_grad_()
    s_u = (torch.rand(shape[-1], device=device) + 0.5).requires_grad_()
    s_v = (torch.rand(shape[-1], device=device) + 0.5).requires_grad_()
    check_against_reference(functools.partial(ops.scaled_swiglu, d_model=16),
                            functools.partial(ref.scaled_swiglu, d_model=16), [u, v, s_u, s_v], reduced=[2, 3],
                            rows=math.prod(shape[:-1]))


def test_scaled_swiglu_reads_halves_of_a_fused_projection(device):
    u, v = randn(4, 5, 2 * 24, device=device).chunk(2, dim=-1)
    s = torch.rand(24, device=device).requires_grad_()
    check_against_reference(functools.partial(ops.scaled_swiglu, d_model=9),
                            functools.partial(ref.scaled_swiglu, d_model=9), [u, v, s, s], reduced=[2, 3], rows=20)


def test_scaled_swiglu_gradcheck_opcheck_compile(device):
    u, v, s_u, s_v = randn(3, 6, device=device), randn(3, 6, device=device), randn(6, device=device), \
        randn(6, device=device)
    fn = functools.partial(ops.scaled_swiglu, d_model=4)
    check_gradcheck(fn, [u, v, s_u, s_v])
    args = (u.detach(), v.detach(), s_u.detach(), s_v.detach(), 4)
    check_opcheck(torch.ops.torchext.scaled_swiglu.default, args)
    check_opcheck(torch.ops.torchext.scaled_swiglu_backward.default, (torch.randn_like(u),) + args)
    check_compile(fn, [u, v, s_u, s_v])


# ---- renormalize_ ---------------------------------------------------------------------------------------------


def renorm_tensors(device):
    """The shapes of an nGPT layer: row-normalised projections and column-normalised out-projections."""
    specs = [((24, 8), 1, torch.float32), ((8, 33), 0, torch.float32), ((40, 8), 1, torch.bfloat16),
             ((8, 8), 0, torch.float16), ((0, 8), 1, torch.float32), ((3, 4, 5), 1, torch.float32)]
    return [torch.randn(*shape, device=device).to(dtype) for shape, _, dtype in specs], [d for _, d, _ in specs]


# The op, and the path of vectors split across ranks (DTensor shards) with one part, the whole vector: the reduction
# that sums the parts' squared norms (an all_reduce, tests/distributed_checks.py) is then the identity.
RENORMALIZE_PATHS = {"op": ops.renormalize_,
                     "parts": lambda tensors, dims: ref.renormalize_parts_(tensors, dims, lambda squares: squares)}


@pytest.mark.parametrize("path", RENORMALIZE_PATHS)
def test_renormalize_matches_reference(device, path):
    tensors, dims = renorm_tensors(device)
    expected = [t.clone() for t in tensors]
    RENORMALIZE_PATHS[path](tensors, dims)
    ref.renormalize_(expected, dims)
    for i, (t, e, dim) in enumerate(zip(tensors, expected, dims)):
        torch.testing.assert_close(t, e, msg=lambda m, i=i: f"tensor {i}: {m}")
        if t.numel():
            torch.testing.assert_close(t.float().norm(dim=dim), torch.ones(()).expand(t.float().norm(dim=dim).shape),
                                       atol=1e-2 if t.dtype != torch.float32 else 1e-5, rtol=0)


def test_renormalize_counts_zero_rows_and_raises_only_when_asked(device):
    w = torch.randn(4, 6, device=device)
    w[2] = 0
    counts = ops.renormalize_([torch.randn(3, 3, device=device), w], [1, 1])
    assert counts.device == w.device and counts.tolist() == [0, 1]
    assert (w[2] == 0).all() and not w.isnan().any()
    check_raises(lambda: ops.renormalize_([torch.randn(3, 3, device=device), w], [1, 1], check=True), ValueError,
                 "zero vectors (norm 0) in tensors {1: 1}")


@pytest.mark.parametrize("path", RENORMALIZE_PATHS)
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_renormalize_nan_huge_and_tiny_vectors(device, dim, dtype, path):
    """A NaN vector becomes NaN (not 1/eps times the rest), a vector of 1e30 a unit vector (its sum of squares
    overflows fp32; the parts path sums fp64 squares), and one of 1e-30 x / eps (its norm, computed without flushing
    to zero, is below eps)."""
    vectors = torch.randn(5, 6, device=device)  # [vector, element]
    vectors[0], vectors[1], vectors[2, 1] = 1e30, 1e-30, float("nan")
    w = (vectors if dim == 1 else vectors.t()).to(dtype).contiguous()
    counts = RENORMALIZE_PATHS[path]([w], [dim])
    norms = w.double().norm(dim=dim)
    assert counts.tolist() == [0] and (w if dim == 1 else w.t())[2].isnan().all()
    unit = torch.cat((norms[:1], norms[3:]))
    torch.testing.assert_close(unit, torch.ones_like(unit), atol=1e-2, rtol=0)
    torch.testing.assert_close(norms[1], torch.tensor(6 ** 0.5 * 1e-30 / ref.DEFAULT_EPS, device=device).double(),
                               rtol=1e-2, atol=0)


def test_renormalize_opcheck_compile(device):
    tensors, dims = renorm_tensors(device)
    check_opcheck(torch.ops.torchext.renormalize_.default, ([t for t in tensors], dims, 1e-6))
    compiled = torch.compile(lambda ts: torch.ops.torchext.renormalize_(ts, dims, 1e-6), fullgraph=True)
    expected = [t.clone() for t in tensors]
    compiled(tensors)
    ref.renormalize_(expected, dims)
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e)


@pytest.mark.gpu
def test_renormalize_cuda_kernel_matches_reference():
    """The CUDA C++ multi-tensor kernel (csrc/ngpt/renormalize.cu), at sizes that need many blocks."""
    assert torchext._backend.CUDA_EXT is not None, "torchext._C was not built"
    specs = [((50304, 1024), 1, torch.float32), ((1024, 4096), 0, torch.bfloat16), ((8192, 1024), 1, torch.float16),
             ((1024, 1000), 0, torch.float32), ((0, 64), 1, torch.float32), ((7, 3, 33), 1, torch.bfloat16)]
    tensors = [torch.randn(*shape, device="cuda").to(dtype) for shape, _, dtype in specs]
    dims = [d for _, d, _ in specs]
    tensors[0][5] = 0
    tensors[1][:, 7] = 0
    # Vectors that overflow or flush a plain sum of squares (the scaled pass), whose norm itself overflows (2e38),
    # and NaN ones, rows and columns.
    tensors[0][6], tensors[0][7], tensors[0][8, 3], tensors[0][9] = 1e30, 1e-30, float("nan"), 2e38
    tensors[3][:, 6], tensors[3][:, 7], tensors[3][3, 8], tensors[3][:, 9] = 1e30, 1e-30, float("nan"), -2e38
    expected = [t.clone() for t in tensors]
    counts = torch.ops.torchext.renormalize_(tensors, dims, 1e-6)
    ref_counts = ref.renormalize_(expected, dims)
    assert counts.tolist() == ref_counts.tolist() == [1, 1, 0, 0, 0, 0]
    for t, e in zip(tensors, expected):
        torch.testing.assert_close(t, e, atol=1e-2 if t.dtype != torch.float32 else 1e-6, rtol=1e-2, equal_nan=True)


# ---- bad inputs: a clear error naming the argument, never a crash or a silent wrong answer ----------------------


def bad_input_cases():
    x = torch.randn(4, 8)
    cos, sin = ref.rope_cos_sin(3, 8)
    q = torch.randn(1, 3, 2, 8)
    return [
        (lambda: ops.l2_normalize(x.to(torch.int32)), TypeError, "l2_normalize: x must have dtype in"),
        (lambda: ops.l2_normalize(x.t()), ValueError, "l2_normalize: x must have unit stride in its last dim"),
        (lambda: ops.l2_normalize(x, eps=0.0), ValueError, "l2_normalize: eps must be >= 1.175e-38"),
        (lambda: ops.l2_normalize(x, dim=5), ValueError,
         "l2_normalize: dim must be in [-2, 1] for a 2-D tensor, got 5"),
        (lambda: ops.l2_normalize(x, dim=1.0), TypeError, "l2_normalize: dim must be an int, got float 1.0"),
        (lambda: ops.l2_normalize([1.0, 2.0]), TypeError, "l2_normalize: x must be a torch.Tensor, got list"),
        (lambda: ops.hypersphere_update(x, x[:3], torch.ones(8)), ValueError,
         "hypersphere_update: h_branch must have shape (4, 8), got (3, 8)"),
        (lambda: ops.hypersphere_update(x, x, torch.ones(7)), ValueError,
         "hypersphere_update: alpha must have shape (8,), got (7,)"),
        (lambda: ops.hypersphere_update(x, x, torch.ones(8, device="meta")), ValueError,
         "hypersphere_update: all tensors must be on one device"),
        (lambda: ops.hypersphere_update(x, x.t().contiguous().t(), torch.ones(8)), ValueError,
         "hypersphere_update: h_branch must have unit stride"),
        (lambda: ops.qk_norm_rope(q[..., :7], q[..., :7], cos, sin, torch.ones(7)), ValueError,
         "head_dim must be even"),
        (lambda: ops.qk_norm_rope(q, q, cos[:2], sin[:2], torch.ones(8)), ValueError, "cos must be [>= T, D/2]"),
        (lambda: ops.qk_norm_rope(q, q[:, :, :1], cos, sin, torch.ones(2, 8)), ValueError,
         "a per-head s_qk [H, D] needs as many k heads as q heads"),
        (lambda: ops.qk_norm_rope(q[0], q, cos, sin, torch.ones(8)), ValueError, "qk_norm_rope: q must be 4-D"),
        (lambda: ops.scaled_swiglu(x, x, torch.ones(8), torch.ones(3), 8), ValueError,
         "scaled_swiglu: s_v must have shape (8,), got (3,)"),
        (lambda: ops.scaled_swiglu(x, x, torch.ones(8), torch.ones(8), 0), ValueError, "d_model must be >= 1"),
        (lambda: ops.scaled_swiglu(x, x, torch.ones(8), torch.ones(8), 2.5), TypeError,
         "scaled_swiglu: d_model must be an int, got float 2.5"),
        (lambda: ops.scaled_swiglu(x.tolist(), x, torch.ones(8), torch.ones(8), 8), TypeError,
         "scaled_swiglu: u must be a torch.Tensor, got list"),
        (lambda: ops.hypersphere_update(x.tolist(), x, torch.ones(8)), TypeError,
         "hypersphere_update: h must be a torch.Tensor, got list"),
        (lambda: ops.qk_norm_rope(q.tolist(), q, cos, sin, torch.ones(8)), TypeError,
         "qk_norm_rope: q must be a torch.Tensor, got list"),
        (lambda: ops.renormalize_([x.t()], [0]), ValueError, "renormalize_: tensors[0] must be contiguous"),
        (lambda: ops.renormalize_([x], [2]), ValueError, "dims[0] = 2 is out of range"),
        (lambda: ops.renormalize_([x], [0, 1]), ValueError, "got 1 tensors but 2 dims"),
        # eps >= the smallest normal fp32 (1 / eps must not overflow), finite, on every nGPT op
        (lambda: ops.l2_normalize(x, eps=1e-44), ValueError, "l2_normalize: eps must be >= 1.175e-38"),
        (lambda: ops.hypersphere_update(x, x, torch.ones(8), eps=1e-40), ValueError,
         "hypersphere_update: eps must be >= 1.175e-38"),
        (lambda: ops.qk_norm_rope(q, q, cos, sin, torch.ones(8), eps=float("inf")), ValueError,
         "qk_norm_rope: eps must be finite"),
        (lambda: ops.renormalize_([x], [1], eps=1e-39), ValueError, "renormalize_: eps must be >= 1.175e-38"),
        (lambda: ops.l2_normalize(x, eps="1e-6"), TypeError, "l2_normalize: eps must be a float, got str"),
        # renormalize_ takes lists: one tensor is not a list of its rows
        (lambda: ops.renormalize_(x, [1]), TypeError, "renormalize_: tensors must be a list or tuple of tensors"),
        (lambda: ops.renormalize_([[x]], [1]), TypeError, "renormalize_: tensors[0] must be a torch.Tensor, got list"),
        (lambda: ops.renormalize_([x], [1.0]), TypeError, "renormalize_: dims[0] must be an int, got float"),
        (lambda: ops.renormalize_([x], [True]), TypeError, "renormalize_: dims[0] must be an int, got bool"),
    ]


@pytest.mark.parametrize("case", range(len(bad_input_cases())))
def test_bad_inputs_raise_clear_errors(case):
    check_raises(*bad_input_cases()[case])


# ---- modules --------------------------------------------------------------------------------------------------


def tiny_config(**overrides):
    return NGPTConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), **overrides})


def normalized_layers(model):
    return [(m.weight, m.norm_dim) for m in model.modules() if hasattr(m, "norm_dim")]


def test_ngpt_trains_and_keeps_every_matrix_on_the_sphere():
    model = NGPT(tiny_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    renormalize_after_step(optimizer, model)
    tokens = torch.randint(0, 64, (4, 17))
    losses = []
    for _ in range(12):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        for weight, dim in normalized_layers(model):
            assert (weight.norm(dim=dim) - 1).abs().max() <= 1e-5
    assert losses[-1] < losses[0] - 0.3, losses


def test_ngpt_defaults_are_the_papers():
    model = NGPT(tiny_config())
    block, d = model.blocks[0], 32
    torch.testing.assert_close(block.attn_residual.alpha(), torch.full((d,), 0.05))
    torch.testing.assert_close(block.attn_residual.alpha.param, torch.full((d,), d ** -0.5))
    torch.testing.assert_close(block.attn.s_qk(), torch.ones(d))
    torch.testing.assert_close(model.s_z(), torch.ones(64))
    torch.testing.assert_close(model.s_z.param, torch.full((64,), d ** -0.5))
    assert block.mlp.s_u.scale == 1.0 and block.mlp.down.norm_dim == 0 and block.attn.out.norm_dim == 0


def test_attention_is_causal():
    attn = NormalizedAttention(32, 4, max_seq_len=8)
    x = torch.randn(1, 8, 32)
    y = x.clone()
    y[:, 5:] = torch.randn(1, 3, 32)
    torch.testing.assert_close(attn(x)[:, :5], attn(y)[:, :5])


def test_zero_rows_give_a_clear_error():
    model = NGPT(tiny_config())
    with torch.no_grad():
        model.blocks[1].mlp.up.weight[3] = 0
    check_raises(lambda: torchext.nn.renormalize_model_(model, check=True), ValueError, "zero vectors (norm 0)")


def test_renormalize_after_step_counts_zero_rows_on_the_device_until_checked():
    model = NGPT(tiny_config())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    hook = renormalize_after_step(optimizer, model)
    optimizer.step()
    hook.check()
    with torch.no_grad():
        model.blocks[0].attn.out.weight[:, 1] = 0
    optimizer.step()
    optimizer.step()
    assert hook.zero_vectors.item() == 2
    check_raises(hook.check, ValueError, "2 zero vectors (norm 0) met since the hook was made")
    hook.remove()
    optimizer.step()
    assert hook.zero_vectors.item() == 2


def test_normalized_linear_rejects_bad_norm_dim():
    check_raises(lambda: NormalizedLinear(4, 4, norm_dim=2), ValueError, "norm_dim must be 0 (columns) or 1 (rows)")


@pytest.mark.parametrize("in_features, out_features, norm_dim", [(0, 4, 1), (4, 0, 0), (0, 4, 0)])
def test_empty_normalized_layers_are_valid(in_features, out_features, norm_dim):
    """As nn.Linear(0, 4): an empty weight (the init's 1 / sqrt(0) raised ZeroDivisionError)."""
    layer = NormalizedLinear(in_features, out_features, norm_dim=norm_dim)
    assert layer.weight.shape == (out_features, in_features) and not layer.weight.isnan().any()
    assert torchext.nn.NormalizedEmbedding(5, 0).weight.shape == (5, 0)


def test_scaled_vector_checks_its_arguments_at_construction():
    check_raises(lambda: torchext.nn.ScaledVector(4, 0.5, 0.0), ValueError, "ScaledVector: scale must be nonzero")
    check_raises(lambda: torchext.nn.ScaledVector(-1, 0.5, 1.0), ValueError, "ScaledVector: size must be >= 0")
    check_raises(lambda: torchext.nn.ScaledVector(4.0, 0.5, 1.0), TypeError, "ScaledVector: size must be an int")
    check_raises(lambda: torchext.nn.ScaledVector(4, float("nan"), 1.0), ValueError,
                 "ScaledVector: init must be finite")


def test_modules_name_a_hidden_state_of_the_wrong_shape():
    attn, mlp = NormalizedAttention(8, 2, max_seq_len=4), torchext.nn.NormalizedSwiGLU(8, 16)
    check_raises(lambda: attn(torch.randn(3, 8)), ValueError,
                 "NormalizedAttention: h must be [batch, seq, d_model] with d_model = 8, got shape (3, 8)")
    check_raises(lambda: attn(torch.randn(1, 3, 6)), ValueError,
                 "NormalizedAttention: h must be [batch, seq, d_model] with d_model = 8, got shape (1, 3, 6)")
    check_raises(lambda: mlp(torch.randn(3, 6)), ValueError,
                 "NormalizedSwiGLU: h must be [..., d_model] with d_model = 8, got shape (3, 6)")


def test_ngpt_compiles_fullgraph():
    model = NGPT(tiny_config())
    tokens = torch.randint(0, 64, (2, 8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(tokens)[0], model(tokens)[0])


def test_scalars_are_rejected():
    check_raises(lambda: ops.l2_normalize(torch.tensor(2.0)), ValueError, "x must have at least 1 dim(s)")
