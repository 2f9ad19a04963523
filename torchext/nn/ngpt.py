"""nGPT layers (Loshchilov et al., arXiv 2410.01131): every vector on the unit hypersphere.

    model = NGPT(NGPTConfig(vocab_size=256, d_model=512, n_layers=8, n_heads=8))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)   # no weight decay, no warmup
    renormalize_after_step(optimizer, model)                     # weights back on the sphere after each step
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchext import _deprecation, ops
from torchext._dtensor import DTensor
from torchext.ops._checks import check_float, check_int, check_tensor
from torchext.reference.ngpt import DEFAULT_EPS, rope_cos_sin


class ScaledVector(nn.Module):
    """A trainable vector stored as p = s_scale and used as p * (s_init / s_scale) (section 2.5).

    Decoupling the stored value from the used one sets the vector's effective Adam learning rate
    without touching the global one. Stored in fp32. ``size`` is an int >= 0 and ``init``, ``scale`` finite
    numbers, ``scale`` nonzero (TypeError / ValueError otherwise).
    """

    def __init__(self, size: int, init: float, scale: float, device=None):
        super().__init__()
        check_int("ScaledVector", "size", size, minimum=0)
        check_float("ScaledVector", "init", init)
        check_float("ScaledVector", "scale", scale)
        if scale == 0:
            raise ValueError("ScaledVector: scale must be nonzero (the vector is used as param * init / scale)")
        self.init, self.scale = init, scale
        self.param = nn.Parameter(torch.full((size,), scale, dtype=torch.float32, device=device))

    def forward(self) -> Tensor:
        return self.param * (self.init / self.scale)

    def extra_repr(self) -> str:
        return f"size={self.param.numel()}, init={self.init:g}, scale={self.scale:g}"


@torch.no_grad()
def _random_unit_(weight: Tensor, norm_dim: int) -> None:
    """Random unit vectors along norm_dim, uniform on the sphere (normal draws put on it: their scale is moot, so an
    empty weight needs no special case)."""
    weight.normal_()
    ops.renormalize_([weight], [norm_dim])


def _check_hidden(module: str, h: Tensor, d_model: int, batch_and_seq: bool = False) -> None:
    """h is a float tensor [..., d_model] ([batch, seq, d_model] when batch_and_seq), or an error naming the module."""
    check_tensor(module, "h", h)
    layout = "[batch, seq, d_model]" if batch_and_seq else "[..., d_model]"
    if (batch_and_seq and h.dim() != 3) or h.shape[-1] != d_model:
        raise ValueError(f"{module}: h must be {layout} with d_model = {d_model}, got shape {tuple(h.shape)}")


def _refuse_tensor_parallel(module: str, fused: nn.Linear, out: nn.Linear, layout: str, scales: str) -> None:
    """nGPT's fused projections cannot be split by torch's ColwiseParallel, and their scale vectors would not follow:
    refuse a tensor-parallel plan on either projection instead of computing with mismatched pieces. Under FSDP2 the
    forward sees plain gathered weights, so this costs two isinstance per call and never fires there."""
    if isinstance(fused.weight, DTensor) or isinstance(out.weight, DTensor):
        raise NotImplementedError(
            f"{module}: tensor parallelism is not supported: its fused weight holds {layout} as contiguous row blocks, "
            f"which ColwiseParallel would cut into blocks that are not whole heads / units, and {scales} (outside any "
            f"nn.Linear) would not be sharded to match. Shard nGPT with fully_shard (FSDP2) or DDP instead")


class NormalizedLinear(nn.Linear):
    """A bias-free Linear whose weight [out, in] has unit vectors along the embedding axis.

    ``norm_dim=1`` normalises rows (the input is the embedding: q/k/v, MLP up-projections, LM head);
    ``norm_dim=0`` normalises columns (the output is the embedding: attention and MLP out-projections).
    The weight stays unit-norm through ``renormalize_model_(model)`` after each optimizer step.
    """

    def __init__(self, in_features: int, out_features: int, norm_dim: int = 1, device=None, dtype=None):
        if norm_dim not in (0, 1):
            raise ValueError(f"NormalizedLinear: norm_dim must be 0 (columns) or 1 (rows), got {norm_dim}")
        self.norm_dim = norm_dim
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        _random_unit_(self.weight, self.norm_dim)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, norm_dim={self.norm_dim}"


class NormalizedEmbedding(nn.Embedding):
    """An Embedding whose rows are unit vectors (the input embedding E_in of nGPT)."""

    norm_dim = 1

    def reset_parameters(self) -> None:
        _random_unit_(self.weight, self.norm_dim)


class HypersphereResidual(nn.Module):
    """h <- Norm(h + |alpha| (Norm(h_branch) - h)) with per-dimension eigen learning rates alpha (eqs. 10-11)."""

    def __init__(self, d_model: int, alpha_init: float = 0.05, alpha_scale: float | None = None, device=None):
        super().__init__()
        self.alpha = ScaledVector(d_model, alpha_init, alpha_scale or d_model ** -0.5, device=device)

    def forward(self, h: Tensor, h_branch: Tensor) -> Tensor:
        """h, h_branch: [..., d_model] -> [..., d_model] in h's dtype."""
        return ops.hypersphere_update(h, h_branch, self.alpha())


