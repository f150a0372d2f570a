"""Attention for vit.py, qformer.py and llama.py: a FlashAttention-style Triton forward kernel + SDPA fallback.

attention(q, k, v, causal=False, mask=None, backend=None) -> (B, Hq, Lq, D)
    q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D) with Hq % Hkv == 0 (grouped-query attention); scale D**-0.5.
    causal: query i sees key j iff j <= i + (Lk - Lq) (bottom-right aligned: the Lq queries are the LAST Lq
    positions of the Lk keys, so prefill, KV-cache continuation and decode all pass causal=True).
    mask: optional (B, Lk) bool, True = key may be attended (key padding).
    A query row that may attend no key at all gets output 0 (as torch's SDPA does today).

backend: None -> $MINIGPT4_ATTENTION or "auto". "auto" runs the Triton kernel for fp16/bf16 CUDA tensors
when no gradient is needed, else torch's scaled_dot_product_attention (CPU, training through the frozen
LLM). "triton" forces the kernel (fp32 too; on CPU tensors only under TRITON_INTERPRET=1, the interpreter
the tests use) and raises if it can't run; "sdpa" forces SDPA.

The kernel, one program per (tile of BLOCK_M queries, head, batch):
    load the Q tile once (it stays in registers/shared memory)
    for each tile of BLOCK_N keys:  s = Q K^T * scale;  online softmax: keep the running row max m and the
        running row sum l, rescale the fp32 accumulator by 2^(m_old - m_new), add P V
    out = acc / l
exp2 instead of exp: log2(e) is folded into the scale, so softmax(x) = 2^(x*log2e - max) / sum(...).
Head dims that are not a power of two (EVA ViT-G: 88) are padded INSIDE the kernel to BLOCK_D = 128 with
masked loads (zeros in the padding don't change q.k); lengths that are not a multiple of a tile (257) are
masked the same way. Strides are passed, so views (slices of a fused qkv, a KV-cache prefix) need no copy.
"""
from __future__ import annotations  # kernel annotations stay strings: this file imports without triton

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # e.g. non-x86 machines: SDPA only
    triton = tl = None

BACKENDS = ("auto", "triton", "sdpa")
ENV_VAR = "MINIGPT4_ATTENTION"
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- the Triton kernel

def _attn_fwd(Q, K, V, O, M,  # pointers; M: (B, Lk) key mask, unused unless HAS_MASK
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
              Lq, Lk, D, GROUP, qk_scale,
              CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = b.to(tl.int64)  # 64-bit offsets: big batches of big tensors overflow int32
    h = h.to(tl.int64)
    hk = h // GROUP  # GQA: query heads h share key/value head h // (Hq // Hkv)
    Q += b * sqb + h * sqh
    K += b * skb + hk * skh
    V += b * svb + hk * svh
    O += b * sob + h * soh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_n = tl.arange(0, BLOCK_N)            # key columns of a K/V tile (shifted by start_n)
    offs_d = tl.arange(0, BLOCK_D)            # head dim, padded to a power of two
    d_ok = offs_d < D
    q = tl.load(Q + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Lq) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if UPCAST:  # triton 3.9's CPU interpreter multiplies bf16 as raw bits: dot in fp32 there
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)       # running sum of 2^(s - m_i) * v

    # Causal, bottom-right aligned: row i sees keys j <= i + shift. Keys < start_m + shift + 1 are seen by
    # every row of the tile (phase 0, no causal mask); keys >= start_m + BLOCK_M + shift by none (skipped);
    # only the tiles in between, around the diagonal, need the causal mask (phase 1).
    shift = Lk - Lq
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M + shift, Lk)
        n_full = tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N
    else:
        hi = Lk
        n_full = Lk
    for phase in tl.static_range(2 if CAUSAL else 1):  # unrolled at compile time
        if phase == 0:
            lo, end = 0, n_full
        else:
            lo, end = n_full, hi
        for start_n in range(lo, end, BLOCK_N):
            cols = start_n + offs_n
            key_ok = cols < Lk
            k = tl.load(K + cols[None, :] * skn + offs_d[:, None] * skd,
                        mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N): K^T
            v = tl.load(V + cols[:, None] * svn + offs_d[None, :] * svd,
                        mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            s = tl.dot(q, k, input_precision=PRECISION) * qk_scale       # (BLOCK_M, BLOCK_N) fp32
            if HAS_MASK:
                key_ok &= tl.load(M + b * smb + cols * smn, mask=key_ok, other=0) != 0
            keep = key_ok[None, :]
            if phase == 1:  # diagonal tiles only
                keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(keep, s, float("-inf"))
            # online softmax: new max, rescale what we had, add this tile
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: avoid (-inf) - (-inf)
            alpha = tl.math.exp2(m_i - m_safe)                     # (BLOCK_M,) rescale factor
            p = tl.math.exp2(s - m_safe[:, None])                  # (BLOCK_M, BLOCK_N), 0 where masked
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: 0
    tl.store(O + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & d_ok[None, :])


if triton is not None:
    _attn_fwd = triton.jit(_attn_fwd)  # compiled, or interpreted on CPU if TRITON_INTERPRET=1 at import time


def kernel_config(Lq, D, dtype):
    """Tile sizes and launch settings for a query length and head dim (hand-picked, no autotuning)."""
    BLOCK_D = max(16, triton.next_power_of_2(D))
    big = BLOCK_D > 128 or dtype == torch.float32  # keep Q + K/V stages within shared memory
    if Lq <= 16:
        BLOCK_M = 16  # decode: one query, don't compute 127 dead rows
    elif Lq <= 64:
        BLOCK_M = max(16, triton.next_power_of_2(Lq))  # Q-Former: 32 queries
    else:
        BLOCK_M = 64 if Lq < 1024 or big else 128  # ViT 257: 5 x 64 rows waste less than 3 x 128
    BLOCK_N = 32 if big else 64
    num_warps = 8 if BLOCK_M * BLOCK_D >= 128 * 128 else 4
    num_stages = 2 if big or Lq <= 16 else 3
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=num_warps, num_stages=num_stages)


