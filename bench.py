"""Benchmarks.  python bench.py --attention [--dtype fp16|bf16] [--iters 50] [--warmup 10]
                python bench.py --e2e [--quick] [--batch 64] [--new-tokens 256] [--peak-tflops T] [--peak-tbps B]

--attention: our Triton kernel vs torch SDPA's backends and a naive matmul-softmax on MiniGPT-4's real shapes
(EVA ViT-G, Q-Former, LLaMA-7B prefill and decode). Every result is first checked against the naive one in
fp32. Timing needs CUDA; on CPU it checks tiny versions of the shapes through the Triton interpreter.

--e2e: the whole model (EVA ViT-G + Q-Former + LLaMA-7B, random weights built on the GPU in bf16) against
transformers (Blip2VisionModel + Blip2QFormerModel + our llama_proj + LlamaForCausalLM on the same weight tensors;
prompts and batches built by our code for both): image encoding, a stage-1 training step, chat at batch 1. Outputs
are checked against transformers first. CPU: tiny presets in fp32, a smoke test. Text goes through the fixture
tokenizer (1000 pieces, ids valid in any LLaMA vocabulary): only token counts matter, and they are printed.
"""
import argparse
import contextlib
import os
import random
import statistics
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before attention.py imports triton
import attention as A  # noqa: E402
from checkpoint import assign, check_complete  # noqa: E402
from generate import generate  # noqa: E402
from llama import RMSNorm, Tokenizer  # noqa: E402
from model import TEMPLATES, MiniGPT4, MiniGPT4Config  # noqa: E402
from train import device_peaks, train_flops  # noqa: E402  (MFU: the same count as train.py's log)

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
    ("LLaMA-7B decode 4096 B1", (1, 32, 32, 1, 4096, 128), True),  # split-KV: 8 splits of 512 keys
    ("LLaMA-7B decode 1024 B8", (8, 32, 32, 1, 1024, 128), True),
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



# ----------------------------------------------------------------------------- end to end (--e2e)

TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures", "reference", "tiny",
                         "llama", "tokenizer.model")
QUESTION = "Describe this image in detail. What is unusual about it, and what might happen next?"
WORDS = "a photo of the small red cat dog sitting on wooden table next to an old blue car in sunny garden".split()


def build_ours(cfg, device, dtype, seed=0):
    """MiniGPT4 with random weights, built on the meta device and filled tensor by tensor on `device`: 2-D+
    weights, biases, tokens ~ N(0, 0.02), norm weights 1 + N(0, 0.02). Dtypes as from_pretrained gives:
    `dtype` for the LLM and for ViT/Q-Former Linear/Conv; fp32 for their norms, cls/pos/query tokens, q/v
    biases, ln_vision and llama_proj."""
    with torch.device("meta"):
        m = MiniGPT4(cfg, tokenizer=Tokenizer(TOKENIZER))
    g = torch.Generator(device).manual_seed(seed)
    for key, p in list(m.named_parameters()):
        owner = m.get_submodule(key.rpartition(".")[0])
        low = key.startswith("llama_model.") or (isinstance(owner, (nn.Linear, nn.Conv2d))
                                                 and not key.startswith("llama_proj."))
        t = torch.empty(p.shape, dtype=dtype if low else torch.float32, device=device).normal_(0, 0.02, generator=g)
        if isinstance(owner, (nn.LayerNorm, RMSNorm)) and key.endswith("weight"):
            t += 1
        assign(m, key, t, t.dtype, device)
    check_complete(m, "bench model")
    return m.eval()


