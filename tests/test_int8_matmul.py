"""LLM.int8() family: quantization semantics, the fused int8 GEMM against the reference, the decomposition's
accuracy claim, static-mode batch invariance, input gradients, registration, and bad inputs.

Gradcheck is not part of this family's set: the forward is piecewise constant in x (rounding), and the
backward is the gradient of the linear map it approximates, checked here against the exact product instead.
"""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from harness import NoHostReads, assert_close, check_against_reference, check_opcheck, check_raises

import torchext
from torchext import ops
from torchext.nn import Int8Linear, calibrate_outliers, replace_linear
from torchext.reference import int8_matmul as ref
from torchext.reference.int8_matmul import int8_dequantize

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def quantized_weight(N, K, device="cpu"):
    w = torch.randn(N, K, device=device)
    return (w, *ref.quantize_weight(w))


def with_outliers(M, K, cols=(3, 11), magnitude=30.0, dtype=torch.float32, device="cpu"):
    """Activations with one-sided outlier features (as the paper observes), 20-60 in size."""
    x = torch.randn(M, K, device=device)
    for i, c in enumerate(c for c in cols if c < K):
        x[:, c] = magnitude + 10 * i + torch.rand(M, device=device) * 5
    return x.to(dtype)


def relative_error(y, exact):
    return ((y.float() - exact).norm() / exact.norm()).item()


# ---- quantization semantics (the reference is the CPU path; the CUDA kernel is checked against it on GPU) ----


def test_quant_codes_are_vectorwise_absmax_within_one_lsb():
    x = torch.randn(9, 40) * torch.rand(9, 1) * 10
    codes, scale, _, n = ops.int8_vectorwise_quant(x, threshold=0.0)
    torch.testing.assert_close(scale, x.abs().amax(1))
    assert (codes.float() - x / scale[:, None] * 127).abs().max() <= 0.5 + 1e-4 and n.item() == 0


def test_quant_zero_rows_nonfinite_rows_and_outlier_list():
    x = torch.randn(5, 20)
    x[1] = 0
    x[2, 4] = float("nan")
    x[3, 7] = 9.0
    x[0, 15] = -8.0
    codes, scale, cols, n = ops.int8_vectorwise_quant(x, threshold=6.0, capacity=4)
    assert scale[1] == 0 and (codes[1] == 0).all(), "an all-zero row must not divide by zero"
    assert scale[2].isnan() and (codes[2] == 0).all(), "a row holding NaN must give a NaN scale"
    assert cols.tolist() == [7, 15, -1, -1] and n.item() == 2
    assert codes[3, 7] == 127 and codes[0, 15] == -127  # outliers saturate; the GEMM removes their int8 term
    _, _, cols, n = ops.int8_vectorwise_quant(x, threshold=6.0, capacity=1)
    assert cols.tolist() == [7] and n.item() == 2, "the count stays true when the list is full"


def test_quant_codes_of_tiny_rows_are_the_formula_and_normal_rows_are_unchanged():
    """127 / absmax overflows fp32 below absmax ~ 2^-121 (it saturated every code at +-127): tiny and subnormal
    rows get rint(127 x / absmax) too, and rows where 127 / absmax is finite keep the plain fp32 formula's codes
    bit for bit (bitsandbytes-compatible)."""
    base = torch.randn(6, 33)
    base[:, 5] = 3.0  # a row peak whose ratios are not ties
    x = base * torch.tensor([1e-40, 1e-38, 1e-37, 2.0 ** -70, 1.0, 1e30])[:, None]
    codes, scale, _, _ = ops.int8_vectorwise_quant(x)
    xd = x.double()
    torch.testing.assert_close(codes, (xd * (127 / xd.abs().amax(1, keepdim=True))).round().to(torch.int8),
                               rtol=0, atol=0)
    normal = x[3:]
    plain = (normal * (127 / normal.abs().amax(1, keepdim=True))).round().clamp(-127, 127).to(torch.int8)
    assert torch.equal(codes[3:], plain) and torch.equal(scale, x.abs().amax(1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 4096), (300, 1000), (8192, 4103)], ids=str)