def triton_attention(q, k, v, causal=False, mask=None):
    """The kernel launch; no checks (attention() does them)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    m = mask if mask is not None else q  # dummy pointer when there is no mask
    sm = mask.stride() if mask is not None else (0, 0)
    cfg = kernel_config(Lq, D, q.dtype)
    upcast = q.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)  # see the kernel
    grid = (triton.cdiv(Lq, cfg["BLOCK_M"]), Hq, B)
    _attn_fwd[grid](q, k, v, o, m, *q.stride(), *k.stride(), *v.stride(), *o.stride(), *sm,
                    Lq, Lk, D, Hq // Hkv, D ** -0.5 * LOG2E,
                    CAUSAL=bool(causal), HAS_MASK=mask is not None,
                    PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast, **cfg)
    return o


# ----------------------------------------------------------------------------- dispatch

def sdpa_attention(q, k, v, causal=False, mask=None):
    """torch's scaled_dot_product_attention with the same semantics (differentiable)."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :].bool()  # (B, 1, 1, Lk)
    if causal and (mask is not None or Lq != Lk):
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)  # (Lq, Lk)
        attn_mask = keep if attn_mask is None else attn_mask & keep
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])


def _triton_problem(q, k, v, auto):
    """Why the kernel can't (or, for auto, shouldn't) run these tensors; None if it can."""
    if triton is None:
        return "triton is not installed"
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return "the Triton kernel is forward-only and a gradient is required (use sdpa)"
    if q.device.type != "cuda" and (auto or not triton.knobs.runtime.interpret):
        return f"tensors are on {q.device.type}; the kernel needs CUDA (or TRITON_INTERPRET=1 on CPU)"
    if k.device != q.device or v.device != q.device:
        return f"q, k, v on different devices ({q.device}, {k.device}, {v.device})"
    dtypes = (torch.float16, torch.bfloat16) + (() if auto else (torch.float32,))
    if q.dtype not in dtypes or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}; supported: {', '.join(map(str, dtypes))}"
    if q.shape[-1] > 256:
        return f"head dim {q.shape[-1]} > 256"
    return None


def choose_backend(q, k, v, backend=None):
    """'triton' or 'sdpa' for these tensors (backend None -> $MINIGPT4_ATTENTION or 'auto')."""
    backend = backend or os.environ.get(ENV_VAR) or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} (argument or ${ENV_VAR}) not in {BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    problem = _triton_problem(q, k, v, auto=backend == "auto")
    if problem is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"attention backend 'triton': {problem}")
    return "sdpa"


def _check(q, k, v, mask):
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"attention: q {tuple(q.shape)} must be (B, Hq, Lq, D) and k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} both (B, Hkv, Lk, D)")
    (B, Hq, _, D), (Bk, Hkv, Lk, Dk) = q.shape, k.shape
    if B != Bk or D != Dk or Hkv == 0 or Hq % Hkv:
        raise ValueError(f"attention: q {tuple(q.shape)} vs k/v {tuple(k.shape)}: batch and head dim must "
                         f"match and Hq must be a multiple of Hkv")
    if mask is not None and tuple(mask.shape) != (B, Lk):
        raise ValueError(f"attention: mask {tuple(mask.shape)} must be (B, Lk) = {(B, Lk)}")


def attention(q, k, v, causal=False, mask=None, backend=None):
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D) in q's dtype. See the module docstring."""
    _check(q, k, v, mask)
    if choose_backend(q, k, v, backend) == "triton":
        return triton_attention(q, k, v, causal, mask)
    return sdpa_attention(q, k, v, causal, mask)