def to_transformers(m, attn="sdpa"):
    """(Blip2VisionModel with ln_vision as its post_layernorm, Blip2QFormerModel, LlamaForCausalLM) holding
    our weights: the very same tensors where the dtype matches (every matmul weight), converted copies of the
    fp32 norms/tokens/biases. Everything in the LLM dtype (transformers' Blip2Model would keep its Q-Former in
    fp32: slower; we give it the faster all-bf16). Renames as tests/test_vit.py and tests/test_qformer.py."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    v, q, c = m.visual_encoder.config, m.Qformer.config, m.llama_model.cfg
    w = m.llama_model.lm_head.weight
    cfgs = [Blip2VisionConfig(hidden_size=v.width, intermediate_size=v.mlp_hidden, num_hidden_layers=v.depth,
                              num_attention_heads=v.n_heads, image_size=v.img_size, patch_size=v.patch_size,
                              layer_norm_eps=v.norm_eps, hidden_act="gelu", qkv_bias=True),
            Blip2QFormerConfig(hidden_size=q.hidden_size, num_hidden_layers=q.n_layers, num_attention_heads=q.n_heads,
                               intermediate_size=q.intermediate_size, layer_norm_eps=q.norm_eps, hidden_act="gelu",
                               encoder_hidden_size=q.encoder_width, cross_attention_frequency=q.cross_attention_freq,
                               use_qformer_text_input=False),
            HFLlamaConfig(hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                          num_key_value_heads=c.n_kv_heads, intermediate_size=c.hidden_dim, vocab_size=c.vocab_size,
                          rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                          tie_word_embeddings=c.tie_embeddings)]
    for hc in cfgs:
        hc._attn_implementation = attn
    with torch.device("meta"):
        vis, qfm, llm = Blip2VisionModel(cfgs[0]), Blip2QFormerModel(cfgs[1]), LlamaForCausalLM(cfgs[2])
    sd_vis = {"post_layernorm." + k: t for k, t in m.ln_vision.state_dict().items()}
    for k, t in m.visual_encoder.state_dict().items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        for a, b in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                     ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
                     (".attn.proj.", ".self_attn.projection."), (".attn.qkv.", ".self_attn.qkv."),
                     (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2.")):
            k = k.replace(a, b)
        sd_vis[k] = t
    for i, blk in enumerate(m.visual_encoder.blocks):  # one qkv bias, zeros for k
        sd_vis[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
            [blk.attn.q_bias, torch.zeros_like(blk.attn.q_bias), blk.attn.v_bias]).detach()
    sd_qf = {k.replace("embeddings.LayerNorm.", "layernorm.").replace(".self.", ".attention."): t
             for k, t in m.Qformer.state_dict().items() if k != "query_tokens"}
    for hf, sd in ((vis, sd_vis), (qfm, sd_qf), (llm, m.llama_model.state_dict())):
        for k, t in sd.items():
            assign(hf, k, t, w.dtype, w.device)
        check_complete(hf, type(hf).__name__)
        hf.requires_grad_(False)  # frozen, like ours: no weight gradients in the training step
    vis.post_layernorm.eps = m.ln_vision.eps  # ln_vision's 1e-5, not the ViT's 1e-6
    with torch.device(w.device):
        llm.model.rotary_emb = LlamaRotaryEmbedding(cfgs[2])  # non-persistent buffers: computed, not loaded
    assert not any(b.is_meta for hf in (vis, qfm, llm) for b in hf.buffers()), "a transformers buffer left on meta"
    return vis.eval(), qfm.eval(), llm.eval()


def hf_encode(m, vis, qfm, pixels):
    """transformers' image side: Blip2 vision (+ ln_vision) -> Q-Former -> our llama_proj. (B, nq, C)"""
    dt = vis.embeddings.patch_embedding.weight.dtype
    x = vis(pixels.to(dt)).last_hidden_state
    x = qfm(query_embeds=m.Qformer.query_tokens.to(dt).expand(x.shape[0], -1, -1), encoder_hidden_states=x)
    return m.llama_proj(x.last_hidden_state.to(m.llama_proj.weight.dtype)).to(m.llama_model.lm_head.weight.dtype)