def test_quant_cuda_kernel_matches_reference(shape, dtype):
    assert torchext._backend.CUDA_EXT is not None, "torchext._C was not built"
    x = with_outliers(*shape, cols=(0, 17, 999), dtype=dtype, device="cuda")
    x[min(2, shape[0] - 1), 0] = float("inf") if shape[0] > 2 else x[0, 0]
    if shape[0] > 4 and dtype != torch.float16:  # subnormal rows (fp16 has none below 2^-64)
        x[3:5] = (x[3:5].float() * 1e-40 / x[3:5].float().abs().amax()).to(dtype)
    excluded = torch.zeros(shape[1], dtype=torch.bool, device="cuda")
    excluded[shape[1] // 2] = True
    for args in ((6.0, 64, None), (0.0, 64, None), (6.0, 2, None), (0.0, 0, excluded)):
        got = ops.int8_vectorwise_quant(x, *args)
        expected = ref.int8_vectorwise_quant(x, *args)
        for name, g, e in zip(("codes", "scale", "cols", "count"), got, expected):
            torch.testing.assert_close(g, e, equal_nan=True, rtol=0, atol=0,
                                       msg=lambda m, name=name, args=args: f"{name} {args}: {m}")


# ---- int8_mm: the Triton kernel against the reference ----------------------------------------------------------
# (M, K, N): decode-like M = 1, a non-power-of-two everything, rows just past a 64-row tile.
MM_SHAPES = [(1, 70, 45), (17, 129, 33), (65, 64, 20)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", MM_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["dynamic", "w16", "no_outliers"])
def test_int8_mm_matches_reference(shape, dtype, mode, device):
    M, K, N = shape
    x = with_outliers(M, K, dtype=dtype, device=device)
    w, w_codes, w_scale = quantized_weight(N, K, device)
    bias = torch.randn(N, device=device).to(dtype)
    a_codes, a_scale, cols, n = ref.int8_vectorwise_quant(x, 6.0 if mode != "no_outliers" else 0.0, 32)
    w16 = w16_slot = None
    if mode == "w16":  # column 3 (an outlier) has a 16-bit copy, column 11 (an outlier too) does not
        w16, w16_slot = w[:, [7, 3]].to(dtype).contiguous(), torch.full((K,), -1, dtype=torch.int32, device=device)
        w16_slot[7], w16_slot[3] = 0, 1
    args = [a_codes, a_scale, w_codes, w_scale, bias, x, cols, n, w16, w16_slot]
    assert_close(ops.int8_mm(*args), ref.int8_mm(*args), "int8_mm")


def test_int8_mm_transposed_weight_view(device):
    """The input-gradient GEMM reads the stored codes transposed: strides must be honoured."""
    a_codes = torch.randint(-127, 128, (5, 24), dtype=torch.int8, device=device)
    w_t = torch.randint(-127, 128, (24, 40), dtype=torch.int8, device=device).t()  # [40, 24], strides (1, 40)
    args = [a_codes, torch.rand(5, device=device), w_t, torch.rand(40, device=device), None,
            torch.randn(5, 24, device=device), torch.zeros(0, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device), None, None]
    assert_close(ops.int8_mm(*args), ref.int8_mm(*args), "int8_mm")


def test_int8_mm_opcheck(device):
    x = with_outliers(6, 40, device=device)
    _, w_codes, w_scale = quantized_weight(8, 40, device)
    a_codes, a_scale, cols, n = ref.int8_vectorwise_quant(x, 6.0, 32)
    check_opcheck(torch.ops.torchext.int8_mm.default,
                  (a_codes, a_scale, w_codes, w_scale, None, x, cols, n, None, None))
    check_opcheck(torch.ops.torchext.int8_vectorwise_quant.default, (x, 6.0, 8, None))


# ---- int8_linear: the paper's claims at small scale -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decomposition_keeps_outlier_layers_accurate(dtype, device):
    """One-sided outlier features of size 20-60: <= 1e-2 relative error with threshold 6, visibly worse at 0."""
    x = with_outliers(48, 256, cols=(5, 77, 200), magnitude=20.0, device=device)
    w, w_codes, w_scale = quantized_weight(64, 256, device)
    exact = x @ w.T
    with_decomposition = relative_error(ops.int8_linear(x.to(dtype), w_codes, w_scale, threshold=6.0), exact)
    int8_only = relative_error(ops.int8_linear(x.to(dtype), w_codes, w_scale, threshold=0.0), exact)
    assert with_decomposition <= 1e-2, with_decomposition
    assert int8_only >= 2 * with_decomposition, (int8_only, with_decomposition)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("threshold", "capacity", "excluded"), [(0.0, 0, False), (6.0, None, False),
                                                                 (6.0, 1, False), (0.0, 0, True), (6.0, None, True)])
def test_cpu_quantization_gives_the_reference_codes(dtype, threshold, capacity, excluded):
    """The CPU quantizer (ops.int8_vectorwise_quant on CPU tensors) with its fewer passes gives the reference's
    codes, scales and list bit for bit, including the rows it hands back to the reference (NaN, Inf, all zero,
    absmax below 2^-64)."""
    x = with_outliers(33, 70, cols=(3, 11, 40)) * torch.rand(33, 1) * 3
    x[5], x[6, 2], x[7] = 0.0, float("nan"), 1e-30
    capacity = 70 if capacity is None else capacity
    mask = torch.arange(70) % 9 == 0 if excluded else None
    for rows in (slice(0, 5), slice(None)):  # the fast path alone, then with the special rows
        got = ops.int8_vectorwise_quant(x[rows].to(dtype), threshold, capacity, mask)  # CPU tensors: the CPU path
        expected = ref.int8_vectorwise_quant(x[rows].to(dtype), threshold, capacity, mask)
        for name, a, b in zip(("codes", "scale", "cols", "count"), got, expected):
            assert a.dtype == b.dtype and torch.equal(a.nan_to_num(-1), b.nan_to_num(-1)), name


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("n_outliers", [0, 1, 65, 96])
def test_cpu_path_multiplies_in_int8_and_matches_the_reference(n_outliers, static, monkeypatch):
    """Without the interpreter, CPU tensors take torch._int_mm (the int32 accumulator, exact) and an fp32 epilogue
    instead of the reference's fp64 products: the same numbers, dynamic or static with 16-bit weight columns."""
    monkeypatch.setattr(torchext._backend, "INTERPRET", False)
    int_mm, calls = torch._int_mm, []
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(a.shape) or int_mm(a, b))
    x = torch.randn(9, 96)
    cols = torch.randperm(96, generator=torch.Generator().manual_seed(n_outliers))[:n_outliers]
    x[:, cols] = 20 + 10 * torch.rand(9, n_outliers)
    w, w_codes, w_scale = quantized_weight(24, 96)
    bias = torch.randn(24)
    kwargs = {}
    if static:
        slot = torch.full((96,), -1, dtype=torch.int32)
        slot[cols] = torch.arange(n_outliers, dtype=torch.int32)
        kwargs = dict(static_cols=cols.sort().values.to(torch.int32), w16=w[:, cols].contiguous(), w16_slot=slot)
    y = ops.int8_linear(x, w_codes, w_scale, bias, **kwargs)
    assert calls == [(9, 96)]
    torch.testing.assert_close(y, ref.int8_linear(x, w_codes, w_scale, bias, **kwargs), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_outliers", [0, 1, 64, 65, 96])
def test_exact_for_any_number_of_outlier_columns(n_outliers, device):
    """All outlier columns take the 16-bit path whatever their number (up to every one of the K = 96): the
    error to the float product stays that of plain int8 on the inliers (it was 0.04 at 65 columns and 0.34 at
    100 when a 64-slot list dropped the rest)."""
    x = torch.randn(8, 96, device=device)
    cols = torch.randperm(96, generator=torch.Generator().manual_seed(n_outliers))[:n_outliers].to(device)
    x[:, cols] = 20 + 10 * torch.rand(8, n_outliers, device=device)
    w, w_codes, w_scale = quantized_weight(24, 96, device)
    y = ops.int8_linear(x, w_codes, w_scale)
    # fp32 sums of up to 96 products of size ~25 against the reference's fp64: a few ulps of 30
    torch.testing.assert_close(y, ref.int8_linear(x, w_codes, w_scale, None), rtol=1e-5, atol=1e-4)
    assert relative_error(y, x @ int8_dequantize(w_codes, w_scale).T) < 1e-2  # 0.006 at 0 outliers
    assert relative_error(y, x @ w.T) < 1e-2
    layer = Int8Linear.from_float(nn.Linear(96, 24).to(device))
    exact = x @ layer.weight.float().mul(layer.SCB[:, None] / 127).T + layer.bias
    assert relative_error(layer(x), exact) < 1e-2


def test_unusable_outlier_lists_give_nan_not_wrong_numbers(device):
    """An outlier list the GEMM cannot apply exactly gives NaN on every path, never an out-of-range read or a
    silently wrong product: more outliers than its slots, a column outside [0, K), a slot outside w16."""
    x = with_outliers(4, 8, cols=(1, 2, 3, 5, 6, 7), device=device)
    _, w_codes, w_scale = quantized_weight(6, 8, device)
    for y in (ops.int8_linear(x, w_codes, w_scale, capacity=5), ref.int8_linear(x, w_codes, w_scale, None, capacity=5)):
        assert y.isnan().all()
    a_codes, a_scale, _, _ = ref.int8_vectorwise_quant(x, 0.0)
    one = torch.ones(1, dtype=torch.int32, device=device)
    slot = torch.full((8,), -1, dtype=torch.int32, device=device)
    for cols, w16, w16_slot in ((100, None, None), (-5, None, None),
                                (3, torch.ones(6, 1, device=device), slot.index_fill(0, torch.tensor([3]), 99))):
        args = [a_codes, a_scale, w_codes, w_scale, None, x, torch.tensor([cols], dtype=torch.int32, device=device),
                one, w16, w16_slot]
        assert ops.int8_mm(*args).isnan().all() and ref.int8_mm(*args).isnan().all(), f"outlier column {cols}"


def test_linear_matches_reference_dynamic_and_static(device):
    x = with_outliers(10, 96, device=device)
    w, w_codes, w_scale = quantized_weight(24, 96, device)
    static_cols = torch.tensor([3, 11, 50], dtype=torch.int32, device=device)
    w16_slot = torch.full((96,), -1, dtype=torch.int32, device=device)
    w16_slot[static_cols.long()] = torch.arange(3, dtype=torch.int32, device=device)
    w16 = dict(w16=w[:, static_cols.long()].contiguous(), w16_slot=w16_slot)
    bias = torch.randn(24, device=device)
    for kwargs in (dict(threshold=6.0), dict(threshold=0.0), dict(static_cols=static_cols, **w16),
                   dict(threshold=6.0, **w16)):
        assert_close(ops.int8_linear(x, w_codes, w_scale, bias, **kwargs),
                     ref.int8_linear(x, w_codes, w_scale, bias, **kwargs), f"int8_linear {list(kwargs)}")


def test_static_mode_is_batch_invariant(device):
    x = with_outliers(12, 64, device=device)
    _, w_codes, w_scale = quantized_weight(16, 64, device)
    static_cols = torch.tensor([3, 11], dtype=torch.int32, device=device)
    alone = ops.int8_linear(x[:1], w_codes, w_scale, static_cols=static_cols)
    others = torch.cat([x[:1], with_outliers(7, 64, cols=(30,), magnitude=50.0, device=device)])
    in_batch = ops.int8_linear(others, w_codes, w_scale, static_cols=static_cols)
    assert torch.equal(alone[0], in_batch[0])


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("int8_backward", [True, False])
def test_input_gradient_is_close_to_the_exact_one(int8_backward, static, device):
    x = with_outliers(20, 80, device=device).requires_grad_()
    w, w_codes, w_scale = quantized_weight(30, 80, device)
    bias = torch.randn(30, device=device, requires_grad=True)
    layer = Int8Linear.from_float(torch.nn.Linear(80, 30).requires_grad_(False), outliers="static" if static else
                                  "dynamic", outlier_cols=torch.tensor([3, 11]))
    w16 = dict(static_cols=layer.outlier_cols, w16=w[:, [3, 11]], w16_slot=layer.weight16_slot) if static else {}
    y = ops.int8_linear(x, w_codes, w_scale, bias, int8_backward=int8_backward, **w16)
    grad = torch.randn_like(y)
    y.backward(grad)
    error = relative_error(x.grad, grad @ w)
    assert error <= (2e-2 if int8_backward else 1e-2), error
    torch.testing.assert_close(bias.grad, grad.sum(0))


def test_int8_linear_opcheck_and_compile(device):
    x = with_outliers(6, 48, device=device).requires_grad_()
    _, w_codes, w_scale = quantized_weight(10, 48, device)
    check_opcheck(torch.ops.torchext.int8_linear.default,
                  (x, w_codes, w_scale, None, 6.0, 16, None, None, None, True))
    fn = lambda x: ops.int8_linear(x, w_codes, w_scale)  # noqa: E731
    check_against_reference(torch.compile(fn, fullgraph=True), fn, [x])


def test_int8_linear_compiles_with_dynamic_shapes(device):
    """The default capacity is a size, a SymInt under dynamic shapes: the int checks must take it."""
    fn = torch.compile(lambda x, w_codes, w_scale: ops.int8_linear(x, w_codes, w_scale), dynamic=True, fullgraph=True)
    for M, K in ((4, 32), (6, 48)):
        x = with_outliers(M, K, device=device)
        _, w_codes, w_scale = quantized_weight(8, K, device)
        torch.testing.assert_close(fn(x, w_codes, w_scale), ops.int8_linear(x, w_codes, w_scale))


def test_nonfinite_activations_give_nonfinite_rows_not_silent_numbers(device):
    x = torch.randn(4, 32, device=device)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    _, w_codes, w_scale = quantized_weight(8, 32, device)
    y = ops.int8_linear(x, w_codes, w_scale)
    assert y[1].isnan().all() and y[2].isnan().all() and y[[0, 3]].isfinite().all()


def test_empty_batch(device):
    _, w_codes, w_scale = quantized_weight(8, 32, device)
    assert ops.int8_linear(torch.empty(0, 32, device=device), w_codes, w_scale).shape == (0, 8)


def test_no_input_features_gives_the_bias(device):
    """x @ W^T with K = 0 is a zero matrix: int8_linear gives the bias (it reshaped [4, 0] with -1 and failed)."""
    bias = torch.randn(5, device=device)
    y = ops.int8_linear(torch.empty(4, 0, device=device), torch.empty(5, 0, dtype=torch.int8, device=device),
                        torch.ones(5, device=device), bias)
    assert torch.equal(y, bias.expand(4, 5))


def test_out_of_range_static_column_gives_nan_without_host_reads(device):
    """A static column outside [0, K) is an unusable outlier list: NaN outputs on every path, found on the device
    (it was an IndexError in index_fill_, a device assert on CUDA); the backward skips its 16-bit column."""
    x = with_outliers(6, 16, device=device).requires_grad_()
    w, w_codes, w_scale = quantized_weight(5, 16, device)
    slot = torch.full((16,), -1, dtype=torch.int32, device=device)
    slot[3] = 0
    for bad in (16, -1):
        static_cols = torch.tensor([3, bad], dtype=torch.int32, device=device)
        kwargs = dict(static_cols=static_cols, w16=w[:, [3]].contiguous(), w16_slot=slot)
        assert ref.int8_linear(x.detach(), w_codes, w_scale, None, **kwargs).isnan().all()
        with NoHostReads():
            y = ops.int8_linear(x, w_codes, w_scale, int8_backward=False, **kwargs)
            grad_x, = torch.autograd.grad(y, x, torch.ones_like(y))
        assert y.isnan().all(), f"static column {bad}"
        y_good = ops.int8_linear(x, w_codes, w_scale, int8_backward=False, **{**kwargs, "static_cols": static_cols[:1]})
        torch.testing.assert_close(grad_x, torch.autograd.grad(y_good.sum(), x)[0])


def test_inf_scales_give_nan_rows_and_columns(device):
    """An Inf scale dequantizes to +-Inf and 0 * Inf: NaN in its output row (a_scale) or column (w_scale) on
    every path (the kernel gave -Inf where its int8 sum and outlier term had one sign), the rest unchanged."""
    x = with_outliers(5, 24, device=device)
    _, w_codes, w_scale = quantized_weight(7, 24, device)
    a_codes, a_scale, cols, n = ref.int8_vectorwise_quant(x, 6.0)
    a_inf, w_inf = a_scale.clone(), w_scale.clone()
    a_inf[2], w_inf[1] = float("inf"), float("inf")
    args = [a_codes, a_inf, w_codes, w_inf, None, x, cols, n]
    got, expected = ops.int8_mm(*args), ref.int8_mm(*args)
    nan = torch.zeros(5, 7, dtype=torch.bool, device=device)
    nan[2], nan[:, 1] = True, True
    assert torch.equal(got.isnan(), nan) and torch.equal(expected.isnan(), nan)
    assert_close(got[~nan], ops.int8_mm(a_codes, a_scale, w_codes, w_scale, None, x, cols, n)[~nan], "int8_mm")


def bad_input_cases():
    x = torch.randn(4, 32)
    _, w_codes, w_scale = quantized_weight(8, 32)
    return [
        (lambda: ops.int8_linear(x.double(), w_codes, w_scale), TypeError, "int8_linear: x must have dtype in"),
        (lambda: ops.int8_linear(x.tolist(), w_codes, w_scale), TypeError, "int8_linear: x must be a torch.Tensor"),
        (lambda: ops.int8_linear(x, w_codes.float(), w_scale), TypeError, "int8_linear: w_codes must have dtype"),
        (lambda: ops.int8_linear(x[:, :31], w_codes, w_scale), ValueError,
         "x has 31 input features but the weight has 32"),
        (lambda: ops.int8_linear(x, w_codes.t().contiguous().t(), w_scale), ValueError, "w_codes must be contiguous"),
        (lambda: ops.int8_linear(x.t(), w_codes[:, :4], w_scale), ValueError, "x must have unit stride"),
        (lambda: ops.int8_mm(w_codes[:4], w_scale[:3], w_codes, w_scale, None, x, torch.zeros(0, dtype=torch.int32),
                             torch.zeros(1, dtype=torch.int32)), ValueError, "a_scale must have shape (4,)"),
        (lambda: ops.int8_linear(x, w_codes, w_scale, w16=torch.zeros(8, 1)), ValueError,
         "w16 and w16_slot go together"),
        (lambda: ops.int8_vectorwise_quant(x, capacity=-1), ValueError, "capacity must be >= 0"),
        (lambda: ops.int8_vectorwise_quant(x[0]), ValueError, "x must be 2-D"),
        # the wrappers check before the schema (no schema dump, no bool taken for an int); int8_linear checks what
        # its inner ops would, so the error names the op the user called
        (lambda: ops.int8_vectorwise_quant(x, capacity=2.5), TypeError, "int8_vectorwise_quant: capacity must be"),
        (lambda: ops.int8_vectorwise_quant(x, capacity=True), TypeError, "int8_vectorwise_quant: capacity must be"),
        (lambda: ops.int8_vectorwise_quant(x, excluded=[False] * 32), TypeError,
         "int8_vectorwise_quant: excluded must be a torch.Tensor"),
        (lambda: ops.int8_mm(w_codes[:4], w_scale[:4], w_codes, w_scale, [0.0] * 8, x[:4],
                             torch.zeros(0, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)), TypeError,
         "int8_mm: bias must be a torch.Tensor"),
        (lambda: ops.int8_linear(x, w_codes, w_scale.half()), TypeError, "int8_linear: w_scale must have dtype"),
        (lambda: ops.int8_linear(x, w_codes, w_scale.tolist()), TypeError, "int8_linear: w_scale must be a torch"),
        (lambda: ops.int8_linear(x, w_codes, w_scale.to("meta")), ValueError, "int8_linear: all tensors must be on"),
        (lambda: ops.int8_linear(x, w_codes, w_scale, threshold=float("nan")), ValueError,
         "int8_linear: threshold must be a number, got NaN"),
        (lambda: ops.int8_linear(x, w_codes, w_scale, capacity=-1), ValueError, "int8_linear: capacity must be >= 0"),
        (lambda: ops.int8_linear(x, w_codes, w_scale, capacity=2.5), TypeError, "int8_linear: capacity must be an"),
        (lambda: ops.int8_linear(x, w_codes, w_scale, capacity=False), TypeError, "int8_linear: capacity must be an"),
        (lambda: Int8Linear(32, 8).set_outlier_cols(torch.tensor([3, 32])), ValueError,
         "Int8Linear.set_outlier_cols: cols must be in [0, 32) (in_features), got column 32"),
    ]


@pytest.mark.parametrize("case", range(len(bad_input_cases())))
def test_bad_inputs_raise_clear_errors(case):
    check_raises(*bad_input_cases()[case])


# ---- modules ----------------------------------------------------------------------------------------------------


def tiny_gpt():
    """A small transformer built locally (examples/gpt.py, random init) to replace Linears in."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.gpt import GPT, GPTConfig

    return GPT(GPTConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=16)).eval()


def test_replace_linear_keeps_a_transformer_close_and_reports_memory():
    model = tiny_gpt()
    tokens = torch.randint(0, 64, (2, 16))
    expected = model(tokens)[0]
    report = replace_linear(model, skip=("head",))
    got = model(tokens)[0]
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), expected.flatten(), dim=0).item()
    print(f"cosine similarity of int8 vs fp32 logits: {cosine:.5f}")
    assert cosine >= 0.999, cosine
    assert isinstance(model.head, torch.nn.Linear) and isinstance(model.blocks[0].attn.qkv, Int8Linear)
    assert len(report["layers"]) == 8 and report["bytes_after"] < 0.27 * report["bytes_before"]  # fp32 -> int8


def test_static_module_from_calibration_is_batch_invariant_and_accurate():
    linear = torch.nn.Linear(64, 16)
    calibration = [with_outliers(32, 64, cols=(3, 40))]
    cols = calibrate_outliers(linear, calibration)[""]
    assert cols.tolist() == [3, 40]
    layer = Int8Linear.from_float(linear, outliers="static", outlier_cols=cols)
    x = with_outliers(6, 64, cols=(3, 40))
    torch.testing.assert_close(layer.weight16, linear.weight[:, [3, 40]])  # true 16-bit columns
    assert torch.equal(layer(x[:1])[0], layer(x)[0])
    assert relative_error(layer(x), linear(x).detach()) <= 1e-2


def test_state_dict_uses_the_bitsandbytes_layout():
    layer = Int8Linear.from_float(torch.nn.Linear(32, 8))
    state = layer.state_dict()
    assert set(state) == {"weight", "SCB", "bias", "weight_format"}
    assert state["weight"].dtype == torch.int8 and state["SCB"].dtype == torch.float32
    fresh = Int8Linear(32, 8)
    fresh.load_state_dict(state)
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), layer(x))
    check_raises(lambda: fresh.load_state_dict({**state, "weight_format": torch.tensor(1, dtype=torch.uint8)}),
                 RuntimeError, "only row-major int8 (0) is supported")


@pytest.mark.parametrize("cast", ["bfloat16", "half"])
def test_module_casts_keep_the_scales_fp32(cast):
    """model.to(bf16) / .half() after replace_linear: the codes stay int8, SCB stays fp32 (a bf16 SCB made the next
    forward raise), the bias and any 16-bit outlier columns take the new dtype, and the layer still works."""
    torch.manual_seed(0)
    layer = Int8Linear.from_float(torch.nn.Linear(40, 12))
    x = with_outliers(4, 40)
    expected = layer(x)
    getattr(layer, cast)()
    dtype = getattr(torch, "float16" if cast == "half" else cast)
    assert layer.weight.dtype == torch.int8 and layer.SCB.dtype == torch.float32 and layer.bias.dtype == dtype
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("strict", [True, False])
def test_a_float_state_dict_does_not_load_into_int8_codes(strict):
    """A float nn.Linear state_dict with strict=False was truncated into the int8 codes without a word."""
    layer = Int8Linear.from_float(torch.nn.Linear(32, 8))
    before = layer.weight.clone()
    check_raises(lambda: layer.load_state_dict(torch.nn.Linear(32, 8).state_dict(), strict=strict), RuntimeError,
                 "weight is torch.float32, Int8Linear stores torch.int8")
    assert torch.equal(layer.weight, before)


def test_frozen_int8_weight_passes_gradients_to_the_input_in_bf16():
    linear = torch.nn.Linear(48, 24).to(torch.bfloat16)
    layer = Int8Linear.from_float(linear)
    x = torch.randn(5, 48, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad is not None and layer.bias.grad is not None
    assert not any(b.requires_grad for b in layer.buffers())


def test_int8_linear_module_compiles_fullgraph():
    layer = Int8Linear.from_float(torch.nn.Linear(40, 12))
    x = with_outliers(4, 40)
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_static_layer_without_calibration_says_so():
    check_raises(lambda: Int8Linear(8, 4, outliers="static")(torch.randn(2, 8)), RuntimeError,
                 "run calibrate_outliers(model, batches)")


# ---- PEFT LoRA on Int8Linear ---------------------------------------------------------------------------------


def test_peft_lora_trains_only_the_adapters(device):
    """get_peft_model with torchext.nn.int8_matmul_lora.lora_config wraps Int8Linear layers (PEFT alone refused
    them: "Target module Int8Linear is not supported"); the loss falls, and only the LoRA weights change: codes,
    scales and biases stay as they were."""
    peft = pytest.importorskip("peft")
    from torchext.nn.int8_matmul_lora import Int8LoraLinear, lora_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).to(device)
    replace_linear(model)
    model = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=["0", "2"]))
    assert isinstance(model.base_model.model[0], Int8LoraLinear)
    frozen = {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]
              if "lora_" not in name}
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}
    x, target = torch.randn(64, 32, device=device), torch.randn(64, 16, device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (model(x) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(t, frozen[name]) for name, t in [*model.named_parameters(), *model.named_buffers()]
               if name in frozen)
    assert all(not torch.equal(p, lora[name]) for name, p in model.named_parameters() if "lora_B" in name)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), model.base_model.model[2](model.base_model.model[1](
            model.base_model.model[0].base_layer(x))))
    dora_model = nn.Sequential(nn.Linear(8, 8)).to(device)
    replace_linear(dora_model)
    with pytest.raises(ValueError, match="only plain LoRA"):
        peft.get_peft_model(dora_model, lora_config(target_modules=["0"], use_dora=True))


# ---- Hugging Face checkpoints --------------------------------------------------------------------------------


def _tiny_bert(tmp_path):
    """A float BertModel checkpoint (2 layers, 12 Linears) saved under tmp_path / "float", and its input ids."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path / "float")
    return transformers, tmp_path / "float", torch.randint(0, 100, (2, 12))


def _int8_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def test_save_pretrained_then_from_pretrained_gives_the_same_outputs(tmp_path):
    """save_pretrained wrote no quantization config, so from_pretrained loaded the int8 codes as float weights in
    [-127, 127] (embedding cosine 0.0165 on MiniLM); now the config names the registered quantizer."""
    transformers, float_path, ids = _tiny_bert(tmp_path)
    hf = pytest.importorskip("torchext.nn.int8_matmul_hf")
    model = transformers.AutoModel.from_pretrained(float_path).eval()
    hf.quantize(model, threshold=6.0, skip=("pooler.dense",))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path / "int8")
    loaded = transformers.AutoModel.from_pretrained(tmp_path / "int8").eval()
    assert set(_int8_layers(loaded)) == set(_int8_layers(model)) and len(_int8_layers(model)) == 12
    assert isinstance(loaded.pooler.dense, nn.Linear)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state, expected)
    with pytest.raises(ValueError, match="pre-quantized"):  # a float checkpoint never lands in int8 buffers
        transformers.AutoModel.from_pretrained(float_path, quantization_config=hf.TorchextInt8Config())


