"""KVQuant (arXiv 2401.18079) as torch.library custom ops: quantize-and-append into a packed cache (CUDA C++) and
decode attention over it (Triton split-K flash decoding with in-register dequantization and RoPE).

The cache of one layer is a `Codebook` (fixed: per-layer levels, per-channel key normalisation) and a `Storage`
(preallocated buffers, see torchext/reference/kv_quant.py for the layout). `allocate_storage` builds one,
`kv_quant_append_` fills it, `kv_quant_decode_attention` reads it. Model code uses torchext.nn.KVQuantCache.
"""

import math

import torch
from torch import Tensor

from torchext._backend import CUDA_EXT, cuda_dtype_code, use_cuda_ext, use_triton
from torchext.ops._checks import FLOAT_DTYPES, check_int, check_same_device, check_shape, check_tensor
from torchext.reference import kv_quant as ref
from torchext.reference.kv_quant import Codebook, Storage

# What kind of kernel backs each op on CUDA (read by `python -m torchext info`).
KERNELS = {"kv_quant_append_": "cuda", "kv_quant_decode_attention": "triton"}

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DISPATCH = {"kv_quant_append_": "on CUDA the reference for KIVI-mode codebooks (key_group > 0)"}
HEAD_DIMS = (32, 64, 128, 256)
# Codebook inputs are moved to fp32: integer ranges (rounded calibrations) are accepted too.
CODEBOOK_INPUT_DTYPES = FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_bits(op: str, name: str, bits) -> None:
    """bits is an int in reference.kv_quant.SUPPORTED_BITS."""
    check_int(op, name, bits)
    if bits not in ref.SUPPORTED_BITS:
        raise ValueError(f"{op}: {name} must be one of {ref.SUPPORTED_BITS}, got {bits}")


def make_codebook(key_bits: int, value_bits: int, key_offset: Tensor, key_scale: Tensor,
                  key_levels: Tensor | None = None, value_levels: Tensor | None = None,
                  key_boundaries: Tensor | None = None, value_boundaries: Tensor | None = None,
                  key_group: int = 0) -> Codebook:
    """A layer's Codebook: the quantization tables fixed per layer. A Python helper, not a registered op (setup,
    once per layer: it checks values on the host and builds a NamedTuple the ops take).

    Args:
        key_bits, value_bits: bits per code, each one of reference.kv_quant.SUPPORTED_BITS.
        key_offset, key_scale: [kv_heads, head_dim], floating or integer (centre and half-width of each
            channel's range, scale > 0).
        key_levels, value_levels: [2^bits] ascending (nuqX from torchext.nn.calibrate); default uniform (intX).
        key_boundaries, value_boundaries: [2^bits - 1] ascending; default the levels' midpoints.
        key_group: 0 for KVQuant's per-layer key ranges; G >= 2 for KIVI's per-channel ranges of every G
            positions, kept in the Storage (key_offset and key_scale then only give the shape: ones and zeros do).

    Returns:
        A reference.kv_quant.Codebook whose tensors are fp32 and contiguous on key_offset's device: levels
        [2^bits], boundaries [2^bits - 1], key_offset and key_scale [kv_heads, head_dim].

    Raises:
        TypeError for a non-int bits or a non-tensor table, ValueError for unsupported bits, mismatched shapes,
        key_offset and key_scale on two devices, or non-finite, non-positive or unordered values (read to the
        host: a codebook is built once per layer, not per step).
    """
    op = "make_codebook"
    check_bits(op, "key_bits", key_bits)
    check_bits(op, "value_bits", value_bits)
    check_int(op, "key_group", key_group, minimum=0)
    if key_group == 1:
        raise ValueError("make_codebook: key_group must be 0 (per-layer key ranges) or >= 2 (the range of one "
                         "position is empty)")
    tables = {"key_levels": key_levels, "value_levels": value_levels, "key_boundaries": key_boundaries,
              "value_boundaries": value_boundaries}  # optional, moved to key_offset's device
    for name, t in {"key_offset": key_offset, "key_scale": key_scale, **tables}.items():
        if t is not None or name in ("key_offset", "key_scale"):
            check_tensor(op, name, t, CODEBOOK_INPUT_DTYPES, min_ndim=0)
    check_same_device(op, key_offset=key_offset, key_scale=key_scale)
    if key_offset.shape != key_scale.shape or key_offset.dim() != 2:
        raise ValueError(f"make_codebook: key_offset and key_scale must both be [kv_heads, head_dim], got "
                         f"{tuple(key_offset.shape)} and {tuple(key_scale.shape)}")
    if not (key_scale > 0).all() or not key_scale.isfinite().all() or not key_offset.isfinite().all():
        raise ValueError("make_codebook: key_offset must be finite and key_scale finite and > 0 in every channel")
    device = key_offset.device
    levels = [(ref.uniform_levels(b) if lv is None else lv).float().to(device)
              for b, lv in ((key_bits, key_levels), (value_bits, value_levels))]
    bounds = [ref.midpoints(lv) if bd is None else bd.float().to(device)
              for lv, bd in zip(levels, (key_boundaries, value_boundaries))]
    for name, bits, lv, bd in (("key", key_bits, levels[0], bounds[0]), ("value", value_bits, levels[1], bounds[1])):
        if lv.shape != (2 ** bits,) or bd.shape != (2 ** bits - 1,):
            raise ValueError(f"make_codebook: {name} levels must be [{2 ** bits}] and boundaries "
                             f"[{2 ** bits - 1}], got {tuple(lv.shape)} and {tuple(bd.shape)}")
        if not (lv.isfinite().all() and bd.isfinite().all() and (lv.diff() > 0).all() and (bd.diff() > 0).all()):
            raise ValueError(f"make_codebook: {name} levels and boundaries must be finite and strictly ascending")
    return Codebook(key_bits, value_bits, levels[0], bounds[0], levels[1], bounds[1],
                    key_offset.float().contiguous(), key_scale.float().contiguous(), key_group)


