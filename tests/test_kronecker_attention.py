"""Kronecker attention family: the op (KAO_KV and KAO_QKV, 2-D and 3-D) against the naive reference that
materialises the means and the attention (forward, gradients), the reference against SDPA, the QKV outer-sum
structure, gradcheck, opcheck, compile, bad inputs, and the nn blocks."""

import functools

import pytest
import torch
import torch.nn.functional as F
from harness import (DEVICE, check_against_reference, check_compile, check_gradcheck, check_opcheck, check_raises,
                     given, settings, st)

from torchext.nn.kronecker_attention import KroneckerAttention2d, KroneckerAttention3d
from torchext.ops import kronecker_attention
from torchext.reference import kronecker_attention as ref

MODES = ref.MODES


def randn(*shape, dtype=torch.float32, device="cpu", grad=True):
    return torch.randn(*shape, device=device).to(dtype).requires_grad_(grad)


def check_op(x, mode, heads=1, scale=None):
    check_against_reference(functools.partial(kronecker_attention, mode=mode, heads=heads, scale=scale),
                            functools.partial(ref.kronecker_attention, mode=mode, heads=heads, scale=scale), [x])


# (shape, heads): one pixel and one channel (L = 2), odd H and W with two heads, 3-D, L = 17 tokens (one past
# a 16-key block), more queries than one 128-wide query tile (several tiles and reduction slices), a head of
# 65 channels (one past a 64-channel chunk).
CASES = [((1, 1, 1, 1), 1), ((2, 6, 5, 7), 2), ((2, 4, 3, 5, 6), 2), ((1, 2, 9, 8), 1), ((1, 2, 12, 13), 2),
         ((1, 65, 3, 4), 1)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, mode, device):
    shape, heads = case
    check_op(randn(*shape, device=device), mode, heads)


@settings(max_examples=5, deadline=None)
@given(frames=st.integers(0, 3), H=st.integers(1, 20), W=st.integers(1, 20), heads=st.integers(1, 3),
       head_dim=st.integers(1, 5), qkv=st.booleans())
def test_any_shape(frames, H, W, heads, head_dim, qkv):
    """Random sizes: masking must hold at every remainder of the key, query and row tiles (frames 0 = 2-D)."""
    shape = (1, heads * head_dim, *((frames,) if frames else ()), H, W)
    check_op(randn(*shape, device=DEVICE), "qkv" if qkv else "kv", heads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 4, 3, 5, 6)], ids=str)
def test_matches_reference_16bit(shape, mode, dtype, device):
    check_op(randn(*shape, dtype=dtype, device=device), mode, heads=2)


@pytest.mark.parametrize("mode", MODES)
def test_channel_slice_of_a_fused_projection_and_custom_scale(mode, device):
    """x is one third of a wider tensor (batch and channel strides of the wide one); scale is explicit."""
    x = randn(2, 12, 5, 6, device=device)[:, 4:8]
    check_op(x, mode, heads=2, scale=0.3)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    x = torch.randn(1, 8, 3, 4, device=device)
    torch.testing.assert_close(kronecker_attention(x, "kv", heads=2), ref.kronecker_attention(x, "kv", 2, 0.5))


def test_empty_batch(device):
    for mode in MODES:
        x = torch.empty(0, 4, 3, 5, device=device, requires_grad=True)
        out = kronecker_attention(x, mode, heads=2)
        out.sum().backward()
        assert out.shape == x.shape and x.grad.shape == x.shape