class NormalizedAttention(nn.Module):
    """nGPT attention: fused QKV, RoPE -> Norm -> * s_qk on q and k, softmax scale sqrt(d_k) (section 2.3.2).

    The RoPE is a true rotation of the pairs (x_i, x_{i + d_k/2}) (the official code's is not, see
    ../shared/research/ngpt.md); SDPA does the attention.
    """

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int = 2048, rope_base: float = 10000.0,
                 causal: bool = True, s_qk_init: float = 1.0, s_qk_scale: float | None = None, device=None):
        super().__init__()
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"NormalizedAttention: d_model ({d_model}) must split into {n_heads} heads of even size")
        self.n_heads, self.head_dim, self.causal = n_heads, d_model // n_heads, causal
        self.qkv = NormalizedLinear(d_model, 3 * d_model, norm_dim=1, device=device)
        self.out = NormalizedLinear(d_model, d_model, norm_dim=0, device=device)
        self.s_qk = ScaledVector(d_model, s_qk_init, s_qk_scale or d_model ** -0.5, device=device)
        cos, sin = rope_cos_sin(max_seq_len, self.head_dim, rope_base, device=device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, h: Tensor) -> Tensor:
        """h: [B, T, d_model] -> [B, T, d_model], T <= max_seq_len."""
        _check_hidden("NormalizedAttention", h, self.n_heads * self.head_dim, batch_and_seq=True)
        _refuse_tensor_parallel("NormalizedAttention", self.qkv, self.out, "q | k | v", "the per-head s_qk")
        B, T, d_model = h.shape
        if T > self.rope_cos.shape[0]:
            raise ValueError(f"NormalizedAttention: sequence length {T} exceeds max_seq_len {self.rope_cos.shape[0]}")
        q, k, v = self.qkv(h).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)  # [B, T, H, D] views
        q, k = ops.qk_norm_rope(q, k, self.rope_cos, self.rope_sin, self.s_qk().view(self.n_heads, self.head_dim))
        y = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=self.causal,
                                           scale=math.sqrt(self.head_dim))
        return self.out(y.transpose(1, 2).reshape(B, T, d_model))


class NormalizedSwiGLU(nn.Module):
    """nGPT MLP: (u * s_u) * SiLU(v * s_v * sqrt(d_model)) with unit-norm up and down projections (section 2.4)."""

    def __init__(self, d_model: int, d_mlp: int | None = None, s_uv_init: float = 1.0, s_uv_scale: float = 1.0,
                 device=None):
        super().__init__()
        self.d_model, d_mlp = d_model, d_mlp or 4 * d_model
        self.up = NormalizedLinear(d_model, 2 * d_mlp, norm_dim=1, device=device)  # W_u and W_v stacked
        self.down = NormalizedLinear(d_mlp, d_model, norm_dim=0, device=device)
        self.s_u = ScaledVector(d_mlp, s_uv_init, s_uv_scale, device=device)
        self.s_v = ScaledVector(d_mlp, s_uv_init, s_uv_scale, device=device)

    def forward(self, h: Tensor) -> Tensor:
        """h: [..., d_model] -> [..., d_model]."""
        _check_hidden("NormalizedSwiGLU", h, self.d_model)
        _refuse_tensor_parallel("NormalizedSwiGLU", self.up, self.down, "W_u | W_v", "s_u and s_v")
        u, v = self.up(h).chunk(2, dim=-1)
        return self.down(ops.scaled_swiglu(u, v, self.s_u(), self.s_v(), self.d_model))


@dataclass
class NGPTConfig:
    """nGPT hyper-parameters; defaults are the paper's (section 2.6, the s_init / s_scale table)."""

    vocab_size: int
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    d_mlp: int | None = None  # 4 * d_model
    max_seq_len: int = 1024
    rope_base: float = 10000.0
    alpha_init: float = 0.05  # alpha_A and alpha_M, "of order 1/n_layers"
    alpha_scale: float | None = None  # 1/sqrt(d_model)
    s_qk_init: float = 1.0
    s_qk_scale: float | None = None  # 1/sqrt(d_model)
    s_uv_init: float = 1.0
    s_uv_scale: float = 1.0
    s_z_init: float = 1.0
    s_z_scale: float | None = None  # 1/sqrt(d_model)


