"""tensor_attention family: the fused op against Alman & Song's Kronecker definition (fp64, tiny n) and the chunked
reference (medium n), SQNR of 16-bit inputs, gradients, gradcheck, opcheck, compile, windows at their edges, causal
leakage, GQA, bad inputs; the TensorAttention layer."""

import functools
import math

import pytest
import torch
from harness import check_against_reference, check_compile, check_gradcheck, check_opcheck, check_raises

from torchext.nn.tensor_attention import TensorAttention
from torchext.ops import tensor_attention
from torchext.reference import tensor_attention as ref

# The bar for 16-bit inputs against the fp32 reference (FBGEMM's simplicial-attention tests use it too).
MIN_SQNR_DB = 40.0


def inputs(B, H, Hkv, n, d, dtype=torch.float32, device="cpu", grad=True):
    """q [B, H, n, d] and k1, k2, v1, v2 [B, Hkv, n, d]."""
    shapes = [(B, H, n, d)] + [(B, Hkv, n, d)] * 4
    return [torch.randn(s, device=device).to(dtype).requires_grad_(grad) for s in shapes]


def op(window=None, causal=True, scale=None):
    return functools.partial(tensor_attention, window=window, causal=causal, scale=scale, return_lse=True)


def sqnr_db(actual, expected):
    expected = expected.detach().double()
    noise = (actual.detach().double() - expected).pow(2).sum()
    return float(10 * torch.log10(expected.pow(2).sum() / noise.clamp_min(1e-300)))


def check_sqnr_against_fp32(xs, window, grad_lse=True):
    """16-bit inputs xs against the fp32 reference on the same rounded values: out, lse and the five gradients (of
    <out, random> plus, with grad_lse, sum(lse)) all >= MIN_SQNR_DB."""
    leaves = [x.clone().requires_grad_() for x in xs]
    out, lse = tensor_attention(*leaves, window=window, return_lse=True)
    fp32 = [x.float().requires_grad_() for x in xs]
    out_ref, lse_ref = ref.tensor_attention(*fp32, window=window)
    grad_out = torch.randn_like(out_ref)
    grads = torch.autograd.grad((out.float() * grad_out).sum() + (lse.sum() if grad_lse else 0), leaves)
    grads_ref = torch.autograd.grad((out_ref * grad_out).sum() + (lse_ref.sum() if grad_lse else 0), fp32)
    for name, actual, expected in zip(("out", "lse", "dq", "dk1", "dk2", "dv1", "dv2"),
                                      (out, lse, *grads), (out_ref, lse_ref, *grads_ref)):
        assert sqnr_db(actual, expected) >= MIN_SQNR_DB, f"{name}: SQNR {sqnr_db(actual, expected):.1f} dB"


# (B, H, Hkv, n, d, window, causal): one token; full causal and non-causal; windows narrower than a block and
# with either side smaller (the kernels fold the smaller window into their rows); GQA; d not a power of two.
DEFINITION_CASES = [
    (1, 1, 1, 1, 4, None, True),
    (2, 2, 1, 6, 8, None, True),
    (1, 2, 2, 7, 5, None, False),
    (1, 2, 1, 13, 8, (3, 5), True),
    (2, 4, 2, 11, 12, (6, 2), True),
]


@pytest.mark.parametrize("case", DEFINITION_CASES, ids=str)
def test_matches_kronecker_definition(case, device):
    """fp64 kernels vs the paper's D^-1 exp(Q (K1 ⊘ K2)^T) (V1 ⊘ V2): outputs, lse and all five gradients."""
    *shape, window, causal = case
    xs = inputs(*shape, dtype=torch.float64, device=device)
    definition = functools.partial(ref.kronecker_definition, window=window, causal=causal)
    check_against_reference(op(window, causal), definition, xs)


# Medium n: past a 64-wide column block, a non-power-of-two length, windows wider than n, GQA, head_dim 64.
CHUNKED_CASES = [
    (1, 2, 1, 67, 16, (48, 20), True),
    (1, 1, 1, 37, 64, None, True),
    (2, 2, 2, 29, 8, (4, 100), True),
    (1, 1, 1, 23, 16, None, False),
]


