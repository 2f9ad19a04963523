"""Where KDE attention's error comes from: its LSH retrieval against an oracle, and the sampled part with and without
a per-query shrinkage, all at the same key columns per query (non-causal, dense fp64 on CPU).

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.kde_headroom [--n 1024 4096]

Measured on 2 CPU cores: about 4 minutes at the defaults.

KDE attention spends its c = b + m columns per query on b exact keys (the query's LSH block) and m sampled ones.
This script splits its error into the two choices it makes:
- retrieval: the share of each query's exact attention mass that its b exact keys hold, for the LSH block
  (torchext's plan) and for the oracle, the b keys of largest score (which needs every score: a bound, not a
  method);
- estimation: given the exact keys, m keys drawn uniformly from the others for each query with the weight
  (n - b) / m, then either the plain ratio estimator (KDE attention's) or the same with the sampled part shrunk per
  query towards the block's own softmax average, out = mu_B + lambda (N_S - D_S mu_B) / (D_B + D_S), with the
  positive-part James-Stein factor lambda = max(0, 1 - var / ||N_S - D_S mu_B||^2) and var the samples' own
  estimate of that vector's variance (a prototype: the op does not do this, and its gradient would need the
  factor's derivative).
Columns: cosine / relative Frobenius error of the output to exact attention, averaged over heads (the metric of
examples/kde_quality.py). "heavy c" is the op with bucket c and no samples (the best trivial method on random data),
"KDE b+m" the op at its defaults, "top c" the oracle top c keys alone, "top b + m" and "top b + m, shrunk" the
oracle's b keys with m uniform samples.
"""

import argparse
import math
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from kde_quality import BUCKET, PASSAGE, SAMPLES, clustered, concatenated, exact, gaussian  # noqa: E402
from kv_quality import minilm_data  # noqa: E402

from torchext.ops import kde_attention  # noqa: E402
from torchext.reference import kde_attention as ref  # noqa: E402

COLUMNS = ("LSH mass", "top-b mass", "heavy c", "KDE b+m", "top c", "top b + m", "top b + m, shrunk")


def _scores(q, k):
    return (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5


def lsh_block(q, k, v, seed) -> torch.Tensor:
    """[B, H, n, n] bool: the keys each query attends exactly in the op's plan (its LSH block)."""
    n = q.shape[2]
    plan = ref.make_plan(q, k, v, seed, False, BUCKET, SAMPLES, ref.default_hash_bits(n, BUCKET))
    no_samples = [torch.full_like(level.sample_logw, -math.inf) for level in plan.levels]
    return ref.log_weights(plan, q.shape[1], n, q.device, no_samples) == 0


def top_keys(scores, count) -> torch.Tensor:
    return scores >= scores.topk(count, -1).values[..., -1:]


def sampled(exact_keys, m, seed) -> torch.Tensor:
    """[B, H, n, n] log weight of m keys drawn uniformly without replacement per query outside exact_keys (-inf:
    not drawn); the weight (keys outside) / m makes the sums unbiased."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(exact_keys.shape, generator=g, dtype=torch.float64).masked_fill(exact_keys, 2.0)
    drawn = torch.zeros_like(exact_keys).scatter_(-1, order.topk(m, -1, largest=False).indices, True) & ~exact_keys
    outside = (~exact_keys).sum(-1, keepdim=True).double()
    return torch.where(drawn, torch.log(outside / m), -math.inf)


def estimate(scores, exact_keys, sample_logw, v, m, shrink: bool) -> torch.Tensor:
    """The ratio estimator over exact keys and weighted samples, optionally with the samples shrunk (docstring)."""
    top = scores.amax(-1, keepdim=True)
    e_block = torch.where(exact_keys, torch.exp(scores - top), 0.0)
    e_sample = torch.exp(scores - top + sample_logw)  # weight x e^s, 0 where not drawn
    d_block, d_sample = e_block.sum(-1, keepdim=True), e_sample.sum(-1, keepdim=True)
    n_block, n_sample = e_block @ v, e_sample @ v
    if not shrink:
        return (n_block + n_sample) / (d_block + d_sample)
    mu_block = n_block / d_block
    residual = n_sample - d_sample * mu_block  # sum over samples of y_l = w e^s (v_l - mu_block)
    squares = e_sample ** 2  # sum_l ||y_l||^2 = sum_j w^2 e^2s ||v_j - mu_block||^2, expanded
    sum_sq = (squares @ (v * v).sum(-1, keepdim=True) - 2 * ((squares @ v) * mu_block).sum(-1, keepdim=True)
              + squares.sum(-1, keepdim=True) * (mu_block * mu_block).sum(-1, keepdim=True))
    norm_sq = (residual * residual).sum(-1, keepdim=True)
    variance = m / (m - 1) * (sum_sq - norm_sq / m)
    factor = (1 - variance / norm_sq.clamp_min(torch.finfo(norm_sq.dtype).tiny)).clamp(0, 1)
    return mu_block + factor * residual / (d_block + d_sample)


def _metrics(out, truth) -> tuple[float, float]:
    o, e = out.flatten(2), truth.flatten(2)
    return (float(torch.nn.functional.cosine_similarity(o, e, dim=-1).mean()),
            float(((o - e).norm(dim=-1) / e.norm(dim=-1)).mean()))


def measure(q, k, v, seed) -> dict[str, tuple[float, float]]:
    b, m = BUCKET, SAMPLES
    scores, truth = _scores(q, k), exact(q, k, v, False)
    probs = torch.softmax(scores, -1)
    block, top_b = lsh_block(q, k, v, seed), top_keys(scores, b)
    return {
        "LSH mass": (float((probs * block).sum(-1).mean()), 0.0),
        "top-b mass": (float((probs * top_b).sum(-1).mean()), 0.0),
        "heavy c": _metrics(kde_attention(q, k, v, bucket_size=b + m, num_samples=0, seed=seed, min_seq_len=0), truth),
        "KDE b+m": _metrics(kde_attention(q, k, v, bucket_size=b, num_samples=m, seed=seed, min_seq_len=0), truth),
        "top c": _metrics(torch.softmax(scores.masked_fill(~top_keys(scores, b + m), -math.inf), -1) @ v, truth),
        "top b + m": _metrics(estimate(scores, top_b, sampled(top_b, m, seed), v, m, False), truth),
        "top b + m, shrunk": _metrics(estimate(scores, top_b, sampled(top_b, m, seed), v, m, True), truth),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    args = p.parse_args()
    torch.set_num_threads(2)
    minilm = minilm_data(types.SimpleNamespace(sequences=max(args.n) // PASSAGE))["evaluation"]
    datasets = {"Gaussian d 64, temperature 1": lambda n: [gaussian(n, 64, 1.0, 0)],
                "clustered d 64": lambda n: [clustered(n, 64, 0)],
                "MiniLM (d 32), layers 1, 3, 6": lambda n: [concatenated(minilm, layer, n, 4) for layer in (0, 2, 5)]}
    print("| data | n | " + " | ".join(COLUMNS) + " |\n|---|---|" + "---|" * len(COLUMNS), flush=True)
    for name, make in datasets.items():
        for n in args.n:
            rows = [measure(q, k, v, seed=0) for q, k, v in make(n)]
            cells = []
            for column in COLUMNS:
                cosine, frobenius = (sum(r[column][i] for r in rows) / len(rows) for i in (0, 1))
                cells.append(f"{cosine:.3f}" if "mass" in column else f"{cosine:.3f} / {frobenius:.3f}")
            print(f"| {name} | {n} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
