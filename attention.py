"""Attention entry point shared by vit.py, qformer.py and llama.py (bootstrap: SDPA only)."""
import torch
import torch.nn.functional as F


def attention(q, k, v, causal=False, mask=None, backend=None):
    """q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D) -> (B, Hq, Lq, D).
    causal: query i sees key j iff j <= i + Lk - Lq; mask (B, Lk) bool, True = key may be attended."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    attn_mask = None
    if mask is not None:
        attn_mask = mask[:, None, None, :].bool()  # (B, 1, 1, Lk)
    if causal and (mask is not None or Lq != Lk):
        keep = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq)
        attn_mask = keep if attn_mask is None else attn_mask & keep
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal,
                                          enable_gqa=q.shape[1] != k.shape[1])
