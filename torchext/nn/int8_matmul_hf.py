"""Int8Linear models in Hugging Face transformers: save_pretrained writes a quantization config, from_pretrained
reads it back through a registered quantizer (transformers' extension point for quantization methods), and
bitsandbytes LLM.int8() checkpoints, whose tensors have the same names and layout, load both ways. Needs
``transformers``; importing this module registers the "torchext_int8" method.

    import torchext.nn.int8_matmul_hf as hf
    hf.quantize(model, threshold=6.0, skip=("lm_head",))   # replace_linear + the config save_pretrained writes
    model.save_pretrained(path)
    model = AutoModel.from_pretrained(path)                # Int8Linear layers, the same outputs
    model = AutoModel.from_pretrained(bnb_path, config=hf.config_from_bitsandbytes(bnb_path))  # bnb -> torchext
    model = AutoModel.from_pretrained(path, config=hf.config_for_bitsandbytes(path))           # torchext -> bnb
"""

from torch import nn
from transformers import AutoConfig, BitsAndBytesConfig, PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from torchext.nn.int8_matmul import Int8Linear, replace_linear

METHOD = "torchext_int8"


@register_quantization_config(METHOD)
class TorchextInt8Config(QuantizationConfigMixin):
    """The quantization config of a model whose nn.Linear layers are Int8Linear (dynamic outlier columns).

    Args:
        threshold: the layers' outlier threshold (LLM.int8()'s alpha).
        skip_modules: names of the nn.Linear layers kept in float (as in replace_linear's ``skip``).
    """

    def __init__(self, threshold: float = 6.0, skip_modules: list[str] | None = None, **kwargs):
        self.quant_method = METHOD
        self.threshold = threshold
        self.skip_modules = list(skip_modules or [])


@register_quantizer(METHOD)
class TorchextInt8Quantizer(HfQuantizer):
    """Builds Int8Linear layers (codes, scales and layout code as buffers) before the checkpoint's tensors are
    assigned to them by name. Only checkpoints saved int8 load this way: quantizing a float checkpoint while it
    loads raises (load it as float, then ``quantize``), so float weights never land in int8 buffers."""

    requires_calibration = True  # pre-quantized checkpoints only; transformers then refuses pre_quantized=False

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        skip = set(config.skip_modules)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name not in skip:
                layer = Int8Linear(module.in_features, module.out_features, module.bias is not None, config.threshold,
                                   device=module.weight.device, dtype=module.weight.dtype)
                model.set_submodule(name, layer)

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False  # the checkpoint holds the codes

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # input gradients, e.g. for LoRA (torchext.nn.int8_matmul_lora)


def quantize(model: nn.Module, threshold: float = 6.0, skip=(), **kwargs) -> dict:
    """replace_linear(model, threshold, skip, **kwargs) on a transformers model, and set its
    ``config.quantization_config`` so that save_pretrained writes a checkpoint from_pretrained reloads.
    Returns replace_linear's report. Static outlier columns are not saved this way yet (ValueError)."""
    if kwargs.get("outliers", "dynamic") != "dynamic":
        raise ValueError("quantize: only outliers='dynamic' layers save to a Hugging Face checkpoint so far")
    report = replace_linear(model, threshold, skip, **kwargs)
    model.config.quantization_config = TorchextInt8Config(threshold, sorted(skip))
    return report


def config_from_bitsandbytes(path: str) -> PretrainedConfig:
    """The config of the bitsandbytes 8-bit checkpoint at ``path`` with its quantization config replaced by the
    equivalent TorchextInt8Config (same threshold and skipped modules; a dict, the form from_pretrained reads from
    a config): from_pretrained(path, config=...) then builds Int8Linear layers and loads bitsandbytes' ``weight``,
    ``SCB`` and ``weight_format`` into them."""
    config = AutoConfig.from_pretrained(path)
    bnb = config.quantization_config
    bnb = bnb if isinstance(bnb, dict) else bnb.to_dict()
    if bnb.get("quant_method") != "bitsandbytes" or not bnb.get("load_in_8bit"):
        raise ValueError(f"config_from_bitsandbytes: {path} is not a bitsandbytes 8-bit checkpoint "
                         f"(quantization_config {bnb})")
    ours = TorchextInt8Config(bnb["llm_int8_threshold"], bnb.get("llm_int8_skip_modules"))
    config.quantization_config = ours.to_dict()
    return config


def config_for_bitsandbytes(path: str) -> PretrainedConfig:
    """The config of the torchext checkpoint at ``path`` as bitsandbytes' LLM.int8() config, for loading it into
    bitsandbytes' Linear8bitLt layers: from_pretrained(path, config=...)."""
    config = AutoConfig.from_pretrained(path)
    ours = config.quantization_config
    ours = ours if isinstance(ours, dict) else ours.to_dict()
    if ours.get("quant_method") != METHOD:
        raise ValueError(f"config_for_bitsandbytes: {path} is not a torchext int8 checkpoint (quantization_config "
                         f"{ours})")
    config.quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=ours["threshold"],
                                                    llm_int8_skip_modules=ours["skip_modules"] or None).to_dict()
    return config
