"""attention.py: the Triton kernel (CPU interpreter) and the SDPA fallback against a float64 matmul-softmax.

TRITON_INTERPRET=1 only works if it is set before triton is first imported (triton.language's own helpers
are decorated then), and other test files may import attention.py (hence triton) before this one. So the
kernel cases run once in a fresh subprocess (this file run as a script, env set first) and each case is then
checked here; on a CUDA machine they also run compiled, in-process. The interpreter is slow: shapes are small.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_close
import attention as A

HAS_TRITON = importlib.util.find_spec("triton") is not None
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # x max(1, max|ref|)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# id: B, Hq, Hkv, Lq, Lk, D, causal, mask, dtype, layout
CASES = {
    "vit_d88_257": (1, 2, 2, 257, 257, 88, False, None, "fp32", "fused_qkv"),
    "vit_d88_fp16": (1, 2, 2, 70, 70, 88, False, None, "fp16", "fused_qkv"),
    "qformer_self_d64": (2, 2, 2, 32, 32, 64, False, None, "fp32", "fused_qkv"),
    "qformer_cross_bf16": (2, 2, 2, 32, 257, 64, False, None, "bf16", "contiguous"),
    "prefill_causal_d128_fp16": (1, 2, 2, 130, 130, 128, True, None, "fp16", "fused_qkv"),
    "causal_offset_cache": (2, 2, 2, 37, 100, 128, True, None, "fp32", "kv_cache"),
    "decode_gqa_mask_fp16": (2, 4, 2, 1, 77, 128, True, "random", "fp16", "kv_cache"),
    "decode_fp32": (1, 2, 2, 1, 5, 64, True, None, "fp32", "contiguous"),
    "padding_mask_odd": (3, 2, 2, 5, 9, 64, False, "random", "fp32", "contiguous"),
    "gqa_causal_bf16": (1, 4, 1, 20, 20, 64, True, None, "bf16", "contiguous"),
    "left_padded_prefill": (2, 2, 2, 5, 5, 32, True, "left_pad", "fp32", "contiguous"),
    "transposed_d88": (1, 2, 2, 5, 5, 88, False, None, "fp32", "transposed"),
    "causal_more_queries_than_keys": (1, 1, 1, 9, 5, 32, True, None, "fp32", "contiguous"),
}
# split-KV decode (flash-decoding) with small splits, so that short key lengths already use many of them:
# config = (BLOCK_N, num_warps, num_stages, min keys per split); a split of 16 keys at Lk 257 -> 17 splits
SPLIT16, SPLIT32 = (16, 4, 1, 16), (16, 4, 1, 32)
SPLIT_CASES = {
    **{f"split_len{n}_fp16": ((1, 2, 2, 1, n, 64, True, None, "fp16", "contiguous"), SPLIT16)
       for n in (1, 2, 15, 16, 17, 33, 100, 257)},
    "split_gqa4_mask_fp32": ((3, 8, 2, 1, 70, 128, True, "random", "fp32", "kv_cache"), SPLIT16),
    "split_gqa_mask_bf16": ((2, 4, 1, 1, 50, 64, False, "random", "bf16", "contiguous"), SPLIT32),
    "split_left_pad_d88": ((2, 2, 2, 1, 40, 88, True, "left_pad", "fp16", "fused_qkv_decode"), SPLIT16),
    "split_masked_split": ((2, 2, 2, 1, 48, 32, True, "first_split_masked", "fp32", "contiguous"), SPLIT16),
    "split_transposed_d40": ((1, 2, 1, 1, 37, 40, True, None, "fp32", "transposed"), SPLIT16),
    "split_default_long": ((1, 2, 2, 1, 600, 64, True, None, "fp16", "kv_cache"), None),  # CONFIGS: 3 splits
}


def make_case(name, device="cpu"):
    """(q, k, v, causal, mask) for a case, in the case's dtype and memory layout."""
    B, Hq, Hkv, Lq, Lk, D, causal, mask_kind, dtype, layout = CASES[name] if name in CASES else SPLIT_CASES[name][0]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    dt = DTYPES[dtype]
    rand = lambda *s: torch.randn(*s, generator=g).to(dt).to(device)
    if layout == "fused_qkv":  # views of one (B, L, 3, H, D) projection output, as a fused qkv linear gives
        assert Lq == Lk and Hq == Hkv
        qkv = rand(B, Lq, 3, Hq, D)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), non-contiguous
    elif layout == "fused_qkv_decode":  # one new token's fused qkv; k/v: a cache with D-aligned strides
        q = rand(B, 1, 3, Hq, D)[:, :, 0].transpose(1, 2)
        k, v = (rand(B, Lk, Hkv, D).transpose(1, 2) for _ in range(2))
    elif layout == "kv_cache":  # k/v: the first Lk positions of a longer cache buffer
        q = rand(B, Hq, Lq, D)
        k, v = rand(B, Hkv, Lk + 11, D)[:, :, :Lk], rand(B, Hkv, Lk + 11, D)[:, :, :Lk]
    elif layout == "transposed":  # stride of the head dim != 1
        q, k, v = (rand(B, h, D, L).transpose(-1, -2) for h, L in ((Hq, Lq), (Hkv, Lk), (Hkv, Lk)))
    else:
        q, k, v = rand(B, Hq, Lq, D), rand(B, Hkv, Lk, D), rand(B, Hkv, Lk, D)
    mask = None
    if mask_kind == "random":
        mask = torch.rand(B, Lk, generator=g) > 0.3
        mask[0] = False  # batch 0: no key at all -> output 0
    elif mask_kind == "left_pad":
        mask = torch.arange(Lk)[None, :] >= torch.tensor([0, 2])[:B, None]  # batch 1: 2 pad tokens first
    elif mask_kind == "first_split_masked":  # batch 1: the first 16-key split sees no key at all
        mask = torch.arange(Lk)[None, :] >= torch.tensor([0, 16])[:B, None]
    return q, k, v, causal, (mask.to(device) if mask is not None else None)