# ---- the paper's structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 4, 3, 4, 5)], ids=str)
def test_reference_is_sdpa_over_the_means(shape):
    """KAO_KV is attention from the unfolded map to the L means; KAO_QKV is attention among the means, folded by
    the outer sum. Checked against torch's SDPA on the explicit tokens, independently of the reference's einsums."""
    B, C, *spatial = shape
    x = torch.randn(*shape, dtype=torch.float64)
    heads, d = 2, C // 2
    rows = [x.mean(dim=[a for a in range(2, x.dim()) if a != axis]) for axis in range(2, x.dim())]  # [B, C, n]
    tokens = torch.cat(rows, dim=-1).view(B, heads, d, -1).transpose(-1, -2)  # [B, heads, L, d]
    queries = x.reshape(B, heads, d, -1).transpose(-1, -2)  # [B, heads, N, d]
    kv = F.scaled_dot_product_attention(queries, tokens, tokens).transpose(-1, -2).reshape(shape)
    torch.testing.assert_close(ref.kronecker_attention(x, "kv", heads), kv)
    attended = F.scaled_dot_product_attention(tokens, tokens, tokens).transpose(-1, -2).reshape(B, C, -1)
    parts = attended.split(spatial, dim=-1)
    if len(spatial) == 2:
        qkv = parts[0][..., :, None] + parts[1][..., None, :]
    else:
        qkv = parts[0][..., :, None, None] + parts[1][..., None, :, None] + parts[2][..., None, None, :]
    torch.testing.assert_close(ref.kronecker_attention(x, "qkv", heads), qkv)


def test_qkv_output_is_an_outer_sum(device):
    """out[i, j] = l_i + h_j: every 2x2 minor out[i, j] - out[i, 0] - out[0, j] + out[0, 0] vanishes (2-D), and in
    3-D out[t, i, j] is a sum of three per-axis terms (inclusion-exclusion over the axes vanishes too)."""
    out = kronecker_attention(torch.randn(2, 4, 6, 5, device=device), "qkv", heads=2)
    minor = out - out[..., :, :1] - out[..., :1, :] + out[..., :1, :1]
    torch.testing.assert_close(minor, torch.zeros_like(minor), atol=1e-5, rtol=0)
    out = kronecker_attention(torch.randn(1, 2, 3, 4, 5, device=device), "qkv")
    residual = (out - out[..., :1, :, :] - out[..., :, :1, :] - out[..., :, :, :1] + out[..., :1, :1, :]
                + out[..., :1, :, :1] + out[..., :, :1, :1] - out[..., :1, :1, :1])
    torch.testing.assert_close(residual, torch.zeros_like(residual), atol=1e-5, rtol=0)
    # A constant map: every token is that constant, so KV returns it and QKV the sum of two (rows, columns).
    const = torch.full((1, 2, 3, 4), 0.7, device=device)
    torch.testing.assert_close(kronecker_attention(const, "kv"), const)
    torch.testing.assert_close(kronecker_attention(const, "qkv"), 2 * const)


def test_kv_reduces_to_mean_when_scale_is_zero(device):
    """With scale 0 every query weighs the L tokens equally: out = mean of the tokens, for every position."""
    x = torch.randn(2, 4, 5, 3, device=device)
    out = kronecker_attention(x, "kv", heads=2, scale=0.0)
    expected = ref.kronecker_means(x).mean(-1)[..., None, None].expand_as(x)
    torch.testing.assert_close(out, expected)


# ---- autograd and torch.library ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [((1, 2, 2, 3), 2), ((1, 1, 2, 2, 2), 1)], ids=str)
def test_gradcheck(case, mode, device):
    """fp64 end to end in the kernels; a few elements each, as every Jacobian column is one interpreted call."""
    shape, heads = case
    check_gradcheck(functools.partial(kronecker_attention, mode=mode, heads=heads, scale=0.9),
                    [randn(*shape, device=device)])


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode, device):
    x = torch.randn(1, 4, 3, 5, device=device)
    check_opcheck(torch.ops.torchext.kronecker_attention.default, (x, mode, 2, 0.5))
    means = ref.kronecker_means(x)
    check_opcheck(torch.ops.torchext.kronecker_attention_backward.default,
                  (torch.randn_like(x), x if mode == "kv" else None, means, mode, 2, 0.5))


def test_compile(device):
    x = randn(1, 4, 3, 5, device=device)
    check_compile(lambda x: kronecker_attention(x * 2, "kv", 2), [x])