def allocate_storage(batch: int, kv_heads: int, head_dim: int, capacity: int, codebook: Codebook, slots: int = 1,
                     sink: int = 0, window: int = 0, dtype: torch.dtype = torch.float16, device=None) -> Storage:
    """Empty cache buffers of one layer for ``capacity`` positions per sequence (lengths 0). A Python helper, not a
    registered op (allocation: it builds the NamedTuple that kv_quant_append_ fills and kv_quant_decode_attention
    reads).

    Args:
        batch, kv_heads, capacity: sequences, kv heads and positions per sequence, each >= 1.
        head_dim: one of 32, 64, 128, 256; [kv_heads, head_dim] must be the codebook's key_offset shape.
        codebook: the layer's Codebook (make_codebook or torchext.nn.calibrate): its bits size the packed codes.
        slots: outlier slots per [head_dim] vector (reference.kv_quant.outlier_slots(head_dim, fraction)), 0 for
            none, < head_dim.
        sink: leading positions kept in ``dtype``; window: most recent positions kept in ``dtype`` (a ring
            buffer); with the codebook's key_group G > 0 (KIVI mode) window >= G, as it holds each group until
            the group is complete.
        dtype: the cache dtype, float16 (default), bfloat16 or float32; device: where the buffers live.

    Returns:
        A reference.kv_quant.Storage, every buffer zero (outlier indices -1: empty) with the shape and dtype
        reference.kv_quant.layout gives: e.g. key_codes [batch, kv_heads, capacity, words] int32, sink_keys
        [batch, kv_heads, sink, head_dim] and window_keys [batch, kv_heads, window, head_dim] in ``dtype``,
        lengths [batch] int32.

    Raises:
        TypeError for a non-int size or an unsupported dtype, ValueError for sizes out of range or a codebook of
        another [kv_heads, head_dim].
    """
    for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("capacity", capacity),
                        ("slots", slots), ("sink", sink), ("window", window)):
        check_int("allocate_storage", name, value)
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"allocate_storage: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    if dtype not in CACHE_DTYPES:
        raise TypeError(f"allocate_storage: dtype must be one of {CACHE_DTYPES}, got {dtype}")
    if min(batch, kv_heads, capacity) < 1 or min(slots, sink, window) < 0 or slots >= head_dim:
        raise ValueError(f"allocate_storage: need batch, kv_heads, capacity >= 1, 0 <= slots < head_dim and sink, "
                         f"window >= 0, got batch={batch}, kv_heads={kv_heads}, capacity={capacity}, slots={slots}, "
                         f"sink={sink}, window={window}")
    if tuple(codebook.key_offset.shape) != (kv_heads, head_dim):
        raise ValueError(f"allocate_storage: the codebook is for [kv_heads, head_dim] = "
                         f"{list(codebook.key_offset.shape)}, not [{kv_heads}, {head_dim}]")
    if window < codebook.key_group:
        raise ValueError(f"allocate_storage: the KIVI mode (key_group={codebook.key_group}) needs window >= "
                         f"key_group to hold the incomplete group, got window={window}")
    spec = ref.layout(batch, kv_heads, capacity, head_dim, slots, sink, window, codebook.key_bits,
                      codebook.value_bits, dtype, codebook.key_group)
    empty = {name: -1 if name.endswith("outlier_index") else 0 for name in spec}  # -1: an empty outlier slot
    return Storage(*(torch.full(shape, empty[name], dtype=dt, device=device) for name, (shape, dt) in spec.items()))


