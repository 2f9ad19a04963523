"""KVQuant (Hooper et al., arXiv 2401.18079): calibration, a drop-in quantized KV cache, and its memory report.

    config = calibrate(model, batches, bits=4, outlier_fraction=0.01)    # per-layer nuq levels + key ranges
    config = calibrate(model, batches, budget=4.0, window_tokens=32)      # or: per layer the quantizer (KVQuant
                                                                          # or KIVI, bits, outliers) with the
                                                                          # least attention error at 4 bits/element
    config.save("kvquant.safetensors")
    cache = KVQuantCache(config, model, max_length=8192)                 # a transformers.Cache
    out = model.generate(input_ids, **cache_kwargs(model, cache), max_new_tokens=64)
    print(cache.memory_report())

The cache takes the post-RoPE keys a Hugging Face attention layer hands it, un-rotates them (at each sequence's
own positions; a left-padded batch is stored without its pads) and stores them quantized before RoPE. Prefill
attends over the new tokens in 16-bit and then packs them; each decode step appends the new token and runs the
fused Triton decode attention over the packed cache (the "kvquant" attention implementation, which the cache
installs on the model it is given). Beam search, crop (assisted generation) and reuse across generate calls work
as with a DynamicCache.
"""

import inspect
import itertools
import json
import math
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchext import ops
from torchext.ops._checks import check_float, check_int
from torchext.ops._kv_quant import allocate_storage, bytes_per_position, check_bits, make_codebook
from torchext.reference import kv_quant as ref

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.cache_utils import Cache as _HFCache
    from transformers.cache_utils import CacheLayerMixin as _HFLayer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask
except ImportError:  # transformers is an optional extra: the cache then works on its own
    _HFCache = _HFLayer = None

MAX_CALIBRATION_SAMPLES = 1 << 20  # per layer and tensor: k-means on more changes the levels by nothing visible


@dataclass(frozen=True)
class Quantizer:
    """One layer's quantizer: what `calibrate(budget=...)` chooses per layer.

    key_group 0 is KVQuant: per-channel key ranges fixed per layer (before RoPE), levels fitted by k-means (nuq)
    or uniform, outlier_fraction of each vector kept exactly (dense-and-sparse). key_group G >= 2 is the KIVI
    mode: per-channel key ranges of every G positions (min-max, stored in the cache), uniform levels. Values are
    quantized per token in both.
    """
    key_bits: int
    value_bits: int
    outlier_fraction: float = 0.0
    key_group: int = 0
    nuq: bool = True

    def slots(self, head_dim: int) -> int:
        """Outlier slots per [head_dim] vector."""
        return ref.outlier_slots(head_dim, self.outlier_fraction)

    def bits_per_element(self, head_dim: int, dtype: torch.dtype = torch.float16) -> float:
        """What one quantized position costs per cached element (keys and values together) in a cache of `dtype`:
        codes as packed, value offsets and scales, outlier slots, the KIVI mode's share of its group ranges. The
        16-bit sink and window are apart (memory_report counts everything)."""
        spec = ref.layout(1, 1, 1, head_dim, self.slots(head_dim), 0, 0, self.key_bits, self.value_bits, dtype)
        packed = sum(math.prod(shape) * dt.itemsize for name, (shape, dt) in spec.items() if name in ref.PACKED)
        groups = 2 * head_dim * dtype.itemsize / self.key_group if self.key_group else 0.0
        return 8 * (packed + groups) / (2 * head_dim)

    def __str__(self) -> str:
        bits = f"K{self.key_bits}V{self.value_bits}"
        if self.key_group:
            return f"KIVI mode {bits} group {self.key_group}"
        levels = "nuq" if self.nuq else "uniform"
        return f"KVQuant {bits} {levels}" + (f" outliers {self.outlier_fraction:g}" if self.outlier_fraction else "")