def test_bad_inputs(device):
    x = torch.randn(1, 4, 3, 5, device=device)
    check_raises(lambda: kronecker_attention(x[0]), ValueError, "x must be 4-D [B, C, H, W] or 5-D")
    check_raises(lambda: kronecker_attention(x, heads=3), ValueError, "channels of x (4) must be a multiple")
    check_raises(lambda: kronecker_attention(x, heads=0), ValueError, "heads must be >= 1")
    check_raises(lambda: kronecker_attention(x, heads=2.0), TypeError, "heads must be an int")
    check_raises(lambda: kronecker_attention(x, mode="q"), ValueError, "mode must be one of ('kv', 'qkv')")
    check_raises(lambda: kronecker_attention(x.long()), TypeError, "x must have dtype in")
    check_raises(lambda: kronecker_attention([x]), TypeError, "x must be a torch.Tensor")
    check_raises(lambda: kronecker_attention(x.transpose(2, 3)), ValueError, "contiguous over its spatial dims")
    check_raises(lambda: kronecker_attention(x, scale=float("nan")), ValueError, "scale must be finite")
    backward = torch.ops.torchext.kronecker_attention_backward
    means = ref.kronecker_means(x)
    check_raises(lambda: backward(x, None, means, "kv", 1, 1.0), ValueError, "mode 'kv' needs x")
    check_raises(lambda: backward(x, x, means[..., 1:], "kv", 1, 1.0), ValueError, "means must have shape")
    check_raises(lambda: backward(x, x, means.double(), "kv", 1, 1.0), TypeError, "means must have dtype")
    check_raises(lambda: backward(x, x, means.to("meta"), "kv", 1, 1.0), ValueError, "must be on one device")


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 512), (torch.bfloat16, 512), (torch.float64, 256)])
def test_too_many_tokens_raise_on_every_path(dtype, limit, device):
    """The kernels' one-tile limit holds on the reference path too, so code written on a CPU runs on a GPU."""
    kronecker_attention(torch.randn(1, 1, 1, limit - 1, device=device, dtype=dtype))
    x = torch.randn(1, 1, 1, limit, device=device, dtype=dtype)
    check_raises(lambda: kronecker_attention(x), ValueError, f"{limit + 1} tokens (H + W, + T in 3-D), past the limit")


@pytest.mark.parametrize("shape", [(1, 4, 0, 5), (1, 0, 3, 5), (0, 4, 3, 5)], ids=["no-rows", "no-channels", "batch-0"])
def test_empty_maps_give_empty_outputs(shape, device):
    x = torch.randn(*shape, device=device, requires_grad=True)
    out = kronecker_attention(x, heads=2)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


# ---- nn blocks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_block_2d_is_residual_around_projected_op(mode, device):
    block = KroneckerAttention2d(6, heads=2, mode=mode, inner_channels=4, device=device)
    x = randn(2, 6, 5, 3, device=device)
    y = block(x)
    inner = ref.kronecker_attention(block.in_proj(x), mode, heads=2)
    torch.testing.assert_close(y, x + block.out_proj(inner))
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in block.parameters())
    assert x.grad.isfinite().all()


def test_block_3d_and_no_residual(device):
    block = KroneckerAttention3d(4, heads=2, mode="qkv", residual=False, device=device)
    x = torch.randn(1, 4, 2, 3, 5, device=device)
    torch.testing.assert_close(block(x), block.out_proj(ref.kronecker_attention(block.in_proj(x), "qkv", 2)))
    assert "heads=2" in repr(block)


def test_block_channels_last_input(device):
    """Conv nets often run channels_last: the block feeds the op a contiguous map whatever x's layout."""
    block = KroneckerAttention2d(4, device=device)
    x = torch.randn(2, 4, 5, 6, device=device)
    torch.testing.assert_close(block(x.to(memory_format=torch.channels_last)), block(x))


def test_block_bad_arguments(device):
    check_raises(lambda: KroneckerAttention2d(6, heads=4), ValueError, "inner_channels (6) must be a multiple")
    check_raises(lambda: KroneckerAttention2d(6, mode="full"), ValueError, "mode must be one of")
    block = KroneckerAttention3d(4, device=device)
    check_raises(lambda: block(torch.randn(1, 4, 3, 3, device=device)), ValueError, "expected input [B, 4, T, H, W]")
