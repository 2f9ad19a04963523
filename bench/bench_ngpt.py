"""nGPT benchmarks: the fused ops against the plain PyTorch a user writes (after the official nGPT code) and
torch.compile of it, plus one training step of torchext.nn.NGPT against the examples/gpt.py baseline.

    .venv/bin/python bench/run.py --family ngpt                     # the table, JSON and PNG
    .venv/bin/python -m pytest bench/bench_ngpt.py -m gpu            # pytest-benchmark, GPU sizes
    TRITON_INTERPRET=1 .venv/bin/python -m pytest bench --benchmark-disable -q   # CPU smoke test

GPU targets (issue): hypersphere_update at 16384x4096 bf16 moves >= 80% of the HBM peak forward and
backward; an nGPT training step costs <= 1.15x the GPT step.
"""

import math
from functools import cached_property, partial

import pytest
import torch
import torch.nn.functional as F

from bench import sizes
from bench._harness import Case, cases_of, pytest_params, run_benchmark
from examples.gpt import GPT, GPTConfig, adamw_param_groups
from torchext import ops
from torchext.nn import NGPT, NGPTConfig, NormalizedEmbedding, NormalizedLinear, renormalize_after_step
from torchext.reference import ngpt as ref

NgptCase = partial(Case, "ngpt")
BF16, FP32 = torch.bfloat16, torch.float32

# The training-step size of the issue (d_model 1024, 16 heads, 8 layers, 4096 tokens as 4 x 1024) and a tiny
# model for CPU. GPTConfig and NGPTConfig share these field names.
TRAIN_MODEL = dict(vocab_size=50304, d_model=1024, n_layers=8, n_heads=16, max_seq_len=1024)
TRAIN_BATCH = 4
TINY_MODEL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, max_seq_len=64)
# The CPU showcase: a model the size of examples/ngpt_vs_gpt.py's (byte-level, 2 layers), a batch of its steps.
CPU_MODEL = dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_seq_len=128)
CPU_BATCH = 8


def _norm(x, dim=-1):
    """The official code's justnorm: no eps, math in the input dtype."""
    return x / x.norm(p=2, dim=dim, keepdim=True)


# ---- l2_normalize ---------------------------------------------------------------------------------------------------


def _rows_inputs(n, d, device, dtype):
    return (torch.randn(n, d, device=device, dtype=dtype, requires_grad=True),)


def _l2_normalize(n, d, gpu, dtype=BF16):
    return NgptCase("l2_normalize", f"{n}x{d}", dtype, partial(_rows_inputs, n, d), ops.l2_normalize, _norm,
                    ref.l2_normalize, gpu=gpu)


# ---- hypersphere_update ---------------------------------------------------------------------------------------------


def _hypersphere_inputs(n, d, device, dtype):
    h = F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_()  # on the sphere
    h_branch = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
    alpha = (0.05 + 0.01 * torch.randn(d, device=device)).requires_grad_()  # fp32, as ScaledVector stores it
    return h, h_branch, alpha


def _hypersphere_eager(h, h_branch, alpha):
    """The official residual update, without its redundant Norm(h) (h is already unit-norm)."""
    return _norm(h + alpha.abs() * (_norm(h_branch) - h)).type_as(h)


def _hypersphere_update(n, d, gpu, dtype=BF16):
    return NgptCase("hypersphere_update", f"{n}x{d}", dtype, partial(_hypersphere_inputs, n, d),
                    ops.hypersphere_update, _hypersphere_eager, ref.hypersphere_update, gpu=gpu)


# ---- qk_norm_rope ---------------------------------------------------------------------------------------------------


def _qk_inputs(B, T, H, D, device, dtype):
    qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype, requires_grad=True)
    q, k, _ = qkv.unbind(2)  # views of one fused projection, as NormalizedAttention passes them
    cos, sin = ref.rope_cos_sin(T, D, device=device)
    s_qk = (1 + 0.1 * torch.randn(H, D, device=device)).requires_grad_()
    return q, k, cos, sin, s_qk


def _qk_eager(q, k, cos, sin, s_qk):
    """RoPE as examples/gpt.py applies it, then Norm and * s_qk; outputs in the attention layout [B, H, T, D]."""
    q_out = _norm(ref.apply_rope(q, cos, sin)) * s_qk
    k_out = _norm(ref.apply_rope(k, cos, sin)) * s_qk
    return q_out.transpose(1, 2).type_as(q), k_out.transpose(1, 2).type_as(k)