@dataclass
class KVQuantConfig:
    """What a KVQuantCache needs, every part of the method switchable.

    key_bits, value_bits: 2, 3 or 4. outlier_fraction: dense-and-sparse share per vector (0 disables).
    sink_tokens: leading positions kept in 16-bit; window_tokens: most recent positions kept in 16-bit.
    pre_rope: quantize keys before RoPE (the paper) or after (the ablation). layers: per-layer calibration
    (`calibrate`); empty means uniform levels with key ranges taken from each layer's first prefill.
    key_group: 0 for KVQuant's per-layer key ranges, G >= 2 for the KIVI mode (window_tokens >= G).
    quantizers: one Quantizer per layer (calibrate(budget=...) fills it), overriding the four fields above.
    """
    key_bits: int = 4
    value_bits: int = 4
    outlier_fraction: float = 0.01
    sink_tokens: int = 1
    window_tokens: int = 0
    pre_rope: bool = True
    layers: list[dict[str, Tensor]] = field(default_factory=list)
    key_group: int = 0
    quantizers: list[Quantizer] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            check_bits("KVQuantConfig", name, getattr(self, name))
        check_float("KVQuantConfig", "outlier_fraction", self.outlier_fraction)
        if not 0 <= self.outlier_fraction < 1:
            raise ValueError(f"KVQuantConfig: outlier_fraction must be in [0, 1), got {self.outlier_fraction}")
        for name in ("sink_tokens", "window_tokens", "key_group"):
            check_int("KVQuantConfig", name, getattr(self, name), minimum=0)
        self.quantizers = [q if isinstance(q, Quantizer) else Quantizer(**q) for q in self.quantizers]
        if self.layers and self.quantizers and len(self.layers) != len(self.quantizers):
            raise ValueError(f"KVQuantConfig: {len(self.layers)} calibrated layers but {len(self.quantizers)} "
                             f"quantizers")
        groups = [q.key_group for q in self.quantizers] or [self.key_group]
        if max(groups) > self.window_tokens or 1 in groups:
            raise ValueError(f"KVQuantConfig: the KIVI mode needs key_group >= 2 and window_tokens >= key_group "
                             f"(the window holds the incomplete group), got key_group {max(groups)} and "
                             f"window_tokens {self.window_tokens}")

    def quantizer(self, layer_idx: int) -> Quantizer:
        if self.quantizers:
            return self.quantizers[layer_idx]
        return Quantizer(self.key_bits, self.value_bits, self.outlier_fraction, self.key_group, bool(self.layers))

    def codebook(self, layer_idx: int, device) -> ref.Codebook | None:
        if not self.layers:
            return None
        stats = {name: t.to(device) for name, t in self.layers[layer_idx].items()}
        q = self.quantizer(layer_idx)
        return make_codebook(q.key_bits, q.value_bits, **stats, key_group=q.key_group)

    def save(self, path: str) -> None:
        """safetensors file: tensors `layers.<i>.<name>`, the other fields as JSON metadata."""
        from safetensors.torch import save_file
        settings = {k: v for k, v in asdict(self).items() if k != "layers"}
        tensors = {f"layers.{i}.{name}": t.detach().cpu().clone() for i, stats in enumerate(self.layers)
                   for name, t in stats.items()}
        save_file(tensors, path, metadata={"kvquant": json.dumps(settings)})

    @classmethod
    def load(cls, path: str) -> "KVQuantConfig":
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            settings = json.loads(f.metadata()["kvquant"])
            layers: dict[int, dict[str, Tensor]] = {}
            for key in f.keys():
                _, i, name = key.split(".")
                layers.setdefault(int(i), {})[name] = f.get_tensor(key)
        return cls(**settings, layers=[layers[i] for i in sorted(layers)])


# ---- calibration ----------------------------------------------------------------------------------------------------


def key_ranges(keys: Tensor, outlier_fraction: float) -> tuple[Tensor, Tensor]:
    """Per-channel (offset, scale) [kv_heads, head_dim] of keys [n, kv_heads, head_dim]: the centre and half-width
    of the range between the outlier_fraction/2 and 1 - outlier_fraction/2 quantiles (sec. 3.4: per-channel
    thresholds calibrated offline; what lies outside is an outlier)."""
    ordered = keys.float().sort(0).values
    n = ordered.shape[0]
    tail = min(int(outlier_fraction / 2 * n), (n - 1) // 2)
    lo, hi = ordered[tail], ordered[n - 1 - tail]
    floor = 1e-6 * ordered.abs().amax().clamp_min(1e-30)  # constant channels still get a positive scale
    return (hi + lo) / 2, ((hi - lo) / 2).clamp_min(floor)


def _subsample(x: Tensor, *weights: Tensor | None) -> tuple[Tensor | None, ...]:
    if x.numel() <= MAX_CALIBRATION_SAMPLES:
        return (x, *weights)
    pick = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:MAX_CALIBRATION_SAMPLES]
    return (x[pick], *(None if w is None else w[pick] for w in weights))


def _levels(samples: Tensor, weights: Tensor | None, bits: int, q_norm: bool | None) -> dict[str, Tensor]:
    """nuq levels of normalised samples; Q-Norm when q_norm, by default at 2 bits."""
    samples, weights = _subsample(samples, weights)
    levels = ref.fit_levels(samples, bits, weights)
    if not (bits == 2 if q_norm is None else q_norm):
        return {"levels": levels}
    return {"levels": ref.q_norm_levels(samples, levels), "boundaries": ref.midpoints(levels)}


def _key_calibration(keys: Tensor, bits: int, outlier_fraction: float, fisher: Tensor | None, nuq: bool,
                     q_norm: bool | None) -> dict[str, Tensor]:
    offset, scale = key_ranges(keys, outlier_fraction)
    stats = {"key_offset": offset, "key_scale": scale}
    if nuq:
        x = ref.normalize_keys(keys.transpose(0, 1), offset, scale)  # [kv_heads, n, head_dim]
        inlier = x.abs() <= 1
        w = None if fisher is None else (fisher.float().transpose(0, 1) * scale[:, None] ** 2)[inlier]
        for name, t in _levels(x[inlier], w, bits, q_norm).items():
            stats[f"key_{name}"] = t
    return stats