def seconds(fn, warmup, iters):
    """Mean wall-clock seconds per fn() call after `warmup` calls, synchronized around the timed loop."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for i in range(warmup + iters):
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def rel_err(a, b):  # normwise: robust to single bf16 outliers
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def bench_e2e(args):
    import transformers
    cuda = torch.cuda.is_available()
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    if cuda:
        cfg, name, B, n_new, tol = MiniGPT4Config.from_name("vicuna-7b"), torch.cuda.get_device_name(), \
            args.batch, args.new_tokens, 5e-2
        (w_enc, i_enc), (w_dec, i_dec) = ((1, 3), (0, 1)) if args.quick else ((3, 10), (0, 3))  # decode: warm below
    else:  # smoke test: tiny presets, fp32, everything run once, one thread (tiny ops: threads only spin)
        torch.set_num_threads(1)
        cfg = MiniGPT4Config.from_name("tiny")
        name, B, n_new, tol = "CPU (tiny presets, fp32: a smoke test, timings meaningless)", 2, 16, 1e-4
        (w_enc, i_enc), (w_dec, i_dec) = (0, 1), (0, 1)
    peak_tf, peak_bw = device_peaks(name, args.peak_tflops, args.peak_tbps)
    t_build = time.perf_counter()
    m = build_ours(cfg, dev, dtype)
    vis, qfm, llm = to_transformers(m)
    print(f"MiniGPT-4 end to end | device: {name} | {str(dtype)[6:]} | torch {torch.__version__} | transformers "
          f"{transformers.__version__} | peak {peak_tf or '?'} TFLOP/s, {peak_bw or '?'} TB/s | built in "
          f"{time.perf_counter() - t_build:.1f}s")
    rows, bad = [], []
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    pixels = torch.randn(B, 3, cfg.vit.img_size, cfg.vit.img_size, device=dev,
                         generator=torch.Generator(dev).manual_seed(0))

    # 1. image encoding (ViT + ln_vision + Q-Former + llama_proj), no grad; checked against transformers first
    with torch.no_grad():
        ref = hf_encode(m, vis, qfm, pixels)
        theirs = B / seconds(lambda: hf_encode(m, vis, qfm, pixels), w_enc, i_enc)
        env = os.environ.get(A.ENV_VAR, "auto")
        for backend in ("triton", "sdpa") if A.triton is not None else ("sdpa",):
            os.environ[A.ENV_VAR] = backend  # forces attention.py's backend in the ViT and the Q-Former
            t0 = time.perf_counter()
            err = rel_err(m.encode_img(pixels)[0], ref)
            bad += [f"encode {backend} rel err {err:.1e}"] if err > tol else []  # CPU: time that one call
            ips = B / (seconds(lambda: m.encode_img(pixels), w_enc, i_enc) if cuda else time.perf_counter() - t0)
            rows.append([f"image encoding B={B} ({backend}), images/s", ips, theirs, 1, "x1.2", f"rel err {err:.1e}"])
        os.environ[A.ENV_VAR] = env

    # 2. a stage-1 training step: forward -> loss -> backward -> AdamW on llama_proj (autocast bf16, as train.py).
    # transformers: its image side (hf_encode), our batch building, then LlamaForCausalLM(inputs_embeds, labels).
    texts = [" ".join(random.Random(i).choices(WORDS, k=40)) for i in range(B)]  # all fill max_txt_len=32
    opt = torch.optim.AdamW(m.llama_proj.parameters(), lr=1e-5, weight_decay=0.05)

    def hf_loss():
        emb, mask, labels = m.build_inputs(hf_encode(m, vis, qfm, pixels), texts, max_txt_len=32)
        return llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss

    def step(loss_fn):
        with amp():
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad(), amp():
        _, mask, labels = m.build_inputs(m.encode_img(pixels)[0], texts, max_txt_len=32)
        T, targets = mask.shape[1], (labels[:, 1:] != -100).sum().item() / B  # LM head: target positions only
        l_ours, l_hf = m(pixels, texts, max_txt_len=32).item(), hf_loss().item()
    bad += [f"loss {l_ours:.4f} vs {l_hf:.4f}"] if abs(l_ours - l_hf) > tol * max(1, abs(l_hf)) else []
    flops = B * sum(train_flops(cfg.vit, cfg.qformer, m.llama_model.cfg, T, targets=targets).values())
    res = {}
    for who, fn in (("ours", lambda: m(pixels, texts, max_txt_len=32)), ("hf", hf_loss)):
        torch.cuda.reset_peak_memory_stats() if cuda else None
        s = seconds(lambda: step(fn), w_enc, i_enc)
        res[who] = (B / s, torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                    100 * flops / s / (peak_tf * 1e12) if peak_tf else None)
    note = f"T={T} tokens, loss {l_ours:.4f} vs {l_hf:.4f}"
    rows += [[f"stage-1 step B={B}, samples/s", res["ours"][0], res["hf"][0], 1, "x1.3", note],
             ["  peak memory GiB (weights included)", res["ours"][1], res["hf"][1], 0, "", ""],
             ["  MFU %", res["ours"][2], res["hf"][2], 0, ">=50", f"{flops / B / 1e12:.3f} TFLOP/sample"]]

    # 3. chat at batch 1: encode one image + prefill the first-turn prompt, then greedy decode (eos ignored)
    prompt = TEMPLATES["vicuna0"].first_turn(QUESTION)
    ours_emb = lambda: m.splice(prompt, [m.encode_img(pixels[:1])[0][0]])  # (1, L, C)
    hf_emb = lambda: m.splice(prompt, [hf_encode(m, vis, qfm, pixels[:1])[0]])
    ours_gen = lambda emb, n: generate(m.llama_model, embeds=emb, max_new_tokens=n, eos_id=None).ids
    hf_gen = lambda e, n: llm.generate(inputs_embeds=e, attention_mask=torch.ones_like(e[..., 0], dtype=torch.long),
                                       max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        L = ours_emb().shape[1]
        ttft = [seconds(lambda: g(e(), 1), w_enc + 1, 2 * i_enc) for g, e in ((ours_gen, ours_emb), (hf_gen, hf_emb))]
        emb = ours_emb()
        toks, tps = [], []
        for g in (ours_gen, hf_gen):
            toks.append(g(emb, n_new)[0, -n_new:])
            t_n, t_1 = seconds(lambda: g(emb, n_new), w_dec, i_dec), seconds(lambda: g(emb, 1), w_dec, i_dec)
            tps.append((n_new - 1) / (t_n - t_1))
    same = int((toks[0] == toks[1]).long().cumprod(0).sum())  # leading tokens that agree
    c = m.llama_model.cfg
    weights = sum(p.numel() * p.element_size() for k, p in m.llama_model.named_parameters() if "embed_tokens" not in k)
    kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * m.llama_model.lm_head.weight.element_size()
    per_tok = weights + kv * (L + n_new / 2)  # bytes read per decoded token: weights + the average KV cache
    bw = [per_tok * x / 1e12 for x in tps]
    rows += [["chat B=1: time to first token, ms", 1e3 * ttft[0], 1e3 * ttft[1], -1, "<=50ms", f"prompt {L} tokens"],
             [f"  decode {n_new} tokens, tokens/s", tps[0], tps[1], 1, "x2", f"{same}/{n_new} greedy tokens agree"],
             ["  memory bandwidth, TB/s", bw[0], bw[1], 0, ">=70%",
              f"{100 * bw[0] / peak_bw:.0f}% of peak" if peak_bw else "peak unknown (--peak-tbps)"]]

    fmt = lambda x: f"{x:12.4g}" if x is not None else f"{'-':>12}"
    print(f"{'':44} {'ours':>12} {'transformers':>12} {'speedup':>8} {'goal':>7}  notes")
    for label, ours, hf, better, goal, note in rows:  # better: 1 = higher is better, -1 = lower, 0 = no speedup
        sp = f"{(ours / hf) ** better:8.2f}" if better else ""
        print(f"{label:44} {fmt(ours)} {fmt(hf)} {sp:8} {goal:>7}  {note}")
    print("speedup = ours/transformers throughput (for times: theirs/ours); MFU counts train.train_flops; "
          "bandwidth = (LLM weights + average KV cache bytes) x tokens/s")
    for b in bad:
        print(f"MISMATCH: {b}")
    return not bad


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", action="store_true", help="attention kernel vs SDPA backends and naive")
    parser.add_argument("--e2e", action="store_true", help="whole model vs transformers: encode, train, chat")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp16", help="--attention's dtype")
    parser.add_argument("--iters", type=int, default=50, help="--attention: timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="--e2e: few iterations (the whole run < 5 min)")
    parser.add_argument("--batch", type=int, default=64, help="--e2e: images per encode / training step")
    parser.add_argument("--new-tokens", type=int, default=256, help="--e2e: tokens decoded in chat")
    parser.add_argument("--peak-tflops", type=float, help="bf16 dense TFLOP/s of this GPU (default: by name)")
    parser.add_argument("--peak-tbps", type=float, help="memory TB/s of this GPU (default: by name)")
    args = parser.parse_args()
    run_all = not (args.attention or args.e2e)  # no section named: run every section
    ok = True
    t0 = time.time()
    if args.attention or run_all:
        ok &= bench_attention(args)
    if args.e2e or run_all:
        ok &= bench_e2e(args)
    print(f"done in {time.time() - t0:.1f}s" + ("" if ok else "  (MISMATCH: see above)"))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