def _qk_norm_rope(B, T, H, D, gpu, dtype=BF16):
    return NgptCase("qk_norm_rope", f"B{B}-T{T}-H{H}-D{D}", dtype, partial(_qk_inputs, B, T, H, D),
                    ops.qk_norm_rope, _qk_eager, ref.qk_norm_rope, gpu=gpu)


# ---- scaled_swiglu --------------------------------------------------------------------------------------------------


def _swiglu_inputs(n, d_mlp, d_model, device, dtype):
    # u and v are halves of one up-projection (as in NormalizedSwiGLU), cosine-sized as in nGPT.
    uv = torch.randn(n, 2 * d_mlp, device=device, dtype=dtype) * d_model**-0.5
    u, v = uv.requires_grad_().chunk(2, dim=-1)
    s_u, s_v = ((1 + 0.1 * torch.randn(d_mlp, device=device)).requires_grad_() for _ in range(2))
    return u, v, s_u, s_v, d_model


def _swiglu_eager(u, v, s_u, s_v, d_model):
    return ((u * s_u) * F.silu(v * (s_v * math.sqrt(d_model)))).type_as(u)


def _scaled_swiglu(n, d_mlp, d_model, gpu, dtype=BF16):
    return NgptCase("scaled_swiglu", f"{n}x{d_mlp}", dtype, partial(_swiglu_inputs, n, d_mlp, d_model),
                    ops.scaled_swiglu, _swiglu_eager, ref.scaled_swiglu, gpu=gpu)


# ---- renormalize_ ---------------------------------------------------------------------------------------------------


def _model_weights(config, device, dtype):
    """Every matrix torchext.nn.renormalize_model_ keeps on the sphere in an NGPT, nudged off it like an Adam step
    does."""
    model = NGPT(NGPTConfig(**config), device=device)
    layers = [m for m in model.modules() if isinstance(m, (NormalizedLinear, NormalizedEmbedding))]
    weights = [m.weight.detach().to(dtype) for m in layers]
    for w in weights:
        w.add_(torch.randn_like(w), alpha=1e-3)
    return weights, [m.norm_dim for m in layers]


def _renormalize_torchext(weights, dims):
    ops.renormalize_(weights, dims)
    return weights


def _renormalize_eager(weights, dims):
    """The official code's loop: one justnorm and copy per matrix."""
    for w, dim in zip(weights, dims):
        w.copy_(_norm(w, dim))
    return weights


def _renormalize_reference(weights, dims):
    ref.renormalize_(weights, dims)
    return weights


def _renormalize(config, gpu, dtype=torch.float32):
    shape = f"d{config['d_model']}-L{config['n_layers']}-V{config['vocab_size']}"
    return NgptCase("renormalize_", shape, dtype, partial(_model_weights, config), _renormalize_torchext,
                    _renormalize_eager, _renormalize_reference, modes=("fwd",), gpu=gpu)


# ---- one training step: nGPT (torchext) vs the GPT baseline ---------------------------------------------------------


def _step(model, optimizer):
    """forward (on CUDA under bf16 autocast over fp32 parameters; fp32 on CPU), backward, optimizer step (and its
    post-step hooks)."""
    def step(idx, targets):
        with torch.autocast(idx.device.type, dtype=torch.bfloat16, enabled=idx.is_cuda):
            _, loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


