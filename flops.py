"""FLOPs of one MiniGPT-4 training sample by part, and GPU peaks: the MFU that train.py logs and bench.py prints."""

PEAKS = [  # (part of the GPU name, bf16 dense TFLOP/s, memory TB/s), for MFU; the first match wins
    ("H100 PCIe", 756, 2.0), ("H100 NVL", 835, 3.9), ("H200", 989, 4.8), ("H100", 989, 3.35), ("A100", 312, None)]


def train_flops(vit, qf, llm, T, group=4, targets=None, no_qformer=False, proj_layers=1, train_qformer=False):
    """FLOPs of one training sample by part (T: LLM tokens with padding; qf None: llama2 / no_qformer). Matmul
    (m,k)x(k,n): 2mkn; attention 4*Lq*Lk*D per head, causal counted in full. Frozen parts: forward only.
    llama_proj: forward + weight grads + the activation grads between its layers (and into the Q-Former when it
    is trained: forward + activation + weight grads, none into the frozen ViT). LLM backward: activation grads
    only (matmuls once more, attention 8*T^2*D per layer). no_qformer is implied by qf None."""
    N, W = vit.grid ** 2 + 1, vit.width  # 257 image tokens
    vit_f = vit.depth * (2 * N * (4 * W * W + 2 * W * vit.mlp_hidden) + 4 * N * N * W) \
        + 2 * (N - 1) * 3 * vit.patch_size ** 2 * W  # blocks (qkv 3W^2 + proj W^2, MLP) + patch embedding
    if qf is None:
        nq, H, qf_f = (N - 1) // group, W * group, 0
    else:
        nq, H = qf.n_queries, qf.hidden_size
        qf_f = qf.n_layers * (2 * nq * 4 * H * H + 4 * nq * nq * H + 2 * nq * 2 * H * qf.intermediate_size)
        image_kv = len(qf.cross_attention_layers) * 2 * N * 2 * qf.encoder_width * H  # image tokens -> keys, values
        qf_f += len(qf.cross_attention_layers) * (2 * nq * 2 * H * H + 4 * nq * N * H) + image_kv
        qf_f = 3 * qf_f - image_kv if train_qformer else qf_f
    D = llm.dim
    proj_fwd = 2 * nq * (H * D + (proj_layers - 1) * D * D)
    proj = 2 * proj_fwd + 2 * nq * (proj_layers - 1) * D * D + (2 * nq * H * D if train_qformer else 0)
    kv = llm.n_kv_heads * llm.head_dim
    mm = llm.n_layers * (llm.dim * (2 * llm.dim + 2 * kv) + 3 * llm.dim * llm.hidden_dim)
    att = llm.n_layers * T * T * llm.dim
    head = 2 * (T if targets is None else targets) * llm.dim * llm.vocab_size  # LM head: target positions (None: all T)
    return dict(vit=vit_f, qformer=qf_f, proj=proj, llm_fwd=2 * T * mm + 4 * att + head,
                llm_bwd=2 * T * mm + 8 * att + head)


def device_peaks(name, tflops=None, tbps=None):
    """(peak bf16 dense TFLOP/s, peak memory TB/s) of a GPU by name; the arguments win; None = unknown."""
    row = next((r for r in PEAKS if r[0].lower() in name.lower()), (None, None, None))
    return tflops or row[1], tbps or row[2]
