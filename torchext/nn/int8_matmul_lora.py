"""PEFT LoRA on Int8Linear, through PEFT's extension point for custom layers (``LoraConfig._register_custom_module``,
https://huggingface.co/docs/peft/developer_guides/custom_models); PEFT itself is not patched. Needs ``peft``.

    from torchext.nn.int8_matmul_lora import lora_config
    model = peft.get_peft_model(int8_model, lora_config(r=8, target_modules=["query", "value"]))

The int8 layer stays frozen (its codes are buffers); the adapters train in the activations' dtype, and the input
gradient flows through the int8 layer as Int8Linear computes it.
"""

from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

from torchext.nn.int8_matmul import Int8Linear


class Int8LoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around an Int8Linear: y = int8_layer(x) + scaling * B(A(dropout(x))) per active adapter.

    Plain LoRA (rsLoRA scaling included); DoRA, aLoRA and the other variants, and merging into the int8 codes,
    raise: a merge would re-quantize the weight and change every output, not only the adapter's.
    """

    def __init__(self, base_layer: Int8Linear, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs) -> None:
        variants = {"use_dora": config.use_dora, "alora_invocation_tokens": config.alora_invocation_tokens,
                    "arrow_config": getattr(config, "arrow_config", None),
                    "velora_config": getattr(config, "velora_config", None)}
        requested = [name for name, value in variants.items() if value]
        if requested:
            raise ValueError(f"Int8LoraLinear: only plain LoRA is supported on Int8Linear, got {', '.join(requested)}")
        return None

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("Int8LoraLinear: merging a LoRA adapter into int8 codes would re-quantize the "
                                  "whole weight; keep the adapter separate (or merge into the float model before "
                                  "replace_linear)")

    def unmerge(self) -> None:
        raise NotImplementedError("Int8LoraLinear: adapters are never merged into the int8 codes")

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """x: [..., in_features] -> [..., out_features] in the int8 layer's output dtype (x's)."""
        self._check_forward_args(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            update = lora_B(lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(**kwargs) -> LoraConfig:
    """A ``peft.LoraConfig(**kwargs)`` that wraps Int8Linear layers in Int8LoraLinear (plain nn.Linear layers get
    PEFT's own LoRA layer, as usual)."""
    config = LoraConfig(**kwargs)
    config._register_custom_module({Int8Linear: Int8LoraLinear})
    return config