def _value_calibration(values: Tensor, bits: int, outlier_fraction: float, fisher: Tensor | None, nuq: bool,
                       q_norm: bool | None) -> dict[str, Tensor]:
    if not nuq:
        return {}
    x, inlier, _, (_, scale) = ref.value_statistics(values, ref.outlier_slots(values.shape[-1], outlier_fraction))
    w = None if fisher is None else (fisher.float() * scale.float()[..., None] ** 2)[inlier]
    return {f"value_{name}": t for name, t in _levels(x[inlier], w, bits, q_norm).items()}


def layer_calibration(keys: Tensor, values: Tensor, key_bits: int, value_bits: int, outlier_fraction: float,
                      key_fisher: Tensor | None = None, value_fisher: Tensor | None = None, nuq: bool = True,
                      q_norm: bool | None = None) -> dict[str, Tensor]:
    """One layer's calibration from activations keys, values [n, kv_heads, head_dim] (keys pre- or post-RoPE as the
    cache will store them; sink positions left out) and optional Fisher weights of the same shape.

    Levels: weighted k-means on the normalised inliers with weights F * scale^2 (the paper's objective
    sum F_i s_i^2 (x_i - Q(x_i))^2), or uniform when nuq=False. q_norm (default: on at 2 bits) applies Q-Norm.
    Returns make_codebook's keyword arguments.
    """
    return {**_key_calibration(keys, key_bits, outlier_fraction, key_fisher, nuq, q_norm),
            **_value_calibration(values, value_bits, outlier_fraction, value_fisher, nuq, q_norm)}


KIVI_GROUPS = (32, 64, 128)
CANDIDATE_OUTLIER_FRACTIONS = (0.0, 0.01)  # 0.01 keeps one slot per vector up to head_dim 149


def candidate_quantizers(budget: float, head_dim: int, window_tokens: int = 0,
                         dtype: torch.dtype = torch.float16) -> list[Quantizer]:
    """The quantizers calibrate(budget=...) weighs, cheapest first: key and value bits 2, 3, 4 each; KVQuant with
    nuq or uniform levels and no outliers or 1% (at least one slot); the KIVI mode with the groups of KIVI_GROUPS
    the window can hold (group <= window_tokens); those within `budget` bits per element
    (Quantizer.bits_per_element in a cache of `dtype`)."""
    found = []
    for key_bits, value_bits in itertools.product(ref.SUPPORTED_BITS, repeat=2):
        found += [Quantizer(key_bits, value_bits, fraction, 0, nuq)
                  for fraction in CANDIDATE_OUTLIER_FRACTIONS for nuq in (True, False)]
        found += [Quantizer(key_bits, value_bits, 0.0, group, False) for group in KIVI_GROUPS if group <= window_tokens]
    return sorted((q for q in found if q.bits_per_element(head_dim, dtype) <= budget + 1e-9),
                  key=lambda q: q.bits_per_element(head_dim, dtype))


def attend(queries: Tensor, keys: Tensor, values: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0,
           causal: bool = True) -> Tensor:
    """fp32 attention of queries [batch, heads, n, head_dim] over keys, values [batch, kv_heads, n, head_dim], both
    queries and keys pre-RoPE and rotated here at positions 0..n-1 (inv_freq of zeros: no RoPE), GQA repeated."""
    cos, sin = ref.rope_cos_sin(torch.arange(keys.shape[2]), inv_freq.cpu(), attention_scaling)
    group = queries.shape[1] // keys.shape[1]
    k = ref.rotate(keys, cos, sin).repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(ref.rotate(queries, cos, sin), k, values.float().repeat_interleave(group, 1),
                                          is_causal=causal)


def simulate(keys: Tensor, values: Tensor, quantizer: Quantizer, stats: dict[str, Tensor],
             sink_tokens: int = 0) -> tuple[Tensor, Tensor]:
    """Keys and values [batch, kv_heads, n, head_dim] as a cache with this quantizer reads them back, fp32: the
    first sink_tokens exact, every later position quantized (no window: the quantizer alone, except the KIVI
    mode's incomplete last group, which its window holds exactly)."""
    codebook = make_codebook(quantizer.key_bits, quantizer.value_bits, **stats, key_group=quantizer.key_group)
    k_hat, v_hat = ref.quantize_dequantize(keys[:, :, sink_tokens:], values[:, :, sink_tokens:], codebook,
                                           quantizer.slots(keys.shape[-1]))
    return tuple(torch.cat((exact[:, :, :sink_tokens].float(), quantized), 2)
                 for exact, quantized in ((keys, k_hat), (values, v_hat)))


