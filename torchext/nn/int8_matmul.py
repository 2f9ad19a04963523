"""LLM.int8() layers (Dettmers et al., arXiv 2208.07339): a drop-in int8 nn.Linear and model helpers.

    outliers = calibrate_outliers(model, batches)                      # optional: static outlier columns
    report = replace_linear(model, skip=("head",), outliers="static", outlier_cols=outliers)
    print(report)                                                      # memory before/after, outliers per layer

Tensor parallelism: parallelize the float model first (torch's ColwiseParallel / RowwiseParallel shard nn.Linear
only), then ``replace_linear``: each sharded layer becomes an Int8Linear holding DTensor codes, scales and outlier
columns laid out as ``_tp_placements`` says, and keeps the plan's input/output hooks.
"""

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from torchext import ops
from torchext._dtensor import DTensor, Partial, Replicate, Shard, from_local, local
from torchext.ops._int8_matmul import DEFAULT_CAPACITY
from torchext.reference.int8_matmul import int8_dequantize, quantize_weight

ROW_FORMAT = 0  # bitsandbytes' weight_format code for row-major int8 codes (the only layout it still has)


def _tp_placements() -> dict[str, dict[str, object]]:
    """Where each tensor of a tensor-parallel Int8Linear lives, for a colwise split (of the N output features: the
    float weight Shard(0)) and a rowwise one (of the K input features: Shard(1)).

    The codes follow the float weight. A per-row scale travels with its row: colwise, SCB is sharded like the rows;
    rowwise, every rank keeps all N scales, each the absmax of the whole row (quantized before the split), which its
    K-slice of the codes shares. Outlier columns are input columns: colwise, every rank sees all of K (the column
    list and the slot of each column replicated, the 16-bit weight columns sharded by rows); rowwise, each rank owns
    its K-slice (the slots sharded with it, the few 16-bit weight columns replicated), so the int8 dot and its
    outlier correction split with K and the ranks' partial outputs are summed.
    """
    return {"colwise": dict(weight=Shard(0), SCB=Shard(0), bias=Shard(0), weight16=Shard(0),
                            weight16_slot=Replicate(), outlier_cols=Replicate()),
            "rowwise": dict(weight=Shard(1), SCB=Replicate(), bias=Replicate(), weight16=Replicate(),
                            weight16_slot=Shard(0), outlier_cols=Replicate())}


def _tp_style(weight: Tensor) -> str:
    """"colwise" or "rowwise" for a float weight sharded by parallelize_module's ColwiseParallel / RowwiseParallel."""
    placements = tuple(weight.placements)
    for style, placement in (("colwise", Shard(0)), ("rowwise", Shard(1))):
        if placements == (placement,):
            return style
    raise NotImplementedError(f"Int8Linear: a float weight with placements {placements} on a "
                              f"{weight.device_mesh.ndim}-D mesh; tensor parallelism is supported on a 1-D mesh with "
                              f"ColwiseParallel (Shard(0)) or RowwiseParallel (Shard(1))")


