"""Low-memory mode (quant.py) on one LLM: greedy decode tokens/s and weight bytes, float vs int8 vs int4, in one run.

    python bench_quant.py [--new-tokens 256]       # GPU: LLaMA-7B's shape in fp16; CPU: dim 1024 x 8 layers, fp32
"""
import argparse
import copy
import time

import torch

from llama import Llama, LlamaConfig
from quant import quantize_


def bench_quant(args):
    """Float, int8 and int4 copies of the same random weights; ratios against float's tok/s and bytes."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if dev == "cuda" else torch.float32
    cfg = LlamaConfig() if dev == "cuda" else LlamaConfig(dim=1024, n_layers=8, n_heads=16, hidden_dim=2816)
    torch.manual_seed(0)
    with torch.device(dev):
        base = Llama(cfg).to(dtype).eval()
    prompt, n = torch.randint(3, cfg.vocab_size, (1, 16), device=dev), args.new_tokens
    params = sum(p.numel() for p in base.parameters()) / 1e6
    print(f"decode {n} tokens after 16, {dev}, LLaMA dim {cfg.dim} x {cfg.n_layers} layers ({params:.0f}M params)")
    rows = []
    for mode in (None, "int8", "int4"):
        m = base if mode is None else quantize_(copy.deepcopy(base), mode)
        weight_bytes = sum(t.numel() * t.element_size() for t in m.state_dict().values())
        with torch.no_grad():
            cache, out = m.new_cache(1, 16 + n + 1), []
            tok = m(prompt, cache=cache)[:, -1:].argmax(-1)
            sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
            sync()
            t0 = time.time()
            for _ in range(n):
                out.append(tok)
                tok = m(tok, cache=cache)[:, -1:].argmax(-1)
            sync()
            rate = n / (time.time() - t0)
        rows.append((mode or str(dtype).split(".")[1], rate, weight_bytes, torch.cat(out, 1)))
        if mode is not None:
            del m
    ref = rows[0]
    for name, rate, nbytes, toks in rows:
        agree = (toks == ref[3]).float().mean().item()
        print(f"  {name:8s} {rate:8.1f} tok/s ({rate / ref[1]:.2f}x)  weights {nbytes / 2**20:8.1f} MiB "
              f"({nbytes / ref[2]:.2f}x)  greedy tokens = float's: {agree:.0%}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="LLM decode tok/s and weight bytes: float vs int8 vs int4.")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens decoded after a 16-token prompt")
    return 0 if bench_quant(p.parse_args(argv)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