@pytest.mark.parametrize("case", CHUNKED_CASES, ids=str)
def test_matches_chunked_reference(case, device):
    *shape, window, causal = case
    xs = inputs(*shape, device=device)
    check_against_reference(op(window, causal), functools.partial(ref.tensor_attention, window=window, causal=causal,
                                                                  chunk=7), xs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_sqnr(dtype, device):
    """16-bit inputs against the fp32 reference on the same rounded values: outputs and gradients >= 40 dB."""
    B, H, Hkv, n, d, window = 1, 2, 1, 40, 32, (24, 8)
    check_sqnr_against_fp32(inputs(B, H, Hkv, n, d, dtype=dtype, device=device, grad=False), window)


@pytest.mark.parametrize("window", [None, (2, 3)], ids=str)
def test_gradcheck(window, device):
    xs = inputs(1, 2, 1, 4, 3, device=device)
    check_gradcheck(op(window), xs)


def test_window_at_least_n_is_the_full_causal_operator(device):
    xs = inputs(1, 2, 1, 19, 8, device=device, grad=False)
    full, wide = op()(*xs), op((19, 50))(*xs)
    for a, b in zip(full, wide):
        torch.testing.assert_close(a, b)


def test_window_one_attends_only_to_the_triple_i_i_i(device):
    """w1 = w2 = 1 leaves one pair (i, i): o_i = v1_i * v2_i and lse_i = scale <q_i, k1_i * k2_i>."""
    q, k1, k2, v1, v2 = inputs(2, 2, 2, 9, 8, device=device, grad=False)
    out, lse = tensor_attention(q, k1, k2, v1, v2, window=(1, 1), scale=0.3, return_lse=True)
    torch.testing.assert_close(out, v1 * v2)
    torch.testing.assert_close(lse, 0.3 * (q * k1 * k2).sum(-1))


def test_window_one_on_one_side(device):
    """w2 = 1: k = i, so o_i = v2_i * (ordinary causal windowed attention of q_i * k2_i over (k1, v1))."""
    q, k1, k2, v1, v2 = inputs(1, 1, 1, 12, 8, device=device, grad=False)
    out = tensor_attention(q, k1, k2, v1, v2, window=(5, 1), return_lse=False)
    mask = ref.pair_masks(12, (5, 1), True)[0]
    scores = ((q * k2) @ k1.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(out, (torch.softmax(scores, -1) @ v1) * v2)


@pytest.mark.parametrize("window", [None, (3, 4)], ids=str)
def test_causal_no_leakage(window, device):
    """Changing tokens after t changes nothing at or before t, and gives them no gradient from there."""
    n, t = 14, 8
    xs = inputs(1, 2, 1, n, 8, device=device)
    out, lse = op(window)(*xs)
    changed = [x.detach().clone() for x in xs]
    for x in changed:
        x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 3
    out2, lse2 = op(window)(*changed)
    torch.testing.assert_close(out[:, :, :t + 1], out2[:, :, :t + 1], atol=0, rtol=0)
    torch.testing.assert_close(lse[:, :, :t + 1], lse2[:, :, :t + 1], atol=0, rtol=0)
    grads = torch.autograd.grad(out[:, :, :t + 1].sum() + lse[:, :, :t + 1].sum(), xs)
    for g in grads:
        assert g[:, :, t + 1:].abs().max() == 0


def test_gqa_equals_repeated_heads(device):
    q, *kv = inputs(1, 4, 2, 10, 8, device=device, grad=False)
    repeated = [x.repeat_interleave(2, dim=1) for x in kv]
    for a, b in zip(op((4, 3))(q, *kv), op((4, 3))(q, *repeated)):
        torch.testing.assert_close(a, b)


def test_reads_transposed_views(device):
    """[B, n, H, d] projections viewed as [B, H, n, d] (not contiguous) give the same result as copies."""
    views = [torch.randn(1, 9, 2, 8, device=device).transpose(1, 2).requires_grad_() for _ in range(5)]
    check_against_reference(op((3, 3)), functools.partial(ref.tensor_attention, window=(3, 3)), views)


def test_empty_sequence(device):
    xs = inputs(2, 2, 1, 0, 8, device=device, grad=False)
    out, lse = op()(*xs)
    assert out.shape == (2, 2, 0, 8) and lse.shape == (2, 2, 0)


def test_opcheck_and_compile(device):
    xs = inputs(1, 2, 1, 6, 8, device=device)
    args = [x.detach() for x in xs]
    scale = 1 / math.sqrt(8)
    check_opcheck(torch.ops.torchext.tensor_attention.default, (*args, 2, 3, True, scale))
    out, lse = op((2, 3))(*args)
    check_opcheck(torch.ops.torchext.tensor_attention_backward.default,
                  (torch.randn_like(out), torch.randn_like(lse), *args, out, lse, 2, 3, True, scale))
    check_compile(op((2, 3)), xs)


def test_bad_inputs(device):
    q, k1, k2, v1, v2 = inputs(1, 2, 1, 6, 8, device=device, grad=False)
    call = lambda *xs, **kw: (lambda: tensor_attention(*xs, return_lse=False, **kw))  # noqa: E731
    check_raises(call(q, k1, k2, v1, v2.double()), TypeError, "v2 must have q's dtype")
    empty = torch.zeros(1, 1, 4, 0, device=device)
    check_raises(call(empty, empty, empty, empty, empty), ValueError, "tensor_attention: head dim must be >= 1")
    check_raises(call(q, k1, k2[:, :, :5], v1, v2), ValueError, "k2 must have shape (1, 1, 6, 8)")
    check_raises(call(q[:, :1], *inputs(1, 2, 2, 6, 8, grad=False)[1:]), ValueError, "must be a multiple")
    check_raises(call(q, k1, k2, v1, v2, window=(2, 3), causal=False), ValueError, "pass causal=True")
    check_raises(call(q, k1, k2, v1, v2, window=(0, 3)), ValueError, "window[0] must be >= 1, got 0")
    check_raises(call(q, k1, k2, v1, v2, window=(2,)), ValueError, "window must have 2 entries")
    check_raises(call(q, k1, k2, v1, v2, window=4), TypeError, "window must be a list or tuple of ints")
    check_raises(call(q, k1, k2, v1, v2, window=(2.0, 3)), TypeError, "window[0] must be an int")
    check_raises(call(q, [k1], k2, v1, v2), TypeError, "k1 must be a torch.Tensor")
    check_raises(call(q, k1, k2, v1, v2, scale=float("inf")), ValueError, "scale must be finite")
    check_raises(call(q[0], k1, k2, v1, v2), ValueError, "q must be 4-D")
    check_raises(call(q.long(), k1, k2, v1, v2), TypeError, "q must have dtype in")
    big = inputs(1, 1, 1, 2, 257, grad=False)
    check_raises(call(*big), ValueError, "head_dim must be in [1, 256]")


# ---- the layer ------------------------------------------------------------------------------------------------------


def test_layer_matches_reference_path(device):
    """TensorAttention (projections, heads, GQA, window) equals the same projections through the reference."""
    layer = TensorAttention(32, n_heads=4, n_kv_heads=2, window=(4, 6)).to(device)
    x = torch.randn(2, 11, 32, device=device)
    B, T, _ = x.shape

    def heads(proj, h):
        return proj(x).view(B, T, h, 8).transpose(1, 2)

    q = heads(layer.q, 4)
    k1, k2, v1, v2 = (heads(p, 2) for p in (layer.k1, layer.k2, layer.v1, layer.v2))
    out, _ = ref.tensor_attention(q, k1, k2, v1, v2, window=(4, 6))
    expected = layer.out(out.transpose(1, 2).reshape(B, T, 32))
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_layer_checks_its_configuration():
    check_raises(lambda: TensorAttention(30, n_heads=4), ValueError, "d_model (30) must split into 4 heads")
    check_raises(lambda: TensorAttention(32, n_heads=4, n_kv_heads=3), ValueError, "multiple of n_kv_heads")


# ---- GPU sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [(512, 32), (32, 512), None], ids=str)
def test_gpu_sizes_sqnr(window, head_dim, device):
    """bf16 at the paper's windows and head sizes, GQA 4, a length past several blocks: >= 40 dB everywhere."""
    n = 300 if window is None else 1100
    xs = inputs(1, 4, 1, n, head_dim, dtype=torch.bfloat16, device=device, grad=False)
    check_sqnr_against_fp32(xs, window, grad_lse=False)