def bytes_per_position(storage: Storage, codebook: Codebook) -> dict[str, float]:
    """Bytes one packed position of one sequence takes in each packed buffer (all kv heads): the codes, the value
    offset and scale, the outlier slots and, in the KIVI mode, its share of its key group's ranges. The sink and
    window are counted apart."""
    sizes = {name: getattr(storage, name)[0, :, 0].numel() * getattr(storage, name).element_size()
             for name in ref.PACKED}
    for name in ref.KEY_GROUPS if codebook.key_group else ():
        sizes[name] = getattr(storage, name)[0, :, 0].numel() * getattr(storage, name).element_size() / \
            codebook.key_group
    return sizes


def _check_storage(op: str, storage: Storage, codebook: Codebook) -> tuple[int, ...]:
    """(batch, kv_heads, capacity, head_dim, slots) after checking every buffer against the layout."""
    batch, kv_heads, capacity, _ = storage.key_codes.shape
    head_dim, slots = storage.sink_keys.shape[-1], storage.key_outlier_index.shape[-1]
    if codebook.key_group and storage.window_keys.shape[2] < codebook.key_group:
        raise ValueError(f"{op}: the KIVI mode needs window >= key_group={codebook.key_group}, got "
                         f"{storage.window_keys.shape[2]}")
    expected = ref.layout(batch, kv_heads, capacity, head_dim, slots, storage.sink_keys.shape[2],
                          storage.window_keys.shape[2], codebook.key_bits, codebook.value_bits,
                          storage.sink_keys.dtype, codebook.key_group)
    for name, tensor in zip(Storage._fields, storage):
        shape, dt = expected[name]
        check_tensor(op, f"storage.{name}", tensor, (dt,))
        check_shape(op, f"storage.{name}", tensor, shape)
        if not tensor.is_contiguous():
            raise ValueError(f"{op}: storage.{name} must be contiguous")
        check_same_device(op, **{"storage.key_codes": storage.key_codes, f"storage.{name}": tensor})
    check_shape(op, "codebook.key_offset", codebook.key_offset, (kv_heads, head_dim))
    check_shape(op, "codebook.key_scale", codebook.key_scale, (kv_heads, head_dim))
    for name in ("key_levels", "key_boundaries", "value_levels", "value_boundaries", "key_offset", "key_scale"):
        tensor = getattr(codebook, name)
        check_tensor(op, f"codebook.{name}", tensor, (torch.float32,))
        check_same_device(op, **{"storage.key_codes": storage.key_codes, f"codebook.{name}": tensor})
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"{op}: head_dim must be one of {HEAD_DIMS}, got {head_dim}")
    return batch, kv_heads, capacity, head_dim, slots


