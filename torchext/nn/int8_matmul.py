"""LLM.int8() layers (Dettmers et al., arXiv 2208.07339): a drop-in int8 nn.Linear and model helpers.

    outliers = calibrate_outliers(model, batches)                      # optional: static outlier columns
    report = replace_linear(model, skip=("head",), outliers="static", outlier_cols=outliers)
    print(report)                                                      # memory before/after, outliers per layer
"""

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from torchext import ops
from torchext.ops._int8_matmul import DEFAULT_CAPACITY
from torchext.reference.int8_matmul import int8_dequantize, quantize_weight

ROW_FORMAT = 0  # bitsandbytes' weight_format code for row-major int8 codes (the only layout it still has)


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
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, threshold, outliers,
                    device=linear.weight.device, dtype=linear.weight.dtype, **kwargs)
        with torch.no_grad():
            layer.weight, layer.SCB = quantize_weight(linear.weight.detach())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            if outlier_cols is not None:
                layer.set_outlier_cols(outlier_cols, linear.weight)
        return layer

    def set_outlier_cols(self, cols: Tensor, weight: Tensor | None = None) -> None:
        """Record known outlier columns; their 16-bit weight columns come from ``weight``, else from the codes.

        Raises TypeError for cols not an integer tensor, ValueError for a column outside [0, in_features) (a
        setup-time check on the host)."""
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
        static_cols = self.outlier_cols if self.outliers == "static" else None
        w16 = self.weight16.to(x.dtype) if self.weight16 is not None else None
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return ops.int8_linear(x, self.weight, self.SCB, bias, self.threshold, self.capacity, static_cols, w16,
                               self.weight16_slot, self.int8_backward)

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
            peak = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).abs().amax(0).float()
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


def replace_linear(model: nn.Module, threshold: float = 6.0, skip: Iterable[str] = (), outliers: str = "dynamic",
                   outlier_cols: dict[str, Tensor] | None = None, **kwargs) -> dict:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear, except those named in ``skip`` (e.g. the
    LM head). Extra keyword arguments go to Int8Linear.

    Returns:
        {"bytes_before", "bytes_after": weight (+ bias, scales, 16-bit outlier columns) memory of the replaced
        layers, "layers": {name: number of known outlier columns (kept in 16-bit), or None if none were given}}.
    """
    skip, outlier_cols = set(skip), outlier_cols or {}
    report = {"bytes_before": 0, "bytes_after": 0, "layers": {}}
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]
    for name, linear in targets:
        layer = Int8Linear.from_float(linear, threshold, outliers, outlier_cols.get(name), **kwargs)
        model.set_submodule(name, layer)
        report["bytes_before"] += _bytes(linear.weight, linear.bias)
        report["bytes_after"] += _bytes(layer.weight, layer.SCB, layer.bias, layer.weight16, layer.weight16_slot)
        report["layers"][name] = None if layer.outlier_cols is None else layer.outlier_cols.numel()
    return report
