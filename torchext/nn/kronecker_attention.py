"""Kronecker attention blocks (Gao, Wang, Ji, arXiv 2007.08442) for conv nets: drop-in residual blocks on
[B, C, H, W] and [B, C, T, H, W] feature maps.

    block = KroneckerAttention2d(64, heads=4, mode="kv")       # y = x + out(KAO(in(x)))
    y = block(torch.randn(8, 64, 56, 56))                       # same shape as x
"""

from torch import Tensor, nn

from torchext.ops._checks import check_float, check_int
# The module path, not torchext.ops's attribute: there the name kronecker_attention is the function.
from torchext.ops._kronecker_attention import MODES, kronecker_attention


class _KroneckerAttention(nn.Module):
    """x -> x + out_proj(KAO(in_proj(x))) with 1x1 convolutions as projections; see the 2-D and 3-D subclasses."""

    conv: type[nn.Module]
    spatial_dims: int

    def __init__(self, channels: int, heads: int = 1, mode: str = "kv", inner_channels: int | None = None,
                 scale: float | None = None, residual: bool = True, bias: bool = True, device=None, dtype=None):
        super().__init__()
        name = type(self).__name__
        inner = inner_channels or channels
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        check_int(name, "channels", channels, minimum=1)
        check_int(name, "heads", heads, minimum=1)
        if inner_channels is not None:
            check_int(name, "inner_channels", inner_channels, minimum=1)
        if scale is not None:
            check_float(name, "scale", scale)
        if inner % heads:
            raise ValueError(f"{name}: inner_channels ({inner}) must be a multiple of heads ({heads})")
        self.channels, self.inner_channels, self.heads, self.mode = channels, inner, heads, mode
        self.scale, self.residual = scale, residual
        # The paper's operator ties query, key and value to one tensor (Q = X, K = V = the means of X); the input
        # projection learns that tensor, the output projection maps the attended features back.
        self.in_proj = self.conv(channels, inner, 1, bias=bias, device=device, dtype=dtype)
        self.out_proj = self.conv(inner, channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, channels, *spatial] -> the same shape and dtype."""
        if x.dim() != 2 + self.spatial_dims or x.shape[1] != self.channels:
            raise ValueError(f"{type(self).__name__}: expected input [B, {self.channels}, "
                             f"{', '.join('HW' if self.spatial_dims == 2 else 'THW')}], got {tuple(x.shape)}")
        # 1x1 conv outputs follow x's memory format; the kernels stream each channel's spatial block contiguously.
        y = kronecker_attention(self.in_proj(x).contiguous(), self.mode, self.heads, self.scale)
        y = self.out_proj(y)
        return x + y if self.residual else y

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, inner_channels={self.inner_channels}, heads={self.heads}, "
                f"mode={self.mode!r}, residual={self.residual}")


class KroneckerAttention2d(_KroneckerAttention):
    """Kronecker attention block for [B, C, H, W] maps: x + out(KAO(in(x))), with 1x1 Conv2d projections.

    ``mode="kv"``: each of the H*W positions attends to the H + W row and column means (O(HW(H + W)C)).
    ``mode="qkv"``: the H + W means attend among themselves and the output is their outer sum (O((H + W)^2 C)).

    Args:
        channels: C of the input and output.
        heads: channel groups attending independently (inner_channels must divide by it).
        mode: "kv" or "qkv".
        inner_channels: width of the attended features; defaults to channels.
        scale: softmax scale; None means 1 / sqrt(inner_channels / heads).
        residual: add the input (a drop-in block); False returns the attention branch alone.
        bias: biases in the projections.
    """

    conv = nn.Conv2d
    spatial_dims = 2


class KroneckerAttention3d(_KroneckerAttention):
    """Kronecker attention block for [B, C, T, H, W] maps (video, volumes), with 1x1x1 Conv3d projections.

    The tokens are the T + H + W means over frames, rows and columns; otherwise as KroneckerAttention2d.
    """

    conv = nn.Conv3d
    spatial_dims = 3