class _TrainSteps:
    """The step of each model, built on first use: each provider gets fresh inputs, so only its own model exists."""

    def __init__(self, config, device):
        self.config, self.device = config, device

    @cached_property
    def ngpt(self):
        model = NGPT(NGPTConfig(**self.config), device=self.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # nGPT: Adam, no weight decay
        renormalize_after_step(optimizer, model)  # torchext.nn.renormalize_model_; no host sync per step
        return _step(model, optimizer)

    def _gpt(self, compile_model):
        with self.device:
            model = GPT(GPTConfig(**self.config))
        optimizer = torch.optim.AdamW(adamw_param_groups(model), lr=1e-3)
        return _step(torch.compile(model) if compile_model else model, optimizer)

    @cached_property
    def gpt(self):
        return self._gpt(compile_model=False)

    @cached_property
    def gpt_compiled(self):
        return self._gpt(compile_model=True)


def _train_inputs(config, batch, device, dtype):
    tokens = torch.randint(config["vocab_size"], (batch, config["max_seq_len"] + 1), device=device)
    return _TrainSteps(config, device), tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _train_flops(config, batch):
    """Model FLOPs of one step: 6 per matmul weight per token (fwd + bwd) plus causal attention's 6 T d per layer."""
    c = NGPTConfig(**config)
    d_mlp = c.d_mlp or 4 * c.d_model
    weights = c.n_layers * (4 * c.d_model**2 + 3 * c.d_model * d_mlp) + c.d_model * c.vocab_size
    tokens = batch * c.max_seq_len
    return 6 * tokens * weights + 6 * tokens * c.n_layers * c.max_seq_len * c.d_model


def _train_summary(gpu: bool, ms: dict[str, float]) -> str:
    if "torchext" not in ms or "eager" not in ms:
        return "train_step: no nGPT/GPT ratio (a step failed)"
    compiled = f", {ms['torch.compile']:.1f} ms compiled" if "torch.compile" in ms else ""
    target = " (target <= 1.15x)" if gpu else ""
    return (f"train_step: nGPT (torchext) {ms['torchext']:.1f} ms, GPT {ms['eager']:.1f} ms eager{compiled}; "
            f"nGPT / GPT eager = {ms['torchext'] / ms['eager']:.2f}x{target}")


def _train_step(config=TRAIN_MODEL, batch=TRAIN_BATCH, gpu=True):
    """One training step of nGPT (torchext) against the GPT baseline: bf16 autocast on a GPU, fp32 on the CPU."""
    c = config
    return NgptCase(
        "train_step", f"d{c['d_model']}-L{c['n_layers']}-{batch}x{c['max_seq_len']}", BF16 if gpu else FP32,
        partial(_train_inputs, config, batch),
        torchext=lambda steps, idx, targets: steps.ngpt(idx, targets),
        # The baseline is another model, so its "eager" and "torch.compile" columns are the GPT's steps.
        eager=lambda steps, idx, targets: steps.gpt(idx, targets),
        compiled=lambda steps, idx, targets: steps.gpt_compiled(idx, targets),
        modes=("step",), count_bytes=False, flops={"step": _train_flops(config, batch)}, gpu=gpu,
        rep_ms=2000 if gpu else 300, summary=partial(_train_summary, gpu))


def _renormalize_sized(model, gpu):
    return _renormalize({sizes.TRAIN: TRAIN_MODEL}[model], gpu)


def _train_step_sized(gpu):
    return _train_step()


KINDS = {"l2_normalize": _l2_normalize, "hypersphere_update": _hypersphere_update, "qk_norm_rope": _qk_norm_rope,
         "scaled_swiglu": _scaled_swiglu, "renormalize": _renormalize_sized, "train_step": _train_step_sized}

CASES = [
    # CPU smoke sizes: a few dozen Triton-interpreter programs per launch.
    _l2_normalize(64, 128, gpu=False),
    _hypersphere_update(64, 128, gpu=False),
    _qk_norm_rope(2, 16, 2, 32, gpu=False),
    _scaled_swiglu(64, 128, d_model=32, gpu=False),
    _renormalize(TINY_MODEL, gpu=False),
    *cases_of(sizes.NGPT, KINDS),  # GPU sizes
]

# The CPU showcase (bench/run.py without a GPU): fp32, the reference path against the official code's eager
# PyTorch, at sizes of a few milliseconds or more; then one training step of nGPT against GPT.
CPU_CASES = [
    _l2_normalize(1024, 1024, gpu=False, dtype=FP32),
    _hypersphere_update(1024, 1024, gpu=False, dtype=FP32),
    _qk_norm_rope(2, 256, 8, 64, gpu=False, dtype=FP32),
    _scaled_swiglu(1024, 2048, d_model=512, gpu=False, dtype=FP32),
    _renormalize(dict(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, max_seq_len=256), gpu=False),
    _train_step(CPU_MODEL, CPU_BATCH, gpu=False),
]
SHOWCASE = []  # nGPT's gain (fewer steps to a loss) takes a training run: examples/ngpt_vs_gpt.py


@pytest.mark.parametrize(("case", "provider", "mode"), pytest_params(CASES))
def test_ngpt(benchmark, case, provider, mode):
    run_benchmark(benchmark, case, provider, mode)