def _past_sink(tensors: list[Tensor] | None, sink_tokens: int) -> Tensor | None:
    """Per-batch activations [batch, heads, seq, head_dim] -> [n, heads, head_dim] past the sink, all batches
    (layer_calibration's layout)."""
    if tensors is None:
        return None
    return torch.cat([t[:, :, sink_tokens:].transpose(1, 2).flatten(0, 1) for t in tensors])


def choose_quantizer(queries: list[Tensor], keys: list[Tensor], values: list[Tensor], candidates: list[Quantizer],
                     inv_freq: Tensor, attention_scaling: float = 1.0, sink_tokens: int = 0, causal: bool = True,
                     key_fisher: list[Tensor] | None = None, value_fisher: list[Tensor] | None = None,
                     q_norm: bool | None = None) -> tuple[Quantizer, dict[str, Tensor], dict[Quantizer, float]]:
    """The candidate with the least attention-output error on one layer's calibration activations.

    queries: per batch [batch, heads, seq, head_dim]; keys, values, key_fisher, value_fisher: per batch
    [batch, kv_heads, seq, head_dim]; queries and keys before RoPE (attend rotates both). Each candidate is
    calibrated on the positions past the sink (layer_calibration) and scored by ||O_hat - O||_F / ||O||_F over
    every query (simulate: the sink exact, the rest quantized). Returns (the best, its make_codebook keyword
    arguments, every candidate's error).
    """
    if not candidates:
        raise ValueError("choose_quantizer: no candidate quantizer (is the budget below the cheapest one's bits?)")

    k_flat, v_flat, dk_flat, dv_flat = (_past_sink(t, sink_tokens) for t in (keys, values, key_fisher, value_fisher))
    exact = [attend(q, k, v, inv_freq, attention_scaling, causal) for q, k, v in zip(queries, keys, values)]
    fitted: dict[tuple, dict[str, Tensor]] = {}  # levels depend on (kind, bits, outliers, nuq) only: fit once

    def stats_of(q: Quantizer) -> dict[str, Tensor]:
        if q.key_group:  # KIVI: uniform levels, key ranges from the cache; the per-layer ones only give the shape
            return {"key_offset": torch.zeros(k_flat.shape[1:]), "key_scale": torch.ones(k_flat.shape[1:])}
        key = ("key", q.key_bits, q.outlier_fraction, q.nuq)
        value = ("value", q.value_bits, q.outlier_fraction, q.nuq)
        if key not in fitted:
            fitted[key] = _key_calibration(k_flat, q.key_bits, q.outlier_fraction, dk_flat, q.nuq, q_norm)
        if value not in fitted:
            fitted[value] = _value_calibration(v_flat, q.value_bits, q.outlier_fraction, dv_flat, q.nuq, q_norm)
        return {**fitted[key], **fitted[value]}

    errors = {}
    for candidate in candidates:
        stats = stats_of(candidate)
        squared = total = 0.0
        for q, k, v, o in zip(queries, keys, values, exact):
            o_hat = attend(q, *simulate(k, v, candidate, stats, sink_tokens), inv_freq, attention_scaling, causal)
            squared, total = squared + float((o_hat - o).square().sum()), total + float(o.square().sum())
        errors[candidate] = math.sqrt(squared / max(total, 1e-30))
    best = min(candidates, key=lambda c: (errors[c], c.bits_per_element(k_flat.shape[-1])))
    return best, stats_of(best), errors


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    """The model's attention modules (those with k_proj, v_proj and layer_idx), in layer order."""
    layers = [m for m in model.modules() if all(hasattr(m, a) for a in ("k_proj", "v_proj", "layer_idx"))]
    if not layers:
        raise ValueError("calibrate: found no attention module with k_proj, v_proj and layer_idx (a Hugging Face "
                         "Llama-style model is expected)")
    return sorted(layers, key=lambda m: m.layer_idx)


def _rotary(model: nn.Module) -> tuple[Tensor, float]:
    """(inv_freq [head_dim / 2] fp32, attention_scaling) of the model's rotary embedding."""
    for m in model.modules():
        if isinstance(getattr(m, "inv_freq", None), Tensor):
            return m.inv_freq.float(), float(getattr(m, "attention_scaling", 1.0))
    raise ValueError("KVQuant: the model has no rotary embedding module (a module with an inv_freq buffer)")


def _capture(model: nn.Module, attention: list[nn.Module], batches: Iterable[Tensor], kinds: tuple[str, ...],
             fisher: bool) -> dict[tuple[int, str], list[Tensor]]:
    """Per (layer, kind) the outputs of its {kind}_proj per batch, [batch, kv_heads or heads, seq, head_dim] fp32 on
    the CPU, and with fisher=True their gradients of the language-model loss under "d" + kind."""
    captured = {(m.layer_idx, kind): [] for m in attention for kind in kinds + tuple("d" + k for k in kinds)}

    def hook(layer_idx, kind, head_dim):
        def capture(module, inputs, output):
            heads = output.unflatten(-1, (-1, head_dim))  # [batch, seq, heads, head_dim]
            captured[layer_idx, kind].append(heads.detach().float().cpu().transpose(1, 2))
            if fisher and output.requires_grad:
                output.register_hook(lambda g: captured[layer_idx, "d" + kind].append(
                    g.unflatten(-1, (-1, head_dim)).float().cpu().transpose(1, 2)))
        return capture

    handles = [getattr(m, f"{kind}_proj").register_forward_hook(hook(m.layer_idx, kind, m.head_dim))
               for m in attention for kind in kinds]
    try:
        for ids in batches:
            with torch.set_grad_enabled(fisher):
                out = model(ids, labels=ids) if fisher else model(ids)
                if fisher:
                    out.loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        if fisher:
            model.zero_grad(set_to_none=True)
    return captured