class NGPTBlock(nn.Module):
    """h <- Norm(h + alpha_A (Norm(Attn(h)) - h)); h <- Norm(h + alpha_M (Norm(MLP(h)) - h))."""

    def __init__(self, config: NGPTConfig, device=None):
        super().__init__()
        c = config
        self.attn = NormalizedAttention(c.d_model, c.n_heads, c.max_seq_len, c.rope_base, True, c.s_qk_init,
                                        c.s_qk_scale, device=device)
        self.attn_residual = HypersphereResidual(c.d_model, c.alpha_init, c.alpha_scale, device=device)
        self.mlp = NormalizedSwiGLU(c.d_model, c.d_mlp, c.s_uv_init, c.s_uv_scale, device=device)
        self.mlp_residual = HypersphereResidual(c.d_model, c.alpha_init, c.alpha_scale, device=device)

    def forward(self, h: Tensor) -> Tensor:
        h = self.attn_residual(h, self.attn(h))
        return self.mlp_residual(h, self.mlp(h))


class NGPT(nn.Module):
    """A causal nGPT language model: unit-norm embeddings, NGPTBlocks, untied unit-norm head, logits * s_z."""

    def __init__(self, config: NGPTConfig, device=None):
        super().__init__()
        c = self.config = config
        self.embed = NormalizedEmbedding(c.vocab_size, c.d_model, device=device)
        self.blocks = nn.ModuleList(NGPTBlock(c, device=device) for _ in range(c.n_layers))
        self.head = NormalizedLinear(c.d_model, c.vocab_size, norm_dim=1, device=device)
        self.s_z = ScaledVector(c.vocab_size, c.s_z_init, c.s_z_scale or c.d_model ** -0.5, device=device)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: [B, T] int64 token ids -> (logits [B, T, vocab] fp32, mean cross-entropy vs targets or None)."""
        h = self.embed(idx)
        for block in self.blocks:
            h = block(h)
        logits = self.head(h).float() * self.s_z()  # no final norm: h is already unit-norm
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _normalized_weights(model: nn.Module) -> tuple[list[Tensor], list[int]]:
    layers = [m for m in model.modules() if isinstance(m, (NormalizedLinear, NormalizedEmbedding))]
    return [m.weight for m in layers], [m.norm_dim for m in layers]


@torch.no_grad()
def renormalize_model_(model: nn.Module, eps: float = DEFAULT_EPS, check: bool = False) -> Tensor:
    """Put every NormalizedLinear / NormalizedEmbedding weight of ``model`` back on the unit sphere, in one launch.

    Returns the int32 zero-vector count of each weight (see torchext.ops.renormalize_), with no host read;
    ``check=True`` reads it and raises ValueError on a zero row/column (one host sync).
    """
    weights, dims = _normalized_weights(model)
    if not weights:
        return torch.zeros(0, dtype=torch.int32)
    return ops.renormalize_(weights, dims, eps=eps, check=check)


class RenormalizeAfterStep:
    """The optimizer hook of renormalize_after_step: ``renormalize_model_(model)`` after every ``optimizer.step()``.

    Sync-free (CUDA-graph capturable): each step adds its zero-vector counts to ``zero_vectors``, an int64
    scalar on the weights' device, and ``check()`` reads it (one host sync) whenever the caller already syncs,
    e.g. when logging the loss. ``check_every_step=True`` raises at the step itself (a debug mode).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, eps: float = DEFAULT_EPS,
                 check_every_step: bool = False):
        self.model, self.eps, self.check_every_step = model, eps, check_every_step
        self.zero_vectors: Tensor | None = None
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, *_) -> None:
        counts = renormalize_model_(self.model, eps=self.eps, check=self.check_every_step)
        if self.zero_vectors is None or self.zero_vectors.device != counts.device:
            self.zero_vectors = torch.zeros((), dtype=torch.int64, device=counts.device)
        self.zero_vectors += counts.sum()

    def check(self) -> None:
        """Raise ValueError if any step since the hook was made met a zero row/column (reads one scalar)."""
        if self.zero_vectors is not None and bool(self.zero_vectors):
            raise ValueError(f"renormalize_after_step: {int(self.zero_vectors)} zero vectors (norm 0) met since the "
                             f"hook was made; nGPT needs every row/column to have a direction (was a weight "
                             f"zero-initialised?)")

    def remove(self) -> None:
        self._handle.remove()


def renormalize_after_step(optimizer: torch.optim.Optimizer, model: nn.Module, eps: float = DEFAULT_EPS,
                           check_every_step: bool = False) -> RenormalizeAfterStep:
    """Run ``renormalize_model_(model)`` after every ``optimizer.step()``, with no host sync; returns the hook
    (``.check()`` raises if a zero row/column was met, ``.remove()`` detaches it)."""
    return RenormalizeAfterStep(optimizer, model, eps, check_every_step)



# renormalize_model_ was renormalize_, the name of the op torchext.ops.renormalize_ (which takes tensors and dims).
_RENAMED = {"renormalize_": (renormalize_model_, "torchext.nn.renormalize_model_")}


def __getattr__(name: str):
    return _deprecation.renamed_attribute(__name__, name, _RENAMED)
