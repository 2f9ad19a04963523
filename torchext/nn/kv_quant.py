"""KVQuant (Hooper et al., arXiv 2401.18079): calibration, a drop-in quantized KV cache, and its memory report.

    config = calibrate(model, batches, bits=4, outlier_fraction=0.01)    # per-layer nuq levels + key ranges
    config.save("kvquant.safetensors")
    cache = KVQuantCache(config, model, max_length=8192)                 # a transformers.Cache
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=64)
    print(cache.memory_report())

The cache takes the post-RoPE keys a Hugging Face attention layer hands it, un-rotates them (at each sequence's
own positions; a left-padded batch is stored without its pads) and stores them quantized before RoPE. Prefill
attends over the new tokens in 16-bit and then packs them; each decode step appends the new token and runs the
fused Triton decode attention over the packed cache (the "kvquant" attention implementation, which the cache
installs on the model it is given). Beam search, crop (assisted generation) and reuse across generate calls work
as with a DynamicCache.
"""

import json
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from torchext import ops
from torchext.ops._checks import check_float, check_int
from torchext.ops.kv_quant import allocate_storage, bytes_per_position, check_bits, make_codebook
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


@dataclass
class KVQuantConfig:
    """What a KVQuantCache needs, every part of the method switchable.

    key_bits, value_bits: 2, 3 or 4. outlier_fraction: dense-and-sparse share per vector (0 disables).
    sink_tokens: leading positions kept in 16-bit; window_tokens: most recent positions kept in 16-bit.
    pre_rope: quantize keys before RoPE (the paper) or after (the ablation). layers: per-layer calibration
    (`calibrate`); empty means uniform levels with key ranges taken from each layer's first prefill.
    """
    key_bits: int = 4
    value_bits: int = 4
    outlier_fraction: float = 0.01
    sink_tokens: int = 1
    window_tokens: int = 0
    pre_rope: bool = True
    layers: list[dict[str, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("key_bits", "value_bits"):
            check_bits("KVQuantConfig", name, getattr(self, name))
        check_float("KVQuantConfig", "outlier_fraction", self.outlier_fraction)
        if not 0 <= self.outlier_fraction < 1:
            raise ValueError(f"KVQuantConfig: outlier_fraction must be in [0, 1), got {self.outlier_fraction}")
        for name in ("sink_tokens", "window_tokens"):
            check_int("KVQuantConfig", name, getattr(self, name), minimum=0)

    def codebook(self, layer_idx: int, device) -> ref.Codebook | None:
        if not self.layers:
            return None
        stats = {name: t.to(device) for name, t in self.layers[layer_idx].items()}
        return make_codebook(self.key_bits, self.value_bits, **stats)

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


def _levels(samples: Tensor, weights: Tensor | None, bits: int, q_norm: bool) -> dict[str, Tensor]:
    samples, weights = _subsample(samples, weights)
    levels = ref.fit_levels(samples, bits, weights)
    if not q_norm:
        return {"levels": levels}
    return {"levels": ref.q_norm_levels(samples, levels), "boundaries": ref.midpoints(levels)}


def layer_calibration(keys: Tensor, values: Tensor, key_bits: int, value_bits: int, outlier_fraction: float,
                      key_fisher: Tensor | None = None, value_fisher: Tensor | None = None, nuq: bool = True,
                      q_norm: bool | None = None) -> dict[str, Tensor]:
    """One layer's calibration from activations keys, values [n, kv_heads, head_dim] (keys pre- or post-RoPE as the
    cache will store them; sink positions left out) and optional Fisher weights of the same shape.

    Levels: weighted k-means on the normalised inliers with weights F * scale^2 (the paper's objective
    sum F_i s_i^2 (x_i - Q(x_i))^2), or uniform when nuq=False. q_norm (default: on at 2 bits) applies Q-Norm.
    Returns make_codebook's keyword arguments.
    """
    head_dim = keys.shape[-1]
    offset, scale = key_ranges(keys, outlier_fraction)
    stats = {"key_offset": offset, "key_scale": scale}
    if not nuq:
        return stats
    x_k = ref.normalize_keys(keys.transpose(0, 1), offset, scale)  # [kv_heads, n, head_dim]
    inlier_k = x_k.abs() <= 1
    w_k = None if key_fisher is None else (key_fisher.float().transpose(0, 1) * scale[:, None] ** 2)[inlier_k]
    x_v, inlier_v, _, (_, v_scale) = ref.value_statistics(values, ref.outlier_slots(head_dim, outlier_fraction))
    w_v = None if value_fisher is None else (value_fisher.float() * v_scale.float()[..., None] ** 2)[inlier_v]
    for prefix, bits, x, w in (("key", key_bits, x_k[inlier_k], w_k), ("value", value_bits, x_v[inlier_v], w_v)):
        for name, t in _levels(x, w, bits, bits == 2 if q_norm is None else q_norm).items():
            stats[f"{prefix}_{name}"] = t
    return stats


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


def calibrate(model: nn.Module, batches: Iterable[Tensor], bits: int = 4, outlier_fraction: float = 0.01,
              fisher: bool = False, value_bits: int | None = None, nuq: bool = True, q_norm: bool | None = None,
              sink_tokens: int = 1, window_tokens: int = 0, pre_rope: bool = True) -> KVQuantConfig:
    """Fit a KVQuantConfig on calibration token batches (paper sec. 3.3-3.4).

    Hooks every attention layer's k_proj / v_proj (keys there are pre-RoPE in Hugging Face Llama-style models) and
    fits per layer: key per-channel ranges, nuq levels for keys and values (k-means; with fisher=True weighted by
    the squared gradients of the language-model loss, which needs `model(ids, labels=ids).loss`), Q-Norm at 2 bits.

    Args:
        batches: token id tensors [batch, seq]. bits: key bits (value_bits defaults to the same).
        nuq: False gives uniform levels (intX) with calibrated key ranges. Other args: see KVQuantConfig.
    """
    attention = _attention_layers(model)
    captured = {(m.layer_idx, kind): [] for m in attention for kind in ("k", "v", "dk", "dv")}

    def hook(layer_idx, kind, head_dim):
        def capture(module, inputs, output):
            heads = output.reshape(*output.shape[:-1], -1, head_dim)  # [batch, seq, kv_heads, head_dim]
            captured[layer_idx, kind].append(heads[:, sink_tokens:].detach().float().cpu())
            if fisher and output.requires_grad:
                output.register_hook(lambda g: captured[layer_idx, "d" + kind].append(
                    g.reshape(heads.shape)[:, sink_tokens:].float().cpu()))
        return capture

    handles = [getattr(m, f"{kind}_proj").register_forward_hook(hook(m.layer_idx, kind, m.head_dim))
               for m in attention for kind in ("k", "v")]
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
    inv_freq, attention_scaling = _rotary(model)
    layers = []
    for m in attention:
        if not pre_rope:  # the ablation: statistics of the keys as RoPE leaves them
            captured[m.layer_idx, "k"] = [_rotate(k, sink_tokens, inv_freq, attention_scaling)
                                          for k in captured[m.layer_idx, "k"]]
        keys, values, key_grad, value_grad = (torch.cat([t.flatten(0, 1) for t in captured[m.layer_idx, kind]])
                                              if captured[m.layer_idx, kind] else None
                                              for kind in ("k", "v", "dk", "dv"))
        layers.append(layer_calibration(keys, values, bits, value_bits or bits, outlier_fraction, key_grad,
                                        value_grad, nuq=nuq, q_norm=q_norm))
    return KVQuantConfig(bits, value_bits or bits, outlier_fraction, sink_tokens, window_tokens, pre_rope, layers)


def _rotate(keys: Tensor, first: int, inv_freq: Tensor, attention_scaling: float) -> Tensor:
    """RoPE of keys [batch, seq, kv_heads, head_dim] at positions first, first + 1, ... (same layout back)."""
    cos, sin = ref.rope_cos_sin(torch.arange(first, first + keys.shape[1]), inv_freq.cpu(), attention_scaling)
    return ref.rotate(keys.transpose(1, 2), cos, sin).transpose(1, 2)


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
        self.codebook = self.config.codebook(self.layer_idx, keys.device)
        if self.codebook is None:  # uncalibrated: uniform levels, key ranges of the prefill (past the sink)
            position = torch.arange(n, device=keys.device)
            held = position < (torch.full((batch,), n, device=keys.device) if real is None else real)[:, None]
            sample = keys.transpose(1, 2)[held & (position >= min(self.config.sink_tokens, n - 1))]
            if sample.shape[0] == 0:  # every real token is in the sink
                sample = keys.transpose(1, 2).flatten(0, 1)
            offset, scale = key_ranges(sample, self.config.outlier_fraction)
            self.codebook = make_codebook(self.config.key_bits, self.config.value_bits, offset, scale)
        slots = ref.outlier_slots(head_dim, self.config.outlier_fraction)
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
            in_window = held - ref.window_start(held, sink_len, window_len)
            sink, window = sink + min(sink_len, held), window + in_window
            packed += held - min(sink_len, held) - in_window
        per_position = bytes_per_position(st)  # one sequence, all heads
        return {"codes": packed * (per_position["key_codes"] + per_position["value_codes"]),
                "value_scales": packed * (per_position["value_offset"] + per_position["value_scale"]),
                "outliers": packed * sum(per_position[f"{kind}_outlier_{part}"]
                                         for kind in ("key", "value") for part in ("index", "value")),
                "sink": 2 * sink * kv_heads * head_dim * st.sink_keys.element_size(),
                "window": 2 * window * kv_heads * head_dim * st.window_keys.element_size(),
                "tables": sum(t.numel() * t.element_size() for t in cb if isinstance(t, Tensor))}


class KVQuantCache(*((_PlainCache,) if _HFCache is None else (_HFCache,))):
    """A drop-in KVQuant cache: a transformers.Cache when transformers is installed (pass it to
    model.generate(past_key_values=...)), else a plain object with the same update() for one's own model code.

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