def calibrate(model: nn.Module, batches: Iterable[Tensor], bits: int = 4, outlier_fraction: float = 0.01,
              fisher: bool = False, value_bits: int | None = None, nuq: bool = True, q_norm: bool | None = None,
              sink_tokens: int = 1, window_tokens: int = 0, pre_rope: bool = True,
              budget: float | None = None, cache_dtype: torch.dtype | None = None) -> KVQuantConfig:
    """Fit a KVQuantConfig on calibration token batches (paper sec. 3.3-3.4).

    Hooks every attention layer's k_proj / v_proj (keys there are pre-RoPE in Hugging Face Llama-style models) and
    fits per layer: key per-channel ranges, nuq levels for keys and values (k-means; with fisher=True weighted by
    the squared gradients of the language-model loss, which needs `model(ids, labels=ids).loss`), Q-Norm at 2 bits.

    With budget (bits per cached element, metadata and outliers included; Quantizer.bits_per_element) it chooses
    per layer, among candidate_quantizers(budget, ...), the one whose attention output on these batches is
    closest to exact attention (choose_quantizer; q_proj is hooked too); bits, value_bits, outlier_fraction and
    nuq are then unused. KIVI-mode candidates need window_tokens >= their group. cache_dtype: the dtype the
    cache will hold, which its metadata and outliers take (default the model's).

    Args:
        batches: token id tensors [batch, seq]. bits: key bits (value_bits defaults to the same).
        nuq: False gives uniform levels (intX) with calibrated key ranges. Other args: see KVQuantConfig.
    """
    if budget is not None and not pre_rope:
        raise ValueError("calibrate: budget chooses among pre-RoPE quantizers; pass pre_rope=True")
    attention = _attention_layers(model)
    captured = _capture(model, attention, batches, ("k", "v") if budget is None else ("q", "k", "v"), fisher)
    inv_freq, attention_scaling = _rotary(model)
    layers, quantizers = [], []
    for m in attention:
        kept = {kind: captured[m.layer_idx, kind] or None for kind in ("q", "k", "v", "dk", "dv")
                if (m.layer_idx, kind) in captured}
        if budget is not None:  # K/V measured as the cache will hold them, in its dtype
            dtype = cache_dtype or next(model.parameters()).dtype
            keys, values = ([t.to(dtype) for t in kept[kind]] for kind in ("k", "v"))
            candidates = candidate_quantizers(budget, m.head_dim, window_tokens, dtype)
            best, stats, _ = choose_quantizer(kept["q"], keys, values, candidates, inv_freq, attention_scaling,
                                              sink_tokens, True, kept["dk"], kept["dv"], q_norm)
            layers.append(stats)
            quantizers.append(best)
            continue
        if not pre_rope:  # the ablation: statistics of the keys as RoPE leaves them
            kept["k"] = [_rotate(k, inv_freq, attention_scaling) for k in kept["k"]]
        keys, values, key_grad, value_grad = (_past_sink(kept[kind], sink_tokens) for kind in ("k", "v", "dk", "dv"))
        layers.append(layer_calibration(keys, values, bits, value_bits or bits, outlier_fraction, key_grad,
                                        value_grad, nuq=nuq, q_norm=q_norm))
    return KVQuantConfig(bits, value_bits or bits, outlier_fraction, sink_tokens, window_tokens, pre_rope, layers,
                         quantizers=quantizers)


def _rotate(keys: Tensor, inv_freq: Tensor, attention_scaling: float) -> Tensor:
    """RoPE of keys [batch, kv_heads, seq, head_dim] at positions 0, 1, ... (same layout back)."""
    cos, sin = ref.rope_cos_sin(torch.arange(keys.shape[2]), inv_freq.cpu(), attention_scaling)
    return ref.rotate(keys, cos, sin)


# ---- the cache ------------------------------------------------------------------------------------------------------

_DECODING = threading.local()  # the layer whose decode step the "kvquant" attention function must run next


class _PlainCache:
    """The Cache interface used when transformers is not installed."""

    def __init__(self, layers):
        self.layers = layers

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length()