def test_bitsandbytes_checkpoints_load_both_ways(tmp_path):
    """A checkpoint bitsandbytes wrote loads into Int8Linear layers, and one torchext wrote loads into
    bitsandbytes' Linear8bitLt, with the same codes and scales and no edit of the files."""
    transformers, float_path, ids = _tiny_bert(tmp_path)
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    hf = pytest.importorskip("torchext.nn.int8_matmul_hf")
    bnb_model = transformers.AutoModel.from_pretrained(
        float_path, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
    bnb_model.save_pretrained(tmp_path / "bnb")
    bnb_config = hf.config_from_bitsandbytes(tmp_path / "bnb")
    ours = transformers.AutoModel.from_pretrained(tmp_path / "bnb", config=bnb_config)
    layers = _int8_layers(ours)
    assert set(layers) == {name for name, m in bnb_model.named_modules() if type(m).__name__ == "Linear8bitLt"}
    for name, layer in layers.items():
        theirs = bnb_model.get_submodule(name)
        assert torch.equal(layer.weight, theirs.weight.data) and torch.equal(layer.SCB, theirs.weight.SCB), name
    ours.eval()
    with torch.no_grad():
        assert ours(input_ids=ids).last_hidden_state.isfinite().all()
    ours.save_pretrained(tmp_path / "ours")
    back = transformers.AutoModel.from_pretrained(tmp_path / "ours",
                                                  config=hf.config_for_bitsandbytes(tmp_path / "ours"))
    for name, layer in layers.items():
        theirs = back.get_submodule(name)
        assert type(theirs).__name__ == "Linear8bitLt"
        assert torch.equal(layer.weight, theirs.weight.data) and torch.equal(layer.SCB, theirs.weight.SCB), name