# ---- quantize-and-append --------------------------------------------------------------------------------------------


def _check_append(storage: Storage, codebook: Codebook, k: Tensor, v: Tensor, counts: Tensor) -> None:
    op = "kv_quant_append_"
    batch, kv_heads, _, head_dim, _ = _check_storage(op, storage, codebook)
    for name, x in (("k", k), ("v", v)):
        check_tensor(op, name, x, (storage.sink_keys.dtype,), ndim=4)
        if x.shape[0] != batch or x.shape[1] != kv_heads or x.shape[3] != head_dim:
            raise ValueError(f"{op}: {name} must be [batch={batch}, kv_heads={kv_heads}, n, head_dim={head_dim}], "
                             f"got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have unit stride in its last dim, got strides {x.stride()}")
    check_shape(op, "v", v, k.shape)
    check_tensor(op, "counts", counts, (torch.int32,), ndim=1)
    check_shape(op, "counts", counts, (batch,))
    check_same_device(op, k=k, v=v, counts=counts, storage=storage.key_codes)


def _append_cuda(storage: Storage, codebook: Codebook, k: Tensor, v: Tensor, counts: Tensor) -> None:
    """The CUDA append, every buffer handed by its Storage field name (the binding's keyword arguments)."""
    batch, kv_heads, n, head_dim = k.shape
    CUDA_EXT.kv_quant_append(
        k=k.data_ptr(), v=v.data_ptr(), k_strides=k.stride()[:3], v_strides=v.stride()[:3],
        counts=counts.data_ptr(), lengths=storage.lengths.data_ptr(),
        **{name: getattr(storage, name).data_ptr() for name in ref.CUDA_APPEND},
        **{name: getattr(codebook, name).data_ptr() for name in
           ("key_boundaries", "value_boundaries", "key_offset", "key_scale")},
        batch=batch, kv_heads=kv_heads, n_new=n, head_dim=head_dim, capacity=storage.key_codes.shape[2],
        slots=storage.key_outlier_index.shape[3], sink=storage.sink_keys.shape[2],
        window=storage.window_keys.shape[2], key_bits=codebook.key_bits, value_bits=codebook.value_bits,
        dtype=cuda_dtype_code(k.dtype), stream=torch.cuda.current_stream(k.device).cuda_stream)


# The ops take the Storage and Codebook NamedTuples flattened, field by field, in their declared order.
_STORAGE_ARGS = ", ".join(f"Tensor(a{i}!) {name}" for i, name in enumerate(Storage._fields))
_CODEBOOK_INTS = ("key_bits", "value_bits", "key_group")
_CODEBOOK_ARGS = ", ".join(f"{'int' if name in _CODEBOOK_INTS else 'Tensor'} {name}" for name in Codebook._fields)
_N_STORAGE, _N_CODEBOOK = len(Storage._fields), len(Codebook._fields)
torch.library.define("torchext::kv_quant_append_",
                     f"({_STORAGE_ARGS}, {_CODEBOOK_ARGS}, Tensor k, Tensor v, Tensor counts) -> ()")


def _unflatten(args) -> tuple:
    """(Storage, Codebook, the remaining arguments) from the flattened op arguments."""
    codebook_end = _N_STORAGE + _N_CODEBOOK
    return (Storage(*args[:_N_STORAGE]), Codebook(*args[_N_STORAGE:codebook_end]), *args[codebook_end:])


@torch.library.impl("torchext::kv_quant_append_", "CompositeExplicitAutograd")
def _kv_quant_append_impl(*args) -> None:
    storage, codebook, k, v, counts = _unflatten(args)
    _check_append(storage, codebook, k, v, counts)
    if use_cuda_ext(k) and hasattr(CUDA_EXT, "kv_quant_append") and not codebook.key_group:
        _append_cuda(storage, codebook, k, v, counts)  # the KIVI mode appends through the reference (torch)
    else:
        ref.append(storage, codebook, k, v, counts)


@torch.library.register_fake("torchext::kv_quant_append_")
def _(*args) -> None:
    _check_append(*_unflatten(args))