def reference(q, k, v, causal, mask):
    """float64 matmul-softmax; rows that may attend no key give 0. -> (out, row_has_key (B, 1, Lq, 1))"""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    s = q @ k.transpose(-1, -2) * D ** -0.5  # (B, Hq, Lq, Lk)
    keep = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal:
        keep = keep & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq)
    if mask is not None:
        keep = keep & mask.cpu()[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return p @ v, keep.any(-1, keepdim=True)


def check(name, out, q, k, v, causal, mask, rows=None):
    ref, _ = reference(q, k, v, causal, mask)
    assert out.dtype == q.dtype and out.shape == ref.shape, f"{name}: {out.dtype} {tuple(out.shape)}"
    out = out.double().cpu()
    if rows is not None:  # compare only these rows
        out, ref = out * rows, ref * rows
    assert not out.isnan().any(), f"{name}: NaN in output"
    assert_close(out, ref, name, rel=TOL[q.dtype])


# ----------------------------------------------------------------------------- the kernel, interpreted

def _worker():
    """Subprocess body (TRITON_INTERPRET=1 already in the env): run every case, print JSON errors."""
    results = {}
    for name in CASES:
        q, k, v, causal, mask = make_case(name)
        try:
            check(name, A.attention(q, k, v, causal=causal, mask=mask, backend="triton"), q, k, v, causal, mask)
            results[name] = "ok"
        except Exception as e:  # reported per case by the test below
            results[name] = f"{type(e).__name__}: {e}"
    for name, (_, config) in SPLIT_CASES.items():
        q, k, v, causal, mask = make_case(name)
        try:
            out = A.triton_attention(q, k, v, causal, mask, config=config) if config else \
                A.attention(q, k, v, causal=causal, mask=mask, backend="triton")
            check(name, out, q, k, v, causal, mask)
            results[name] = "ok"
        except Exception as e:
            results[name] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(results))


