"""Benchmarks.  python bench.py --attention [--dtype fp16|bf16] [--iters 50] [--warmup 10]

--attention: our Triton kernel vs torch SDPA's backends and a naive matmul-softmax on MiniGPT-4's real shapes
(EVA ViT-G, Q-Former, LLaMA-7B prefill and decode). Every result is first checked against the naive one in
fp32. Timing needs CUDA; on CPU it checks tiny versions of the shapes through the Triton interpreter.
"""
import argparse
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before attention.py imports triton
import attention as A  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CHECK_TOL = {torch.float16: 1e-2, torch.bfloat16: 3e-2}  # x max(1, max|ref|)

# name, (B, Hq, Hkv, Lq, Lk, D), causal
ATTENTION_SHAPES = [
    ("ViT-G B64", (64, 16, 16, 257, 257, 88), False),
    ("Q-Former self B64", (64, 12, 12, 32, 32, 64), False),
    ("Q-Former cross B64", (64, 12, 12, 32, 257, 64), False),
    ("LLaMA-7B prefill 128 B1", (1, 32, 32, 128, 128, 128), True),
    ("LLaMA-7B prefill 512 B1", (1, 32, 32, 512, 512, 128), True),
    ("LLaMA-7B prefill 2048 B1", (1, 32, 32, 2048, 2048, 128), True),
    ("LLaMA-7B decode 1024 B1", (1, 32, 32, 1, 1024, 128), True),
]
ATTENTION_SHAPES_CPU = [  # the same cases, shrunk for the interpreter
    ("ViT-G tiny", (1, 2, 2, 257, 257, 88), False),
    ("Q-Former self tiny", (1, 2, 2, 32, 32, 64), False),
    ("Q-Former cross tiny", (1, 2, 2, 32, 257, 64), False),
    ("LLaMA prefill 130 tiny", (1, 2, 2, 130, 130, 128), True),
    ("LLaMA decode 1024 tiny", (1, 2, 2, 1, 1024, 128), True),
    ("GQA decode tiny", (2, 4, 1, 1, 200, 128), True),
]


def naive_attention(q, k, v, causal=False):
    """Matmul-softmax the textbook way: materializes the (Lq, Lk) scores; softmax in fp32."""
    Hq, Lq, D = q.shape[1:]
    Hkv, Lk = k.shape[1:3]
    if Hq != Hkv:
        k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = (q @ k.transpose(-1, -2)).float() * D ** -0.5  # (B, Hq, Lq, Lk)
    if causal:
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1).to(v.dtype) @ v


def sdpa_backends():
    """{name: SDPBackend} that this torch knows."""
    from torch.nn.attention import SDPBackend
    names = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"]
    return {n.split("_")[0].lower(): getattr(SDPBackend, n) for n in names if hasattr(SDPBackend, n)}


def sdpa_call(backend, causal, Lq, Lk):
    """SDPA with one backend forced; bottom-right causal is plain is_causal for Lq == Lk and no mask for Lq = 1."""
    from torch.nn.attention import sdpa_kernel
    assert not causal or Lq in (1, Lk), "bench shapes: causal only for prefill (Lq == Lk) or decode (Lq == 1)"

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Lq == Lk,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return run


