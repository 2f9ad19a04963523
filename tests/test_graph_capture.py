"""The hot paths make no host read, so they run without a sync and can be captured in a CUDA graph.

On CPU, each path runs under harness.NoHostReads, which fails on any op that would read the host on a GPU
(``.item()``, ``nonzero``, boolean masks, ``torch.tensor`` of a list), including inside the Triton-backed ops.
On a GPU (``gpu`` marker) each path is captured in a CUDA graph and its replays are compared with eager runs.
Paths: an nGPT optimizer step with renormalize_after_step, an int8 linear layer (dynamic outlier columns), a
KVQuant decode step (append + attention) and a KDE attention forward.
"""

import copy

import pytest
import torch
from harness import NoHostReads

from torchext import ops
from torchext.nn import NGPT, Int8Linear, NGPTConfig, renormalize_after_step
from torchext.nn.kv_quant import key_ranges

KDE = dict(min_seq_len=0, bucket_size=16, num_samples=8)


def tiny_ngpt(device):
    torch.manual_seed(0)
    return NGPT(NGPTConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16), device=device)


def train_step(model, optimizer, tokens):
    _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    optimizer.step()
    return loss


def int8_layer(device, in_features=64):
    torch.manual_seed(0)
    return Int8Linear.from_float(torch.nn.Linear(in_features, 48, device=device), threshold=6.0)


def activations(outlier_columns, device, in_features=64):
    """[4, in_features] activations with exactly ``outlier_columns`` columns past the threshold."""
    x = torch.randn(4, in_features, device=device).clamp(-3, 3)
    x[1, :outlier_columns] = 8.0
    return x


def kv_cache(device, capacity=40, kv_heads=2, head_dim=32):
    offset, scale = key_ranges(torch.randn(64, kv_heads, head_dim) * 1.5, 0.01)
    codebook = ops.make_codebook(4, 4, offset.to(device), scale.to(device))
    storage = ops.allocate_storage(2, kv_heads, head_dim, capacity, codebook, 1, 1, 4, torch.float32, device)
    k = torch.randn(2, kv_heads, 12, head_dim, device=device)
    ops.kv_quant_append_(storage, codebook, k, torch.randn_like(k))
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    return storage, codebook, inv_freq


def decode_step(storage, codebook, inv_freq, k, v, q):
    ops.kv_quant_append_(storage, codebook, k, v)
    return ops.kv_quant_decode_attention(q, storage, codebook, inv_freq)


# ---- CPU: no host reads ---------------------------------------------------------------------------------------------


def test_ngpt_step_with_renormalize_after_step_reads_nothing():
    model = tiny_ngpt("cpu")
    # SGD: Adam reads its step counter on the host unless capturable=True, which CPU parameters cannot take.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    hook = renormalize_after_step(optimizer, model)
    tokens = torch.randint(0, 64, (2, 9))
    with NoHostReads():
        for _ in range(2):
            optimizer.zero_grad()
            train_step(model, optimizer, tokens)
    hook.check()


@pytest.mark.parametrize("outlier_columns", [0, 1, 64])
def test_int8_linear_reads_nothing(outlier_columns):
    layer, x = int8_layer("cpu"), activations(outlier_columns, "cpu")
    with NoHostReads():
        layer(x)


def test_kv_quant_decode_step_reads_nothing():
    storage, codebook, inv_freq = kv_cache("cpu")
    k = torch.randn(2, 2, 1, 32)
    with NoHostReads():
        decode_step(storage, codebook, inv_freq, k, torch.randn_like(k), torch.randn(2, 4, 1, 32))


@pytest.mark.parametrize("seed", [None, 5, "tensor"])
def test_kde_attention_forward_reads_nothing(seed):
    q = torch.randn(1, 2, 48, 16)
    seed = torch.tensor(5) if seed == "tensor" else seed
    with NoHostReads():
        ops.kde_attention(q, q, q, seed=seed, **KDE)
        ops.kde_attention(q, q, q, seed=seed, causal=True, exact_window=16, **KDE)


def test_no_host_reads_catches_one():
    """The mode itself: an .item(), a boolean mask and torch.tensor of a list each fail."""
    x = torch.randn(4)
    for read in (lambda: x.sum().item(), lambda: x[x > 0], lambda: torch.tensor([1.0, 2.0])):
        with pytest.raises(AssertionError, match="host read"), NoHostReads():
            read()


# ---- GPU: CUDA-graph capture and replay -----------------------------------------------------------------------------


def capture(fn):
    """fn warmed up on a side stream (as torch.cuda.graphs asks), then captured: (graph, its static output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.gpu
def test_ngpt_step_captured_matches_eager():
    model, tokens = tiny_ngpt("cuda"), torch.randint(0, 64, (2, 9), device="cuda")
    eager = copy.deepcopy(model)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, capturable=True) for m in (model, eager)]
    hooks = [renormalize_after_step(opt, m) for opt, m in zip(optimizers, (model, eager))]
    graph, _ = capture(lambda: train_step(model, optimizers[0], tokens))  # warm-up + capture: two steps
    for _ in range(2):
        eager.zero_grad(set_to_none=False)
        train_step(eager, optimizers[1], tokens)
    for _ in range(3):
        graph.replay()
        eager.zero_grad(set_to_none=False)
        train_step(eager, optimizers[1], tokens)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    for hook in hooks:
        hook.check()


@pytest.mark.gpu
def test_int8_linear_captured_is_exact_at_any_outlier_count():
    layer = int8_layer("cuda", in_features=128)
    x = activations(0, "cuda", 128)
    graph, out = capture(lambda: layer(x))
    for columns in (0, 1, 64, 65, 128):  # the outlier list's length changes between replays; no host sync
        x.copy_(activations(columns, "cuda", 128))
        graph.replay()
        torch.testing.assert_close(out, layer(x), atol=0, rtol=0,
                                   msg=lambda m, columns=columns: f"{columns} outlier columns: {m}")


@pytest.mark.gpu
def test_kv_quant_decode_step_captured_matches_eager():
    storage, codebook, inv_freq = kv_cache("cuda")
    eager = type(storage)(*(t.clone() for t in storage))
    k, v, q = torch.randn(2, 2, 1, 32, device="cuda"), torch.randn(2, 2, 1, 32, device="cuda"), \
        torch.randn(2, 4, 1, 32, device="cuda")
    graph, out = capture(lambda: decode_step(storage, codebook, inv_freq, k, v, q))  # appends twice
    decode_step(eager, codebook, inv_freq, k, v, q)
    decode_step(eager, codebook, inv_freq, k, v, q)
    for _ in range(5):  # each replay appends the token in k, v and attends over the grown cache
        for t in (k, v, q):
            t.normal_()
        graph.replay()
        torch.testing.assert_close(out, decode_step(eager, codebook, inv_freq, k, v, q))
    torch.testing.assert_close(storage.lengths, eager.lengths)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_kde_attention_captured_matches_eager(causal):
    q, k, v = (torch.randn(1, 4, 256, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    seed = torch.full((), 3, dtype=torch.int64, device="cuda")
    params = dict(KDE, bucket_size=32, num_samples=16, causal=causal, exact_window=64)
    graph, out = capture(lambda: ops.kde_attention(q, k, v, seed=seed, **params))
    for new_seed in (3, 11):  # a replay draws its plan from what the seed tensor holds
        seed.fill_(new_seed)
        q.normal_()
        graph.replay()
        torch.testing.assert_close(out, ops.kde_attention(q, k, v, seed=new_seed, **params), atol=0, rtol=0)
