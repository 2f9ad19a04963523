"""Tensor (triple-wise) attention layer: Alman & Song (arXiv 2310.04064), or 2-simplicial attention with windows
(Roy et al., arXiv 2507.02754).

    attn = TensorAttention(d_model=512, n_heads=8, n_kv_heads=2, window=(512, 32))
    y = attn(x)                                    # x, y: [batch, seq, d_model]

Roy et al. use a 2-simplicial layer every 4th layer of a model and ordinary attention elsewhere; which layers
use it is the model's choice.
"""

from torch import Tensor, nn

from torchext.ops._checks import check_float, check_int, check_ints, check_tensor
from torchext.ops._tensor_attention import tensor_attention


class TensorAttention(nn.Module):
    """Multi-head tensor attention with its projections: q, two keys, two values, and the output.

    o_i = sum_(j,k) softmax_(j,k)(scale <q_i, k1_j * k2_k>) (v1_j * v2_k) per head (torchext.ops.tensor_attention),
    then ``out`` maps the concatenated heads back to d_model.

    Args:
        d_model: model width; head_dim = d_model // n_heads.
        n_heads: query heads.
        n_kv_heads: heads of k1, k2, v1, v2 (GQA); n_heads must be a multiple. Default n_heads.
        window: None (every causal pair: O(seq^3), for short sequences) or (w1, w2), the 2-simplicial windows.
        causal: j <= i and k <= i (must be True with a window).
        scale: logit scale, default 1 / sqrt(head_dim).
        bias: biases in the projections.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None,
                 window: tuple[int, int] | None = None, causal: bool = True, scale: float | None = None,
                 bias: bool = False, device=None, dtype=None):
        super().__init__()
        name = "TensorAttention"
        check_int(name, "d_model", d_model, minimum=1)
        check_int(name, "n_heads", n_heads, minimum=1)
        n_kv_heads = n_kv_heads or n_heads
        check_int(name, "n_kv_heads", n_kv_heads, minimum=1)
        if window is not None:
            check_ints(name, "window", window, length=2, minimum=1)
        if scale is not None:
            check_float(name, "scale", scale)
        if d_model % n_heads:
            raise ValueError(f"TensorAttention: d_model ({d_model}) must split into {n_heads} heads")
        if n_heads % n_kv_heads:
            raise ValueError(f"TensorAttention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, d_model // n_heads
        self.window, self.causal, self.scale = None if window is None else tuple(window), causal, scale
        kv_width = n_kv_heads * self.head_dim
        factory = dict(bias=bias, device=device, dtype=dtype)
        self.q = nn.Linear(d_model, d_model, **factory)
        self.k1 = nn.Linear(d_model, kv_width, **factory)
        self.k2 = nn.Linear(d_model, kv_width, **factory)
        self.v1 = nn.Linear(d_model, kv_width, **factory)
        self.v2 = nn.Linear(d_model, kv_width, **factory)
        self.out = nn.Linear(d_model, d_model, **factory)

    def _heads(self, proj: nn.Linear, x: Tensor) -> Tensor:
        """proj(x) as [B, heads, T, head_dim], the heads counted from the projection's width: under tensor
        parallelism (ColwiseParallel on the projections) a rank gets the width of its own heads."""
        B, T, _ = x.shape
        y = proj(x)
        if y.shape[-1] % self.head_dim:
            raise ValueError(f"TensorAttention: a projection gave {y.shape[-1]} features, not whole heads of "
                             f"{self.head_dim}: under tensor parallelism the number of ranks must divide n_heads "
                             f"({self.n_heads}) and n_kv_heads ({self.n_kv_heads})")
        return y.view(B, T, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, seq, d_model] -> [batch, seq, d_model]. Heads are independent, so a head-sharded plan works:
        ColwiseParallel on q, k1, k2, v1, v2 and RowwiseParallel on out (each rank attends its own heads)."""
        check_tensor("TensorAttention", "x", x, ndim=3)
        B, T, d_model = x.shape
        if d_model != self.out.out_features:
            raise ValueError(f"TensorAttention: x must be [batch, seq, {self.out.out_features}], got {tuple(x.shape)}")
        kv = [self._heads(p, x) for p in (self.k1, self.k2, self.v1, self.v2)]
        y = tensor_attention(self._heads(self.q, x), *kv, window=self.window, causal=self.causal, scale=self.scale,
                             return_lse=False)
        return self.out(y.transpose(1, 2).reshape(B, T, -1))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, causal={self.causal}")