def cuda_time_ms(fn, warmup, iters):
    """Median milliseconds of fn() over iters calls, each timed with CUDA events. Before each call the L2
    cache is flushed and the GPU sleeps while Python enqueues the call, so the events time the kernel
    (cold cache), not Python or the launch."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush.zero_()
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of GPU busy-wait
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def check(out, ref, dtype):
    """Max abs error against the fp32 naive result, and whether it is within tolerance."""
    err = (out.float() - ref).abs().max().item()
    return err, err <= CHECK_TOL[dtype] * max(1.0, ref.abs().max().item())


def bench_attention(args):
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = ATTENTION_SHAPES if cuda else ATTENTION_SHAPES_CPU
    has_triton = A.triton is not None
    backends = sdpa_backends() if cuda else {"sdpa": None}
    others = list(backends) + ["naive"]
    name = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"attention forward | device: {name} | {args.dtype} | torch {torch.__version__} | "
          f"triton {A.triton.__version__ if has_triton else 'not installed'}")
    if cuda:
        print(f"time: median of {args.iters} runs (CUDA events, {args.warmup} warmup, cold L2); TFLOP/s counts "
              f"4*B*H*Lq*Lk*D, halved for causal prefill; 'x name' = name's time / ours (> 1: ours faster); "
              f"n/a = that backend refuses the shape")
        print(f"{'shape':26} {'B,Hq,Hkv,Lq,Lk,D':24} {'ours ms':>8} {'TFLOP/s':>8} "
              + " ".join(f"{'x ' + o:>11}" for o in others) + f" {'max err':>9}")
    else:
        print(f"{'shape':26} {'B,Hq,Hkv,Lq,Lk,D':24} {'ours err':>9} {'sdpa err':>9}  (vs naive fp32)")
    failed = False
    for label, (B, Hq, Hkv, Lq, Lk, D), causal in shapes:
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(B, Hq, Lq, D, device=device, dtype=dtype, generator=g)
        k, v = (torch.randn(B, Hkv, Lk, D, device=device, dtype=dtype, generator=g) for _ in range(2))
        ref = naive_attention(q.float(), k.float(), v.float(), causal)
        fns = {"ours": (lambda: A.attention(q, k, v, causal=causal, backend="triton")) if has_triton else None}
        for b, backend in backends.items():  # on CPU: our SDPA fallback
            run = sdpa_call(backend, causal, Lq, Lk) if cuda else (lambda *qkv: A.sdpa_attention(*qkv, causal))
            fns[b] = (lambda run=run: run(q, k, v))
        fns["naive"] = lambda: naive_attention(q, k, v, causal)
        errs, bad = {}, []
        for f_name, fn in fns.items():  # correctness first
            if fn is None:
                continue
            try:
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # SDPA explains at length why a backend refuses
                    errs[f_name], ok = check(fn(), ref, dtype)
            except RuntimeError:  # an SDPA backend that refuses this shape/dtype/device
                if f_name in ("ours", "naive"):
                    raise
                fns[f_name] = None
                continue
            if not ok:
                bad.append(f_name)
        failed |= bool(bad)
        dims = ",".join(map(str, (B, Hq, Hkv, Lq, Lk, D)))
        status = f"  MISMATCH: {', '.join(bad)}" if bad else ""
        if not cuda:
            fmt = lambda n: f"{errs[n]:9.2e}" if n in errs else f"{'n/a':>9}"
            print(f"{label:26} {dims:24} {fmt('ours')} {fmt('sdpa')}{status}")
            continue
        ms = {n: cuda_time_ms(fn, args.warmup, args.iters) for n, fn in fns.items() if fn is not None}
        flops = 4 * B * Hq * Lq * Lk * D * (0.5 if causal and Lq == Lk else 1.0)
        ours = ms.get("ours")
        cells = [f"{ms[o] / ours:>11.2f}" if ours and o in ms else f"{'n/a':>11}" for o in others]
        print(f"{label:26} {dims:24} {ours if ours else float('nan'):8.3f} "
              f"{flops / (ours * 1e-3) / 1e12 if ours else float('nan'):8.1f} " + " ".join(cells)
              + f" {errs.get('ours', float('nan')):9.2e}{status}")
    if not cuda:
        print("correctness only: timings need a GPU (CUDA)")
    return not failed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", action="store_true", help="attention kernel vs SDPA backends and naive")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    run_all = not args.attention  # no section named: run every section
    ok = True
    t0 = time.time()
    if args.attention or run_all:
        ok &= bench_attention(args)
    print(f"done in {time.time() - t0:.1f}s" + ("" if ok else "  (MISMATCH: see above)"))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