class Int8Linear(nn.Module):
    """nn.Linear with an int8 weight: codes [out, in] (``weight``) and fp32 per-row absmax (``SCB``).

    The state_dict uses bitsandbytes' Linear8bitLt names (``weight``, ``SCB``, ``weight_format``), so
    checkpoints load both ways. The weight is frozen; gradients flow to the input (and bias), so LoRA-style
    fine-tuning works.

    Args:
        threshold: dynamic mode: input columns holding any |x| >= threshold take the 16-bit path (paper: 6).
        outliers: "dynamic" finds outlier columns in every call, like the paper (results depend on the rest of
            the batch); "static" uses a fixed set from ``calibrate_outliers`` (batch-invariant). Columns known
            from calibration keep their weight columns in 16-bit in both modes (the paper's decomposition);
            other outlier columns use the dequantized int8 weight (what bitsandbytes does for all of them).
        capacity: the length of the per-call outlier list, and at most this many known columns; None (default):
            in_features, so any number of outlier columns is exact (a shorter list that overflows gives NaN
            outputs, never silently wrong ones).
        int8_backward: input gradient by int8 GEMM on the codes (True: less memory, 2.5x the error) or, the
            default, by the weight dequantized to x's dtype (bitsandbytes' input gradient).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, threshold: float = 6.0,
                 outliers: str = "dynamic", capacity: int | None = None, int8_backward: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if outliers not in ("dynamic", "static"):
            raise ValueError(f"Int8Linear: outliers must be 'dynamic' or 'static', got {outliers!r}")
        self.in_features, self.out_features = in_features, out_features
        self.threshold, self.outliers, self.capacity, self.int8_backward = threshold, outliers, capacity, int8_backward
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("SCB", torch.ones(out_features, dtype=torch.float32, device=device))
        # bitsandbytes' layout code, a buffer (not only a state_dict entry) so that loaders that assign tensors by
        # name, such as transformers' from_pretrained, find it.
        self.register_buffer("weight_format", torch.tensor(ROW_FORMAT, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        # From calibration: the known outlier columns [n], their weight columns in 16-bit [out, n], and the
        # weight16 column of each input column (-1: none) [in].
        self.register_buffer("outlier_cols", None)
        self.register_buffer("weight16", None)
        self.register_buffer("weight16_slot", None)

    @classmethod
    def from_float(cls, linear: nn.Linear, threshold: float = 6.0, outliers: str = "dynamic",
                   outlier_cols: Tensor | None = None, **kwargs) -> "Int8Linear":
        """Quantize an nn.Linear. ``outlier_cols`` (e.g. from ``calibrate_outliers``) are the input columns whose
        weight columns stay in the linear's 16-bit dtype; in static mode they are also the fixed outlier set."""
        if isinstance(linear.weight, DTensor):
            return cls._from_tensor_parallel(linear, threshold, outliers, outlier_cols, **kwargs)
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, outliers,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight, layer.SCB = quantize_weight(linear.weight.detach())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if outlier_cols is not None:
                layer.set_outlier_cols(outlier_cols, linear.weight)
        return layer

    @classmethod
    @torch.no_grad()
    def _from_tensor_parallel(cls, linear: nn.Linear, threshold: float, outliers: str, outlier_cols: Tensor | None,
                              **kwargs) -> "Int8Linear":
        """Quantize a layer that parallelize_module sharded: the whole weight (gathered once, one layer at a time)
        gives the same codes and scales as one process; each rank then keeps its part (see _tp_placements)."""
        style, mesh = _tp_style(linear.weight), linear.weight.device_mesh
        whole = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        whole.weight = nn.Parameter(linear.weight.full_tensor())
        if linear.bias is not None:
            whole.bias = nn.Parameter(linear.bias.full_tensor())
        layer = cls.from_float(whole, threshold, outliers, outlier_cols, **kwargs)
        for name, placement in _tp_placements()[style].items():
            value = getattr(layer, name)
            if value is None:
                continue
            # Every rank holds the same whole tensor: Replicate -> Shard slices it locally, with no communication.
            value = DTensor.from_local(value.detach(), mesh, [Replicate()], run_check=False)
            value = value.redistribute(mesh, [placement])
            setattr(layer, name, nn.Parameter(value, requires_grad=linear.bias.requires_grad) if name == "bias"
                    else value)
        if style == "rowwise" and layer.outlier_cols is not None:
            # Static mode's outlier set on this rank: its own K-slice's columns, in local indices (those with a slot).
            local_cols = (local(layer.weight16_slot) >= 0).nonzero().flatten().to(torch.int32)
            layer.register_buffer("local_outlier_cols", local_cols, persistent=False)
        return layer

    def set_outlier_cols(self, cols: Tensor, weight: Tensor | None = None) -> None:
        """Record known outlier columns; their 16-bit weight columns come from ``weight``, else from the codes.

        Raises TypeError for cols not an integer tensor, ValueError for a column outside [0, in_features) (a
        setup-time check on the host), NotImplementedError on a tensor-parallel layer."""
        if isinstance(self.weight, DTensor):
            raise NotImplementedError("Int8Linear.set_outlier_cols: this layer is tensor-parallel; calibrate the float "
                                      "model (calibrate_outliers works before or after parallelize_module) and pass "
                                      "the columns to replace_linear(..., outlier_cols=...)")
        self._check_cols(cols)
        cols = torch.unique(cols.to(device=self.weight.device, dtype=torch.int64))[: self.capacity]
        source = weight.detach() if weight is not None else int8_dequantize(self.weight, self.SCB)
        slot = torch.full((self.in_features,), -1, dtype=torch.int32, device=cols.device)
        slot[cols] = torch.arange(cols.numel(), dtype=torch.int32, device=cols.device)
        self.outlier_cols, self.weight16_slot = cols.to(torch.int32), slot
        self.weight16 = source[:, cols].to(self.bias.dtype if self.bias is not None else source.dtype).contiguous()

    def _check_cols(self, cols: Tensor) -> None:
        where = "Int8Linear.set_outlier_cols"
        if not isinstance(cols, Tensor) or cols.is_floating_point() or cols.is_complex() or cols.dtype == torch.bool:
            got = cols.dtype if isinstance(cols, Tensor) else type(cols).__name__
            raise TypeError(f"{where}: cols must be an integer torch.Tensor of column indices, got {got}")
        outside = cols[(cols < 0) | (cols >= self.in_features)]
        if outside.numel():
            raise ValueError(f"{where}: cols must be in [0, {self.in_features}) (in_features), got column "
                             f"{int(outside[0])}")

    def forward(self, x: Tensor) -> Tensor:
        """x: [..., in_features] float32/bfloat16/float16 -> [..., out_features] in x.dtype."""
        if self.outliers == "static" and self.outlier_cols is None:
            raise RuntimeError("Int8Linear(outliers='static') has no outlier columns yet: run "
                               "calibrate_outliers(model, batches) or pass outlier_cols to from_float")
        if isinstance(self.weight, DTensor):
            return self._forward_tensor_parallel(x)
        static_cols = self.outlier_cols if self.outliers == "static" else None
        w16 = self.weight16.to(x.dtype) if self.weight16 is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.int8_linear(x, self.weight, self.SCB, bias, self.threshold, self.capacity, static_cols, w16,
                               self.weight16_slot, self.int8_backward)

    def _forward_tensor_parallel(self, x: Tensor) -> Tensor:
        """The same op on this rank's parts (see _tp_placements): colwise, the whole x gives this rank's output
        features (Shard(-1)); rowwise, x's K-slice gives a partial sum of every output (Partial), the bias added once.
        Rowwise, each rank quantizes its K-slice of x with that slice's own row absmax, as a per-rank activation
        quantization does (no extra collective): outputs equal the sum over ranks of int8_linear on the slices, which
        differs from one process by int8 rounding (each slice's scale fits it at least as tightly)."""
        mesh = self.weight.device_mesh
        colwise = self.weight.placements[0] == Shard(0)
        if not isinstance(x, DTensor):
            raise TypeError("Int8Linear: this layer is tensor-parallel (DTensor weights) and needs a DTensor input; "
                            "parallelize_module's ColwiseParallel / RowwiseParallel hooks make one from the module "
                            f"input (apply replace_linear after parallelize_module), got a {type(x).__name__}")
        x = x.redistribute(mesh, [Replicate() if colwise else Shard(x.dim() - 1)])
        static_cols = None
        if self.outliers == "static":
            static_cols = local(self.outlier_cols) if colwise else self.local_outlier_cols
        w16 = local(self.weight16).to(x.dtype) if self.weight16 is not None else None
        bias = local(self.bias).to(x.dtype) if self.bias is not None and colwise else None
        # Colwise, each rank's gradient of the replicated x covers only its output features: a partial sum.
        x_local = x.to_local(grad_placements=[Partial()] if colwise else None)
        y = ops.int8_linear(x_local, local(self.weight), local(self.SCB), bias, self.threshold, self.capacity,
                            static_cols, w16, local(self.weight16_slot), self.int8_backward)
        shape = (*x.shape[:-1], self.out_features)
        if colwise:
            return from_local(y, mesh, Shard(y.dim() - 1), shape)
        y = from_local(y, mesh, Partial(), shape)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module casts (.to(dtype), .half(), .bfloat16()) convert every floating buffer; the per-row scales must
        # stay fp32 (a bf16 SCB loses the scale's precision and the GEMM rejects it), so they only follow the
        # device. The int8 codes are not floating, so casts leave them be and .to(device) moves them.
        scales = self.SCB
        super()._apply(fn, recurse)
        self.SCB = scales.to(self.weight.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_format = state_dict.setdefault(prefix + "weight_format", self.weight_format)  # optional: row-major
        if int(weight_format) != ROW_FORMAT:
            del state_dict[prefix + "weight_format"]
            error_msgs.append(f"{prefix}weight_format is {int(weight_format)}: only row-major int8 (0) is supported")
        # A float tensor would be copied into the int8 codes (truncated to integers) or the fp32 scales without a
        # word, even with strict=False: refuse it, whatever strict says, and copy nothing of it.
        for name, dtype in (("weight", torch.int8), ("SCB", torch.float32)):
            given = state_dict.get(prefix + name)
            if given is not None and given.dtype != dtype:
                del state_dict[prefix + name]
                error_msgs.append(f"{prefix}{name} is {given.dtype}, Int8Linear stores {dtype}: a float nn.Linear "
                                  f"state_dict loads into nn.Linear, then Int8Linear.from_float quantizes it")
        for name in ("outlier_cols", "weight16", "weight16_slot"):  # None until calibrated: take the checkpoint's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold:g}, outliers={self.outliers}")


@torch.no_grad()
def calibrate_outliers(model: nn.Module, batches: Iterable, threshold: float = 6.0,
                       capacity: int = DEFAULT_CAPACITY) -> dict[str, Tensor]:
    """Run ``model`` on ``batches`` and record, for every nn.Linear / Int8Linear, the input columns that ever
    hold |x| >= threshold (at most ``capacity`` per layer, the largest first).

    Int8Linear layers in static mode get the set directly (weight columns from their codes); pass the result
    to ``replace_linear(..., outliers="static", outlier_cols=...)`` to keep true 16-bit weight columns instead.

    Returns:
        {layer name: int64 column indices, ascending}.
    """
    peaks: dict[str, Tensor] = {}

    def observe(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.full_tensor() if isinstance(x, DTensor) else x  # a tensor-parallel layer's input: all of K
            peak = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return hook

    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    handles = [m.register_forward_hook(observe(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    cols = {}
    for name, peak in peaks.items():
        above = (peak >= threshold).nonzero().flatten()
        cols[name] = above[peak[above].argsort(descending=True)[:capacity]].sort().values
        layer = layers[name]
        if isinstance(layer, Int8Linear) and layer.outliers == "static":
            layer.set_outlier_cols(cols[name])
    return cols


def _bytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _check_not_fully_sharded(model: nn.Module) -> None:
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule
        if any(isinstance(m, FSDPModule) for m in model.modules()):
            raise NotImplementedError("replace_linear: the model is sharded by fully_shard (FSDP2), whose DTensor "
                                      "weights are gathered for each forward; Int8Linear keeps frozen int8 codes in "
                                      "buffers, which fully_shard does not shard. Call replace_linear before "
                                      "fully_shard, or use tensor parallelism (parallelize_module, then "
                                      "replace_linear)")


def _take_forward_hooks(source: nn.Module, target: nn.Module) -> None:
    """parallelize_module's styles act through forward hooks on the layer they shard (the input to Replicate or
    Shard(-1), the output to the plan's layout): the layer that replaces it takes them over."""
    for hooks in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                  "_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
        getattr(target, hooks).update(getattr(source, hooks))


def replace_linear(model: nn.Module, threshold: float = 6.0, skip: Iterable[str] = (), outliers: str = "dynamic",
                   outlier_cols: dict[str, Tensor] | None = None, **kwargs) -> dict:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear, except those named in ``skip`` (e.g. the
    LM head). Extra keyword arguments go to Int8Linear.

    On a model that parallelize_module has sharded (ColwiseParallel / RowwiseParallel on a 1-D mesh), each sharded
    layer is quantized whole (the codes and scales one process would make) and split as ``_tp_placements`` says;
    the new layer keeps the plan's forward hooks. The other order cannot work: torch's parallel styles shard only
    nn.Linear and nn.Embedding. A model under FSDP2's fully_shard is refused (int8 codes are frozen buffers, which
    fully_shard does not shard: quantize first).

    Returns:
        {"bytes_before", "bytes_after": weight (+ bias, scales, 16-bit outlier columns) memory of the replaced
        layers, "layers": {name: number of known outlier columns (kept in 16-bit), or None if none were given}}.
    """
    skip, outlier_cols = set(skip), outlier_cols or {}
    report = {"bytes_before": 0, "bytes_after": 0, "layers": {}}
    _check_not_fully_sharded(model)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]
    for name, linear in targets:
        layer = Int8Linear.from_float(linear, threshold, outliers, outlier_cols.get(name), **kwargs)
        if isinstance(linear.weight, DTensor):
            _take_forward_hooks(linear, layer)
        model.set_submodule(name, layer)
        report["bytes_before"] += _bytes(linear.weight, linear.bias)
        report["bytes_after"] += _bytes(layer.weight, layer.SCB, layer.bias, layer.weight16, layer.weight16_slot)
        report["layers"][name] = None if layer.outlier_cols is None else layer.outlier_cols.numel()
    return report