def kv_quant_append_(storage: Storage, codebook: Codebook, k: Tensor, v: Tensor, counts: Tensor | None = None,
                     check: bool = False) -> None:
    """Quantize new tokens and append them to a packed cache, in place (prefill and decode alike).

    Args:
        storage: the layer's buffers (allocate_storage); mutated, lengths advanced by counts.
        codebook: the layer's Codebook (make_codebook or torchext.nn.calibrate).
        k: [batch, kv_heads, n, head_dim] keys BEFORE RoPE, in the cache dtype; v: the same shape.
        counts: [batch] int32, tokens of each sequence to take (the first counts[b] of k[b]); default n each.
        check: a debug mode that reads counts and lengths to the host (one host sync) and raises ValueError
            before anything is written if a sequence cannot take its tokens or is poisoned. By default nothing is
            read to the host (CUDA-graph safe): a sequence that cannot take its tokens (counts[b] outside [0, n],
            or lengths[b] + counts[b] past the capacity) is poisoned on the device instead: nothing is written for
            it, lengths[b] becomes reference.kv_quant.POISONED_LENGTH (-1) and stays so on later appends, and
            kv_quant_decode_attention gives NaN in every head of it. Zeroing its length clears it.

    Positions below `sink` go to the sink, the last `window` positions to the ring buffer (both in the cache
    dtype), and each position leaving the window is quantized (keys per channel, values per token, outliers into
    their slots); in the KIVI mode (codebook.key_group > 0) positions leave in whole groups. The KIVI mode runs
    the reference append (torch, a host sync per sequence) on CUDA too: the CUDA append kernel is KVQuant's.
    """
    check_tensor("kv_quant_append_", "k", k, ndim=4)
    if counts is not None:
        check_tensor("kv_quant_append_", "counts", counts, (torch.int32,), ndim=1)
    if counts is None:
        counts = torch.full((storage.lengths.shape[0],), k.shape[2], dtype=torch.int32, device=k.device)
    if check:
        _check_append(storage, codebook, k, v, counts)
        _check_counts_on_host(storage, counts, k.shape[2])
    torch.ops.torchext.kv_quant_append_(*storage, *codebook, k, v, counts)


def _check_counts_on_host(storage: Storage, counts: Tensor, n: int) -> None:
    """check=True: raise unless every sequence can take its tokens (reference.kv_quant.can_take), from one host
    read of counts and lengths."""
    op, capacity = "kv_quant_append_", storage.key_codes.shape[2]
    counts_host, lengths_host = torch.stack((counts, storage.lengths)).tolist()
    poisoned = [b for b, length in enumerate(lengths_host) if length < 0]
    if poisoned:
        raise ValueError(f"{op}: sequences {poisoned} are poisoned (a negative length: an earlier append could "
                         f"not take their tokens); zero their lengths to reuse them")
    if not all(0 <= count <= n for count in counts_host):
        raise ValueError(f"{op}: counts must be in [0, n={n}], got {counts_host}")
    over = [b for b, (length, count) in enumerate(zip(lengths_host, counts_host)) if length + count > capacity]
    if over:
        raise ValueError(f"{op}: sequences {over} would pass the cache capacity of {capacity} positions (lengths "
                         f"{lengths_host}, adding {counts_host}); nothing was written")


# ---- decode attention -----------------------------------------------------------------------------------------------


