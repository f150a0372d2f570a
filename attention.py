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

The kernel (_attn_fwd), one program per (tile of BLOCK_M queries, head, batch):
    load the Q tile once (it stays in registers/shared memory)
    for each tile of BLOCK_N keys:  s = Q K^T * scale;  online softmax: keep the running row max m and the
        running row sum l, rescale the fp32 accumulator by 2^(m_old - m_new), add P V
    out = acc / l
exp2 instead of exp: log2(e) is folded into the scale, so softmax(x) = 2^(x*log2e - max) / sum(...).
Head dims that are not a power of two (EVA ViT-G: 88) are split INSIDE the kernel into two power-of-two parts
(64 + 32: q.k = q1.k1 + q2.k2, two accumulators) with masked loads (zeros in the padding don't change q.k);
lengths that are not a multiple of a tile (257) are masked the same way. Strides are passed, so views (slices
of a fused qkv, a KV-cache prefix) need no copy; when they are all multiples of 8 elements they are passed
divided by 8 and multiplied by a constexpr 8 inside, so the compiler can prove 16-byte alignment and emit
128-bit loads and cp.async (kernel_report.py shows what each call site compiles to on sm80/sm90).
Decode (one query) is split-KV (flash-decoding): _decode_split's programs each take a slice of the keys and
write a partial (acc, max, sum); _decode_combine rescales them to a common max and adds them up.
"""
from __future__ import annotations  # kernel annotations stay strings: this file imports without triton

import json
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


# ----------------------------------------------------------------------------- the Triton kernels

def _attn_fwd(Q, K, V, O, M,  # pointers; M: (B, Lk) key mask, unused unless HAS_MASK
              sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod, smb, smn,
              Lq, Lk, GROUP, qk_scale,
              HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
              PRECISION: tl.constexpr, UPCAST: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = b.to(tl.int64)  # 64-bit offsets: big batches of big tensors overflow int32
    h = h.to(tl.int64)
    hk = h // GROUP  # GQA: query heads h share key/value head h // (Hq // Hkv)
    Q += (b * sqb + h * sqh) * UNIT  # strides arrive in units of UNIT elements (see triton_attention)
    K += (b * skb + hk * skh) * UNIT
    V += (b * svb + hk * svh) * UNIT
    O += (b * sob + h * soh) * UNIT

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)  # query rows of this tile
    offs_n = tl.arange(0, BLOCK_N)            # key columns of a K/V tile (shifted by start_n)
    offs_d = tl.arange(0, BLOCK_D)            # head dim, part 1: [0, BLOCK_D)
    d_ok, row_ok = offs_d < HEAD_DIM, offs_m < Lq
    q_rows = Q + offs_m[:, None] * (sqm * UNIT)
    q = tl.load(q_rows + offs_d[None, :] * sqd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (M, D)
    if BLOCK_D2 > 0:
        offs_e = BLOCK_D + tl.arange(0, BLOCK_D2)  # head dim, part 2: [BLOCK_D, BLOCK_D + BLOCK_D2)
        e_ok = offs_e < HEAD_DIM
        q2 = tl.load(q_rows + offs_e[None, :] * sqd, mask=row_ok[:, None] & e_ok[None, :], other=0.0)  # (M, D2)
    if UPCAST:  # triton 3.9's CPU interpreter multiplies bf16 as raw bits: dot in fp32 there
        q = q.to(tl.float32)
        if BLOCK_D2 > 0:
            q2 = q2.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                # running row sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)       # running sum of 2^(s - m_i) * v, part 1
    if BLOCK_D2 > 0:
        acc2 = tl.zeros([BLOCK_M, BLOCK_D2], tl.float32)  # part 2

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
            k_cols = K + cols[None, :] * (skn * UNIT)  # K^T tiles: (D, N)
            v_rows = V + cols[:, None] * (svn * UNIT)  # V tiles: (N, D)
            k = tl.load(k_cols + offs_d[:, None] * skd, mask=key_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, k, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N) fp32
            if BLOCK_D2 > 0:  # q.k over the head dim = part 1 + part 2
                k2 = tl.load(k_cols + offs_e[:, None] * skd, mask=key_ok[None, :] & e_ok[:, None], other=0.0)
                if UPCAST:
                    k2 = k2.to(tl.float32)
                s += tl.dot(q2, k2, input_precision=PRECISION)
            s *= qk_scale
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
            v = tl.load(v_rows + offs_d[None, :] * svd, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
            v_dtype = tl.float32 if UPCAST else v.dtype
            acc = acc * alpha[:, None] + tl.dot(p.to(v_dtype), v.to(v_dtype), input_precision=PRECISION)
            if BLOCK_D2 > 0:
                v2 = tl.load(v_rows + offs_e[None, :] * svd, mask=key_ok[:, None] & e_ok[None, :], other=0.0)
                acc2 = acc2 * alpha[:, None] + tl.dot(p.to(v_dtype), v2.to(v_dtype), input_precision=PRECISION)
            m_i = m_new

    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: 0
    o_rows = O + offs_m[:, None] * (som * UNIT)
    tl.store(o_rows + offs_d[None, :] * sod, (acc * inv_l).to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    if BLOCK_D2 > 0:
        tl.store(o_rows + offs_e[None, :] * sod, (acc2 * inv_l).to(O.dtype.element_ty),
                 mask=row_ok[:, None] & e_ok[None, :])


def _decode_split(Q, K, V, P, M,  # P: (B, Hq, SPLITS, BLOCK_D + 2) fp32 partial states [acc | m | l]
                  sqb, sqh, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smn,
                  Lk, GROUP, qk_scale, SPLITS, SPLIT_LEN,  # runtime: decode's Lk grows every token
                  HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, HAS_MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Flash-decoding, part 1: program (split, head, batch) attends ONE query to keys
    [split * SPLIT_LEN, (split + 1) * SPLIT_LEN) and writes its unnormalised softmax state (acc, m, l)."""
    split, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    hk = h // GROUP
    K += (b * skb + hk * skh) * UNIT
    V += (b * svb + hk * svh) * UNIT
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + (b * sqb + h * sqh) * UNIT + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)  # (D,)
    offs_n = tl.arange(0, BLOCK_N)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, Lk)
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):  # a single query: no tensor cores, a multiply-and-sum per key
        cols = start_n + offs_n
        key_ok = cols < hi
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + cols[:, None] * (skn * UNIT) + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale  # (BLOCK_N,)
        if HAS_MASK:
            key_ok &= tl.load(M + b * smb + cols * smn, mask=key_ok, other=0) != 0
        s = tl.where(key_ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe)  # (BLOCK_N,)
        l_i = l_i * alpha + tl.sum(p, 0)
        v = tl.load(V + cols[:, None] * (svn * UNIT) + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    P += ((b * tl.num_programs(1) + h) * SPLITS + split) * (BLOCK_D + 2)
    tl.store(P + offs_d, acc)
    tl.store(P + BLOCK_D + tl.arange(0, 1), m_i)
    tl.store(P + BLOCK_D + 1 + tl.arange(0, 1), l_i)


def _decode_combine(P, O, sob, soh, sod, SPLITS,
                    HEAD_DIM: tl.constexpr, UNIT: tl.constexpr, SPLITS_P2: tl.constexpr,
                    BLOCK_D: tl.constexpr):
    """Flash-decoding, part 2: program (head, batch) merges its SPLITS partial softmax states."""
    h, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < SPLITS
    P += (b * tl.num_programs(0) + h) * SPLITS * (BLOCK_D + 2) + offs_s * (BLOCK_D + 2)  # (S,) row starts
    m = tl.load(P + BLOCK_D, mask=s_ok, other=float("-inf"))  # (S,)
    l = tl.load(P + BLOCK_D + 1, mask=s_ok, other=0.0)
    acc = tl.load(P[:, None] + offs_d[None, :], mask=s_ok[:, None], other=0.0)  # (S, D)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # (S,) 0 for empty splits
    l_sum = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(l_sum == 0.0, 1.0, l_sum)  # no key at all: 0
    tl.store(O + (b * sob + h * soh) * UNIT + offs_d * sod, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


if triton is not None:  # compiled, or interpreted on CPU if TRITON_INTERPRET=1 at import time
    _attn_fwd, _decode_split, _decode_combine = map(triton.jit, (_attn_fwd, _decode_split, _decode_combine))

# Launch settings per GPU architecture and call site (a site is a class of shapes, see site()):
# BLOCK_M, BLOCK_N, num_warps, num_stages; decode: BLOCK_N, num_warps, num_stages, min keys per split.
# Chosen from compiled evidence (python kernel_report.py: no spills, 128-bit loads, cp.async, shared memory
# within the limit; sm80's within 99 KB so that sm86/sm89 run them too), not yet from timings:
# `python kernel_report.py --tune` on a GPU times candidates and writes attention_tuned.json, read over this.
# sm80 prefill: (128, 64, 8, 3) spills 8 bytes at 255 registers; BLOCK_N 32 needs 186, no spill, 64 KB.
# ViT: 257 queries in 5 tiles of 64 (320 rows) waste less than 3 of 128 (384 rows).
CONFIGS = {
    "sm80": {"vit": (64, 64, 4, 3), "qformer_self": (32, 32, 4, 2), "qformer_cross": (32, 64, 4, 3),
             "prefill": (128, 32, 8, 3), "decode": (64, 4, 2, 256), "fp32": (64, 32, 4, 2)},
    "sm90": {"vit": (64, 64, 4, 3), "qformer_self": (32, 32, 4, 2), "qformer_cross": (32, 64, 4, 3),
             "prefill": (128, 64, 8, 3), "decode": (64, 4, 2, 256), "fp32": (64, 32, 4, 2)},
}
TUNED_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_tuned.json")
if os.path.exists(TUNED_FILE):
    with open(TUNED_FILE) as f:
        for arch, sites in json.load(f).items():
            CONFIGS.setdefault(arch, {}).update({s: tuple(c) for s, c in sites.items()})


def site(Lq, Lk, causal, dtype):
    """The call site a shape belongs to (the key of CONFIGS)."""
    if Lq == 1:
        return "decode"
    if dtype == torch.float32:  # fp32 (tests, CPU): small tiles keep shared memory in bounds
        return "fp32"
    if causal:
        return "prefill"  # LLaMA
    if Lq <= 64:
        return "qformer_self" if Lk <= 64 else "qformer_cross"
    return "vit"


def arch(device):
    """'sm90' for Hopper and newer, else 'sm80' (also the CPU interpreter's)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return "sm90"
    return "sm80"


def head_blocks(D):
    """The head dim as one or two power-of-two parts: 88 -> (64, 32) (96 lanes, 8% padding, not 128's 31%)."""
    part1 = max(16, 1 << (D.bit_length() - 1))  # largest power of two <= D
    if part1 >= D:
        return part1, 0
    part2 = max(16, triton.next_power_of_2(D - part1))
    return (2 * part1, 0) if part2 == part1 else (part1, part2)


def _unit(D, *tensors):
    """8 if every tensor's head dim is contiguous and its other strides are multiples of 8 elements, else 1.
    Passing strides // 8 and multiplying by a constexpr 8 in the kernel lets the compiler prove 16-byte
    alignment, hence 128-bit loads and cp.async (a runtime stride like 88 can't be proved divisible by 16)."""
    ok = D % 8 == 0 and all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) for t in tensors)
    return 8 if ok else 1


def _strides(t, unit, dims=(0, 1, 2)):
    """t's strides along dims in units of `unit` elements, then the head dim's stride (in elements)."""
    return [t.stride(i) // unit for i in dims] + [t.stride(-1)]


def _go(kernel, grid, args, consts, compile_only):
    """Launch, or (compile_only) compile for the current target without launching: pointers become dtypes."""
    if compile_only:
        args = [a.dtype if isinstance(a, torch.Tensor) else a for a in args]
        return kernel.warmup(*args, grid=grid, **consts)
    kernel[grid](*args, **consts)


def triton_attention(q, k, v, causal=False, mask=None, config=None, compile_only=False):
    """The kernel launch; no checks (attention() does them). config overrides CONFIGS' entry (tests, tuning);
    compile_only returns the compiled kernels instead of running them (kernel_report.py)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    o = torch.empty((B, Hq, Lq, D), dtype=q.dtype, device=q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != 0
    m = mask if mask is not None else q  # dummy pointer when there is no mask
    sm = list(mask.stride()) if mask is not None else [0, 0]
    name = site(Lq, Lk, causal, q.dtype)
    cfg = config or CONFIGS[arch(q.device)][name]
    unit = _unit(D, q, k, v, o)
    upcast = q.dtype == torch.bfloat16 and bool(triton.knobs.runtime.interpret)  # see the kernel
    if name == "decode":  # Lq == 1: causal is a no-op (the one query is the last position)
        block_n, warps, stages, min_split = cfg
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        splits = max(1, min(triton.cdiv(Lk, min_split), triton.cdiv(2 * sms, B * Hq)))  # fill ~2 waves
        split_len = triton.cdiv(triton.cdiv(Lk, splits), block_n) * block_n
        splits = triton.cdiv(Lk, split_len)
        block_d = triton.next_power_of_2(max(D, 16))
        part = torch.empty((B, Hq, splits, block_d + 2), dtype=torch.float32, device=q.device)
        consts = dict(HEAD_DIM=D, UNIT=unit, BLOCK_D=block_d)
        k1 = _go(_decode_split, (splits, Hq, B),
                 [q, k, v, part, m, *_strides(q, unit, (0, 1)), *_strides(k, unit, (0, 1, 2)),
                  *_strides(v, unit, (0, 1, 2)), *sm, Lk, Hq // Hkv, D ** -0.5 * LOG2E, splits, split_len],
                 dict(consts, HAS_MASK=mask is not None, BLOCK_N=block_n,
                      num_warps=warps, num_stages=stages), compile_only)
        k2 = _go(_decode_combine, (Hq, B), [part, o, *_strides(o, unit, (0, 1)), splits],
                 dict(consts, SPLITS_P2=triton.next_power_of_2(splits), num_warps=4), compile_only)
        return [k1, k2] if compile_only else o
    block_m, block_n, warps, stages = cfg
    block_d, block_d2 = head_blocks(D)
    args = [q, k, v, o, m, *_strides(q, unit), *_strides(k, unit), *_strides(v, unit), *_strides(o, unit), *sm,
            Lq, Lk, Hq // Hkv, D ** -0.5 * LOG2E]
    consts = dict(HEAD_DIM=D, UNIT=unit, CAUSAL=bool(causal), HAS_MASK=mask is not None,
                  PRECISION="ieee" if q.dtype == torch.float32 or upcast else "tf32", UPCAST=upcast,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_D2=block_d2,
                  num_warps=warps, num_stages=stages)
    kern = _go(_attn_fwd, (triton.cdiv(Lq, block_m), Hq, B), args, consts, compile_only)
    return [kern] if compile_only else o


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
