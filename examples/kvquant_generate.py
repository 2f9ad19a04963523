"""Generate with a KVQuant cache in a Hugging Face Llama: calibrate, then decode against a 16-bit DynamicCache.

    .venv/bin/python examples/kvquant_generate.py [--model PATH] [--bits 4 3 2] [--new-tokens 64]

With --model it loads a local checkpoint (nothing is downloaded); without, it builds a small random-init Llama
(GQA, head_dim 64) and calibrates on random tokens, so only the mechanics and the memory are meaningful there.
Per bit width it prints where greedy decoding first departs from the 16-bit cache, the largest logit difference
on the first decode step, the true bits per cached element (codes, scales, outliers, sink, tables), and the time
per generated token. Measured on 2 CPU cores without --model: 37 s.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

from torchext.nn import KVQuantCache, cache_kwargs, calibrate


def small_llama(device, dtype):
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def generate(model, ids, cache, new_tokens):
    """(generated ids, seconds per token, logits of the first decode step: the prefill's own logits come from
    16-bit attention over the prompt, the next ones read the quantized cache)."""
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, **cache_kwargs(model, cache),
                         attention_mask=torch.ones_like(ids), pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return out.sequences[:, ids.shape[1]:], (time.perf_counter() - start) / new_tokens, out.logits[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local Hugging Face causal LM checkpoint (Llama-style)")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64, help=">= 2")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=dtype).to(device).eval() if args.model
             else small_llama(device, dtype))
    model.generation_config.eos_token_id = None  # always generate new_tokens
    vocab = model.config.vocab_size
    calibration = [torch.randint(0, vocab, (4, args.prompt_tokens), device=device)]
    ids = torch.randint(0, vocab, (1, args.prompt_tokens), device=device)
    max_length = args.prompt_tokens + args.new_tokens
    with torch.no_grad():
        expected, fp16_time, fp16_logits = generate(model, ids, DynamicCache(config=model.config), args.new_tokens)
        print(f"16-bit DynamicCache: {fp16_time * 1e3:.1f} ms/token")
        for bits in args.bits:
            cache = KVQuantCache(calibrate(model, calibration, bits=bits), model, max_length=max_length)
            tokens, seconds, logits = generate(model, ids, cache, args.new_tokens)
            model.set_attn_implementation("sdpa")
            departs = (tokens != expected)[0].nonzero()
            first = departs[0].item() if len(departs) else args.new_tokens
            report = cache.memory_report()
            print(f"{bits}-bit KVQuant: greedy identical for {first}/{args.new_tokens} tokens, first-step logit "
                  f"error {(logits - fp16_logits).abs().max().item():.3g}, {report['bits_per_element']:.2f} bits per "
                  f"element ({report['total_bytes'] / 2 ** 20:.2f} MiB vs {report['fp16_bytes'] / 2 ** 20:.2f} "
                  f"MiB 16-bit), {seconds * 1e3:.1f} ms/token")


if __name__ == "__main__":
    main()
