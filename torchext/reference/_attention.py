"""What every attention family's reference and op share: the NaN rule for non-finite keys and values."""

import math

from torch import Tensor


def nonfinite_heads_as_nan(out: Tensor, lse: Tensor, *keys_and_values: Tensor) -> tuple[Tensor, Tensor]:
    """(out [B, H, N, Dv], lse [B, H, N]) with every query head of a kv head whose keys or values [B, Hk, N, *]
    hold a NaN or Inf set to NaN.

    Whether a non-finite key or value reaches a query it is not attended by depends on the kernel's tiling
    (0 * NaN in P V, inf - inf in a tile's running max), and in KDE attention which keys a query attends depends on
    the seed. So a non-finite key or value poisons its whole head, on every path, for every seed and tile size.
    A NaN or Inf in a query reaches only its own row, as in the math.
    """
    finite = keys_and_values[0].isfinite().flatten(2).all(-1)  # [B, Hk]
    for x in keys_and_values[1:]:
        finite = finite & x.isfinite().flatten(2).all(-1)
    bad = (~finite).repeat_interleave(out.shape[1] // finite.shape[1], dim=1)  # [B, H]
    return out.masked_fill(bad[..., None, None], math.nan), lse.masked_fill(bad[..., None], math.nan)
