"""A correct pre-norm GPT baseline (RMSNorm, RoPE, SwiGLU, untied embeddings), the model nGPT is compared to.

Same interface as torchext.nn.NGPT: ``GPT(GPTConfig(...))(idx, targets) -> (logits, loss)``. Written in
plain PyTorch (F.rms_norm, SDPA) the way a user would; examples/ngpt_vs_gpt.py trains it and
bench/ times its training step against nGPT's.
"""

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from torchext.reference.ngpt import apply_rope, rope_cos_sin


@dataclass
class GPTConfig:
    vocab_size: int
    d_model: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    d_mlp: int | None = None  # 4 * d_model, as nGPT
    max_seq_len: int = 1024
    rope_base: float = 10000.0


class Attention(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.d_model // c.n_heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model, bias=False)
        self.out = nn.Linear(c.d_model, c.d_model, bias=False)
        cos, sin = rope_cos_sin(c.max_seq_len, self.head_dim, c.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).unbind(2)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        q, k = apply_rope(q, cos, sin).to(x.dtype), apply_rope(k, cos, sin).to(x.dtype)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, d))


class SwiGLU(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        d_mlp = c.d_mlp or 4 * c.d_model
        self.up = nn.Linear(c.d_model, 2 * d_mlp, bias=False)
        self.down = nn.Linear(d_mlp, c.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        u, v = self.up(x).chunk(2, dim=-1)
        return self.down(u * F.silu(v))


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.attn_norm, self.attn = nn.RMSNorm(c.d_model), Attention(c)
        self.mlp_norm, self.mlp = nn.RMSNorm(c.d_model), SwiGLU(c)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = nn.RMSNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:  # GPT-2's scaled init of the residual projections
            for proj in (block.attn.out, block.mlp.down):
                nn.init.normal_(proj.weight, std=0.02 / (2 * c.n_layers) ** 0.5)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx: [B, T] int64 -> (logits [B, T, vocab] fp32, mean cross-entropy vs targets or None)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).float()
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def adamw_param_groups(model: nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """Weight decay on matrices only (not norms, not embeddings), as usual for GPT."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