class KVQuantLayer(*(() if _HFLayer is None else (_HFLayer,))):
    """One attention layer's quantized cache (a transformers CacheLayerMixin when transformers is installed).

    update() takes post-RoPE keys [batch, kv_heads, n, head_dim] and values, un-rotates the keys at this layer's
    next positions and quantize-appends them. It returns what the attention call needs: the 16-bit new tokens on
    the first prefill, placeholders on a fused decode step (the "kvquant" attention reads the packed cache), and
    the dequantized cache (post-RoPE) otherwise (chunked prefill, or fused=False).
    """
    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, config: KVQuantConfig, layer_idx: int, inv_freq: Tensor, attention_scaling: float,
                 max_length: int, fused: bool):
        if _HFLayer is not None:
            super().__init__()
        self.config, self.layer_idx, self.max_length, self.fused = config, layer_idx, max_length, fused
        self.inv_freq, self.attention_scaling = inv_freq.float(), attention_scaling
        self.storage = self.codebook = None
        self.seen = 0
        self.pads = torch.zeros(0, dtype=torch.int64)  # [batch] leading pad tokens of each sequence (update)
        self.is_initialized = False

    def lazy_initialization(self, keys: Tensor, values: Tensor, real: Tensor | None = None) -> None:
        """Buffers for max_length positions; levels and key ranges from the config, else from this prefill's
        tokens past the sink (real [batch]: the tokens each row holds at its front, default all n)."""
        batch, kv_heads, n, head_dim = keys.shape
        quantizer = self.config.quantizer(self.layer_idx)
        self.codebook = self.config.codebook(self.layer_idx, keys.device)
        if self.codebook is None and quantizer.key_group:  # uncalibrated KIVI mode: key ranges live in the cache
            ones = torch.ones(kv_heads, head_dim, device=keys.device)
            self.codebook = make_codebook(quantizer.key_bits, quantizer.value_bits, ones * 0, ones,
                                          key_group=quantizer.key_group)
        if self.codebook is None:  # uncalibrated: uniform levels, key ranges of the prefill (past the sink)
            position = torch.arange(n, device=keys.device)
            held = position < (torch.full((batch,), n, device=keys.device) if real is None else real)[:, None]
            sample = keys.transpose(1, 2)[held & (position >= min(self.config.sink_tokens, n - 1))]
            if sample.shape[0] == 0:  # every real token is in the sink
                sample = keys.transpose(1, 2).flatten(0, 1)
            offset, scale = key_ranges(sample, quantizer.outlier_fraction)
            self.codebook = make_codebook(quantizer.key_bits, quantizer.value_bits, offset, scale)
        slots = quantizer.slots(head_dim)
        self.storage = allocate_storage(batch, kv_heads, head_dim, self.max_length, self.codebook, slots,
                                        self.config.sink_tokens, self.config.window_tokens, keys.dtype, keys.device)
        self.is_initialized = True

    def _rope(self, first: Tensor | int, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin [batch or 1, 1, n, head_dim / 2] at positions first + j, first [batch] per sequence or one int."""
        first = torch.as_tensor(first, device=self.inv_freq.device).reshape(-1, 1, 1)
        positions = first + torch.arange(n, device=self.inv_freq.device)
        return ref.rope_cos_sin(positions, self.inv_freq, self.attention_scaling)

    def _left_padding(self, kwargs: dict, n: int, batch: int, device) -> Tensor:
        """Leading pad tokens of each sequence [batch] int64, read from the position_ids the model hands the cache
        (transformers 5 passes the attention's kwargs on): generate numbers a left-padded row's first real token 0,
        so a row whose last of n tokens sits at position p holds n - 1 - p pads. None handed: no padding."""
        handed = kwargs.get("kwargs") if isinstance(kwargs.get("kwargs"), dict) else kwargs
        positions = handed.get("position_ids")
        if positions is None:
            return torch.zeros(batch, dtype=torch.int64, device=device)
        last = positions.to(device)[:, -1].long().expand(batch)
        return (n - 1 - last).clamp(0, n)

    def _handed_rope(self, args: tuple, kwargs: dict, n: int) -> tuple[Tensor, Tensor]:
        """cos, sin [..., n, head_dim / 2] to un-rotate the incoming keys: the ones the model hands over in
        cache_kwargs (transformers 4.x: [batch, n, head_dim], halves repeated), else from inv_freq at each
        sequence's next positions (transformers 5 hands none; a left pad's own position is never read)."""
        handed = args[0] if args and isinstance(args[0], dict) else kwargs.get("cache_kwargs") or {}
        if handed.get("cos") is not None and handed.get("sin") is not None:
            half = handed["cos"].shape[-1] // 2
            return handed["cos"][..., None, :, :half].float(), handed["sin"][..., None, :, :half].float()
        return self._rope(self.seen - self.pads, n)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append n new tokens per sequence (post-RoPE keys, values [batch, kv_heads, n, head_dim]); see the class.

        A left-padded first prefill is stored without its pads (sequence b's position 0 is its first real token,
        as when it runs alone); the pads are kept only to hand the cache back in the padded layout the model's
        attention mask describes.
        """
        batch, _, n, _ = key_states.shape
        if self.seen + n > self.max_length:
            raise ValueError(f"KVQuantCache: layer {self.layer_idx} holds {self.seen} tokens and cannot take {n} more "
                             f"(max_length={self.max_length}); nothing was written")
        first_prefill = self.seen == 0
        if first_prefill:
            self.inv_freq = self.inv_freq.to(key_states.device)
            self.pads = self._left_padding(kwargs, n, batch, key_states.device)
        real = n - self.pads if first_prefill else torch.full_like(self.pads, n)  # [batch] tokens to store
        keys, values = key_states, value_states
        if self.config.pre_rope:
            keys = ref.unrotate(keys, *self._handed_rope(args, kwargs, n)).to(key_states.dtype)
        if first_prefill:  # move each row's real tokens to its front: [batch, kv_heads, n, head_dim]
            order = (torch.arange(n, device=keys.device) + self.pads[:, None]).clamp_max(n - 1)
            order = order[:, None, :, None].expand_as(keys)
            keys, values = keys.gather(2, order), values.gather(2, order)
        if not self.is_initialized:
            self.lazy_initialization(keys, values, real)
        ops.kv_quant_append_(self.storage, self.codebook, keys.contiguous(), values.contiguous(),
                             real.to(torch.int32), check=False)
        self.seen += n
        if first_prefill:
            return key_states, value_states
        if self.fused and n == 1:
            if getattr(_DECODING, "layer", None) is not None:
                raise RuntimeError("KVQuantCache(fused=True): the previous layer's decode step was not attended; "
                                   "the model must use attn_implementation='kvquant' (see use_kvquant_attention)")
            _DECODING.layer = self
            return key_states, value_states
        return self.dequantized(key_states.dtype)

    def decode(self, query: Tensor, scaling: float) -> Tensor:
        """The fused decode attention of query [batch, heads, 1, head_dim] over this layer's packed cache."""
        inv_freq = self.inv_freq if self.config.pre_rope else torch.zeros_like(self.inv_freq)  # post: no rotation
        return ops.kv_quant_decode_attention(query, self.storage, self.codebook, inv_freq, self.attention_scaling
                                             if self.config.pre_rope else 1.0, scaling, max_length=self.seen)

    def dequantized(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The whole cache as post-RoPE keys and values [batch, kv_heads, seen, head_dim] in dtype, in the padded
        layout the attention mask describes (sequence b's tokens at its last seen - pads[b] positions, zeros
        before them)."""
        keys, values = (t[:, :, :self.seen] for t in ref.read(self.storage, self.codebook))
        if self.config.pre_rope:
            keys = ref.rotate(keys, *self._rope(0, self.seen))
        padded = torch.arange(self.seen, device=keys.device) - self.pads[:, None]  # [batch, seen] stored index
        order = padded.clamp_min(0)[:, None, :, None].expand_as(keys)
        held = (padded >= 0)[:, None, :, None]
        return tuple(torch.where(held, t.gather(2, order), 0).to(dtype) for t in (keys, values))

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return self.max_length

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        """Empty every sequence; a poisoned one (reference.kv_quant.Storage) is usable again."""
        self.seen = 0
        if self.storage is not None:
            self.storage.lengths.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove tokens (transformers' convention: a count <= 0; a positive one raises, as
        DynamicLayer). Positions the shorter cache holds in its 16-bit window but that had already left it read
        back quantized (reference.kv_quant.crop)."""
        if tokens_to_remove > 0:
            raise ValueError(f"KVQuantCache.crop: pass the number of tokens to remove as a negative int, got "
                             f"{tokens_to_remove}")
        keep = max(self.seen + tokens_to_remove, 0)
        if self.storage is not None and keep < self.seen:
            ref.crop(self.storage, self.codebook, (keep - self.pads).tolist())
        self.seen = keep

    def _select(self, rows: Tensor) -> None:
        """Keep the sequences at rows [new batch] (beam search, contrastive search, batch pruning)."""
        if self.storage is None:
            return
        rows = rows.to(self.storage.lengths.device)
        self.storage = ref.Storage(*(t.index_select(0, rows) for t in self.storage))
        self.pads = self.pads.index_select(0, rows)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(torch.as_tensor(indices).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.storage is not None:
            self._select(torch.arange(self.pads.shape[0]).repeat_interleave(repeats))

    def memory(self) -> dict[str, int]:
        """Bytes held for the tokens seen, by component (what a tight allocation of them would take)."""
        if self.storage is None:
            return {}
        st, cb = self.storage, self.codebook
        _, kv_heads, _, head_dim = st.sink_keys.shape
        sink_len, window_len = st.sink_keys.shape[2], st.window_keys.shape[2]
        sink = window = packed = 0  # positions summed over the sequences (each holds seen - pads[b] tokens)
        for held in (self.seen - self.pads).tolist():
            in_window = held - ref.window_start(held, sink_len, window_len, ref.window_step(cb))
            sink, window = sink + min(sink_len, held), window + in_window
            packed += held - min(sink_len, held) - in_window
        per_position = bytes_per_position(st, cb)  # one sequence, all heads
        return {"codes": packed * (per_position["key_codes"] + per_position["value_codes"]),
                "value_scales": packed * (per_position["value_offset"] + per_position["value_scale"]),
                "key_group_ranges": round(packed * sum(per_position.get(name, 0) for name in ref.KEY_GROUPS)),
                "outliers": packed * sum(per_position[f"{kind}_outlier_{part}"]
                                         for kind in ("key", "value") for part in ("index", "value")),
                "sink": 2 * sink * kv_heads * head_dim * st.sink_keys.element_size(),
                "window": 2 * window * kv_heads * head_dim * st.window_keys.element_size(),
                "tables": sum(t.numel() * t.element_size() for t in cb if isinstance(t, Tensor))}


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The keyword argument that hands ``cache`` to ``model(...)`` or ``model.generate(...)`` of a Hugging Face model:
    ``{"cache": cache}`` where the model's forward takes ``cache`` (transformers releases that renamed
    ``past_key_values``: they warn on the old name, which goes in 6.0), else ``{"past_key_values": cache}``."""
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


class KVQuantCache(*((_PlainCache,) if _HFCache is None else (_HFCache,))):
    """A drop-in KVQuant cache: a transformers.Cache when transformers is installed (pass it to
    model.generate(**cache_kwargs(model, cache))), else a plain object with the same update() for one's own model code.

    Args:
        config: KVQuantConfig (from calibrate, KVQuantConfig.load, or KVQuantConfig() for uncalibrated intX).
        model: a Hugging Face Llama-style model: gives the layer count and the rotary embedding, and with
            fused=True gets attn_implementation "kvquant" (use_kvquant_attention) so decode steps run the kernel.
        num_layers, inv_freq, attention_scaling: instead of model, for one's own model code.
        max_length: positions preallocated per sequence (prompt + generated tokens).
        fused: decode through the fused kernel (True) or return dequantized K/V to any attention (False).
    """

    def __init__(self, config: KVQuantConfig, model: nn.Module | None = None, *, num_layers: int | None = None,
                 inv_freq: Tensor | None = None, attention_scaling: float = 1.0, max_length: int = 4096,
                 fused: bool = True):
        if model is not None:
            num_layers = len(_attention_layers(model))
            inv_freq, attention_scaling = _rotary(model)
            if fused:
                use_kvquant_attention(model)
        if num_layers is None or inv_freq is None:
            raise ValueError("KVQuantCache: pass a model, or num_layers and inv_freq")
        if config.layers and len(config.layers) != num_layers:
            raise ValueError(f"KVQuantCache: the config is calibrated for {len(config.layers)} layers, the model "
                             f"has {num_layers}")
        super().__init__(layers=[KVQuantLayer(config, i, inv_freq, attention_scaling, max_length, fused)
                                 for i in range(num_layers)])
        _DECODING.layer = None  # a step an earlier cache left unattended (say, after an exception) is dropped

    def memory_report(self) -> dict:
        """True memory of the tokens held, every layer: bytes by component (codes, value scales, outliers with
        their indices, 16-bit sink and window, per-layer tables and key ranges), the average bits per cached
        element (keys and values), and the same for a 16-bit cache."""
        parts: dict[str, int] = {}
        elements = 0
        for layer in self.layers:
            for name, size in layer.memory().items():
                parts[name] = parts.get(name, 0) + size
            if layer.storage is not None:
                _, kv_heads, _, head_dim = layer.storage.sink_keys.shape
                elements += 2 * kv_heads * head_dim * int((layer.seen - layer.pads).sum())
        total = sum(parts.values())
        return {"tokens": self.layers[0].seen, "bytes": parts, "total_bytes": total,
                "bits_per_element": 8 * total / max(elements, 1), "fp16_bytes": 2 * elements}


def _kvquant_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "kvquant" attention implementation: the fused kernel on a decode step of a KVQuantCache, SDPA else."""
    layer = getattr(_DECODING, "layer", None)
    if layer is not None and layer.layer_idx == module.layer_idx and query.shape[2] == 1:
        _DECODING.layer = None
        out = layer.decode(query, scaling if scaling is not None else query.shape[-1] ** -0.5)
        return out.transpose(1, 2), None  # Hugging Face's [batch, seq, heads, head_dim]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def use_kvquant_attention(model: nn.Module) -> None:
    """Register the "kvquant" attention implementation with transformers and switch the model to it."""
    if _HFCache is None:
        raise ImportError("use_kvquant_attention needs transformers (pip install torchext[hf])")
    AttentionInterface.register("kvquant", _kvquant_attention)
    AttentionMaskInterface.register("kvquant", sdpa_mask)  # prefill falls back to SDPA: it needs SDPA's mask
    model.set_attn_implementation("kvquant")