def _check_decode(q: Tensor, storage: Storage, codebook: Codebook, inv_freq: Tensor) -> None:
    op = "kv_quant_decode_attention"
    batch, kv_heads, _, head_dim, _ = _check_storage(op, storage, codebook)
    check_tensor(op, "q", q, (storage.sink_keys.dtype,), ndim=4)
    if q.shape[0] != batch or q.shape[2] != 1 or q.shape[3] != head_dim:
        raise ValueError(f"{op}: q must be [batch={batch}, heads, 1, head_dim={head_dim}] (one decode token per "
                         f"sequence), got {tuple(q.shape)}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"{op}: q has {q.shape[1]} heads, not a multiple of the cache's {kv_heads} kv heads")
    if q.stride(-1) != 1:
        raise ValueError(f"{op}: q must have unit stride in its last dim, got strides {q.stride()}")
    check_tensor(op, "inv_freq", inv_freq, (torch.float32,), ndim=1)
    check_shape(op, "inv_freq", inv_freq, (head_dim // 2,))
    check_same_device(op, q=q, inv_freq=inv_freq, storage=storage.key_codes)


_STORAGE_INPUTS = ", ".join(f"Tensor {name}" for name in Storage._fields)
torch.library.define("torchext::kv_quant_decode_attention",
                     f"(Tensor q, {_STORAGE_INPUTS}, {_CODEBOOK_ARGS}, Tensor inv_freq, "
                     f"float attention_scaling, float scale, int max_length) -> Tensor")


@torch.library.impl("torchext::kv_quant_decode_attention", "CompositeExplicitAutograd")
def _kv_quant_decode_attention_impl(*args) -> Tensor:
    q, (storage, codebook, inv_freq, attention_scaling, scale, max_length) = args[0], _unflatten(args[1:])
    _check_decode(q, storage, codebook, inv_freq)
    if use_triton(q):
        from torchext.triton_kernels.kv_quant import kv_quant_decode_fwd
        return kv_quant_decode_fwd(q, storage, codebook, inv_freq, attention_scaling, scale, max_length)
    keys, values = ref.read(storage, codebook)
    return ref.decode_attention(q, keys, values, storage.lengths, inv_freq, attention_scaling, scale).to(q.dtype)


@torch.library.register_fake("torchext::kv_quant_decode_attention")
def _(*args) -> Tensor:
    q, (storage, codebook, inv_freq, *_) = args[0], _unflatten(args[1:])
    _check_decode(q, storage, codebook, inv_freq)
    return torch.empty_like(q)


def kv_quant_decode_attention(q: Tensor, storage: Storage, codebook: Codebook, inv_freq: Tensor,
                              attention_scaling: float = 1.0, scale: float | None = None,
                              max_length: int | None = None) -> Tensor:
    """Attention of one new query token per sequence over a packed KVQuant cache (split-K flash decoding).

    Args:
        q: [batch, heads, 1, head_dim] post-RoPE queries in the cache dtype (bf16/fp16/fp32); heads a multiple
            of the cache's kv_heads (GQA/MQA: each kv head's tiles are dequantized once for its whole group).
        storage, codebook: the layer's cache (lengths[b] positions of sequence b are attended: append the
            current token first).
        inv_freq: [head_dim / 2] fp32 RoPE frequencies, with any Llama-3 / YaRN scaling already in them (as in a
            Hugging Face rotary embedding); keys are rotated at their positions inside the kernel.
        attention_scaling: the factor Hugging Face multiplies cos/sin by (1 for plain RoPE and Llama-3 scaling).
        scale: softmax scale, default head_dim^-0.5.
        max_length: an upper bound on the lengths, known on the host (KVQuantCache tracks it), to size the
            split-K grid to the work; default the capacity (correct, but wasteful when the cache is mostly empty).

    Returns:
        out [batch, heads, 1, head_dim] in q.dtype (alone, as every torchext attention op's default; there is no
        log-sum-exp to ask for with return_lse). Not differentiable (inference).
    """
    op = "kv_quant_decode_attention"
    check_tensor(op, "q", q, ndim=4)
    check_tensor(op, "inv_freq", inv_freq, (torch.float32,), ndim=1)
    if max_length is not None:
        check_int(op, "max_length", max_length, minimum=0)
    head_dim = q.shape[-1]
    scale = head_dim ** -0.5 if scale is None else scale
    for name, value in (("scale", scale), ("attention_scaling", attention_scaling)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"kv_quant_decode_attention: {name} must be finite and > 0, got {value}")
    max_length = storage.key_codes.shape[2] if max_length is None else max_length
    return torch.ops.torchext.kv_quant_decode_attention(q, *storage, *codebook, inv_freq,
                                                        float(attention_scaling), float(scale), int(max_length))
