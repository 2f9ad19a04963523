"""The online softmax every attention kernel shares (FlashAttention's running max, sum and output, base 2).

A row's state is (m, l, acc): the largest score seen, sum exp2(s - m) and sum exp2(s - m) v. It follows the math
where scores are not finite, with no finite stand-in for a masked score (a stand-in such as -1e30 outranks real
scores below it: queries of 1e30 gave 0 / 0):

- masked scores are -inf and their probabilities are selected to 0, so a row with nothing attended (yet) keeps
  m = -inf, l = 0, acc = 0 and finishes as out 0, lse -inf;
- an attended score of -inf or +inf meets a running max of the same infinity: exp2(inf - inf) = NaN, as in the
  softmax (a row of -inf is 0 / 0; a +inf beside anything is inf / inf); its lse is that infinity, as logsumexp's;
- a NaN score makes the row's max NaN (tl.max would drop it), hence out and lse NaN.
"""

import triton
import triton.language as tl

from ._launch import dot


@triton.jit
def maximum_nan(a, b):
    """tl.maximum that keeps NaN (tl.maximum drops it)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis: tl.constexpr):
    """tl.max over axis, NaN where a NaN is among the values (tl.max drops NaN)."""
    return tl.reduce(x, axis, maximum_nan)


@triton.jit
def rescale(m_old, m_new):
    """exp2(m_old - m_new): what a state kept at max m_old is multiplied by at the max m_new >= m_old. 1 where they
    are equal: two -infs (nothing seen) or two +infs (whose sums are NaN already) would give exp2(NaN)."""
    return tl.where(m_old == m_new, 1.0, tl.exp2(m_old - m_new))


@triton.jit
def online_softmax_step(m, row_sum, acc, s, mask, v, DOT: tl.constexpr):
    """Fold one tile of scores s [R, C] (log2 units; mask [R, C] or [1, C]: the scores that exist) over values
    v [C, Dv] into the running state m [R], row_sum [R], acc [R, Dv]. Returns the new (m, row_sum, acc)."""
    s = tl.where(mask, s, -float("inf"))
    m_new = maximum_nan(m, max_nan(s, 1))
    alpha = rescale(m, m_new)
    p = tl.where(mask, tl.exp2(s - m_new[:, None]), 0.0)  # an attended -inf under a max of -inf: NaN (0 / 0)
    return m_new, row_sum * alpha + tl.sum(p, 1), dot(p, v, acc * alpha[:, None], DOT)


@triton.jit
def softmax_result(m, row_sum, acc):
    """(out = acc / row_sum [R, Dv], lse = m + log2(row_sum) [R], log2 units) of a final state: 0 and -inf for a row
    that attended nothing, lse = m where m is infinite (the row's out is then NaN, its row_sum is 0 or NaN)."""
    row_sum_safe = tl.where(row_sum == 0, 1.0, row_sum)  # NaN stays NaN
    lse = tl.where(tl.abs(m) == float("inf"), m, m + tl.log2(row_sum_safe))
    return acc / row_sum_safe[:, None], lse