@pytest.fixture(scope="module")
def interpreted():
    if not HAS_TRITON:
        pytest.skip("triton is not installed (e.g. not x86-64 Linux): kernel untested, SDPA is used")
    env = dict(os.environ, TRITON_INTERPRET="1", MINIGPT4_ATTENTION="")
    r = subprocess.run([sys.executable, __file__, "--worker"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULTS ")]
    assert r.returncode == 0 and lines, f"interpreter worker failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


@pytest.mark.parametrize("name", CASES)
def test_kernel_interpreted(name, interpreted):
    assert interpreted[name] == "ok", interpreted[name]


@pytest.mark.parametrize("name", SPLIT_CASES)
def test_split_kv_decode_interpreted(name, interpreted):
    assert interpreted[name] == "ok", interpreted[name]


def test_head_blocks_and_alignment():
    """88 is computed as 64 + 32 lanes (8% padding); strides go in units of 8 only when that is exact."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    assert [A.head_blocks(d) for d in (88, 64, 128, 80, 100, 40, 5)] == \
        [(64, 32), (64, 0), (128, 0), (64, 16), (128, 0), (32, 16), (16, 0)]
    q, k, v, *_ = make_case("vit_d88_257")
    assert A._unit(88, q, k, v) == 8
    q, k, v, *_ = make_case("transposed_d88")
    assert A._unit(88, q, k, v) == 1
    assert A._unit(40, *(torch.zeros(1, 1, 3, 44)[..., :40] for _ in range(3))) == 1  # row stride 44


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA")
@pytest.mark.parametrize("name", CASES)
def test_kernel_cuda(name):
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process")
    q, k, v, causal, mask = make_case(name, "cuda")
    check(name, A.attention(q, k, v, causal=causal, mask=mask, backend="triton"), q, k, v, causal, mask)
    if q.dtype != torch.float32:  # the auto backend picks the kernel for half precision without grad
        assert A.choose_backend(q, k, v) == "triton"


# ----------------------------------------------------------------------------- the SDPA fallback and dispatch

@pytest.mark.parametrize("name", CASES)
def test_auto_on_cpu_is_sdpa(name, monkeypatch):
    monkeypatch.delenv(A.ENV_VAR, raising=False)
    q, k, v, causal, mask = make_case(name)
    assert A.choose_backend(q, k, v) == "sdpa"
    _, rows = reference(q, k, v, causal, mask)
    # torch >= 2.5's SDPA also gives 0 for rows without keys; older versions give NaN there
    has_safe_softmax = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
    check(name, A.attention(q, k, v, causal=causal, mask=mask), q, k, v, causal, mask,
          rows=None if has_safe_softmax else rows)


def test_sdpa_gradients_flow():
    q, k, v, causal, mask = make_case("decode_gqa_mask_fp16")
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    assert A.choose_backend(q, k, v, "auto") == "sdpa"
    A.attention(q, k, v, causal=causal, mask=mask).square().sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
    with pytest.raises(ValueError, match="forward-only"):
        A.attention(q, k, v, causal=causal, mask=mask, backend="triton")


def test_backend_switch_and_errors(monkeypatch):
    q, k, v, causal, mask = make_case("padding_mask_odd")
    monkeypatch.setenv(A.ENV_VAR, "sdpa")
    assert A.choose_backend(q, k, v) == "sdpa"
    monkeypatch.setenv(A.ENV_VAR, "flash")
    with pytest.raises(ValueError, match="MINIGPT4_ATTENTION"):
        A.attention(q, k, v)
    assert A.choose_backend(q, k, v, backend="sdpa") == "sdpa"  # the argument wins over the env
    monkeypatch.delenv(A.ENV_VAR)
    if HAS_TRITON and not A.triton.knobs.runtime.interpret:
        with pytest.raises(ValueError, match="needs CUDA"):
            A.attention(q, k, v, backend="triton")
    with pytest.raises(ValueError, match="mask"):
        A.attention(q, k, v, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="multiple of Hkv"):
        A.attention(q, k[:, :1].expand(-1, 3, -1, -1), v[:, :1].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="head dim"):
        A.attention(q, k[..., :-1], v[..., :-1])


# ----------------------------------------------------------------------------- bench.py's CPU path

def test_bench_attention_cpu():
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", MINIGPT4_ATTENTION="")
    r = subprocess.run([sys.executable, "bench.py", "--attention"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "timings need a GPU" in r.stdout and "MISMATCH" not in r.stdout, r.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker()
