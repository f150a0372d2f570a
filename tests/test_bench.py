"""bench.py --e2e: the CPU smoke run, and the GPU-only helpers checked on tiny shapes on the CPU: FLOP counting
(against torch's FlopCounterMode on a real training step), peak lookup by device name, and the ours ->
transformers weight conversion (outputs equal in fp32). bench.py --attention's CPU path: tests/test_attention.py."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, assert_close

_interpret = os.environ.get("TRITON_INTERPRET")
from train import device_peaks, train_flops  # noqa: E402
import bench  # noqa: E402  (on CPU it sets TRITON_INTERPRET=1 for its --attention section: not for the other tests)
if _interpret is None:
    os.environ.pop("TRITON_INTERPRET", None)


@pytest.fixture(scope="module")
def tiny():
    """Our tiny MiniGPT4 with random weights (bench.build_ours) and the same weights in transformers' modules."""
    pytest.importorskip("transformers")
    from model import MiniGPT4Config
    cfg = MiniGPT4Config.from_name("tiny")
    m = bench.build_ours(cfg, torch.device("cpu"), torch.float32, seed=1)
    return m, bench.to_transformers(m)


def test_e2e_cpu_smoke():
    r = subprocess.run([sys.executable, "bench.py", "--e2e"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "device: CPU" in out and "done in" in out and "MISMATCH" not in out
    for row in ("image encoding B=2 (triton), images/s", "image encoding B=2 (sdpa), images/s",
                "stage-1 step B=2, samples/s", "peak memory GiB", "MFU %", "time to first token, ms",
                "decode 16 tokens, tokens/s", "memory bandwidth, TB/s"):
        assert row in out, f"row {row!r} missing:\n{out}"


def test_device_peaks():
    assert device_peaks("NVIDIA H100 80GB HBM3") == (989, 3.35)
    assert device_peaks("NVIDIA H200") == (989, 4.8)
    assert device_peaks("NVIDIA H100 PCIe")[0] == 756
    assert device_peaks("NVIDIA A100-SXM4-80GB") == (312, None)
    assert device_peaks("Tesla T4") == (None, None)
    assert device_peaks("Tesla T4", tflops=65, tbps=0.3) == (65, 0.3)
    assert device_peaks("NVIDIA H200", tbps=5.0) == (989, 5.0)


def naive_attention(q, k, v, causal=False, mask=None, backend=None):
    """Plain matmul-softmax (no SDPA), so FlopCounterMode sees attention's matmuls and their backward."""
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    Lq, Lk = q.shape[2], k.shape[2]
    keep = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq) if causal else torch.ones(Lq, Lk, dtype=torch.bool)
    keep = keep & mask[:, None, None, :] if mask is not None else keep
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def test_train_flops_match_flop_counter(tiny, monkeypatch):
    """train_flops on the tiny config == what FlopCounterMode counts in a real stage-1 step (forward of
    everything, backward to llama_proj), matmul/conv by matmul/conv, with attention as plain matmuls."""
    from torch.utils.flop_counter import FlopCounterMode
    import llama
    import qformer
    import vit
    m, _ = tiny
    for mod in (vit, qformer, llama):
        monkeypatch.setattr(mod, "attention", naive_attention)
    B, texts = 2, ["a photo of a cat on a mat " * 8, "a dog"]  # the second row is padded: T counts padding
    pixels = torch.randn(B, 3, m.cfg.vit.img_size, m.cfg.vit.img_size)
    with FlopCounterMode(display=False) as fc:
        loss = m(pixels, texts, max_txt_len=32)
        loss.backward()
    m.zero_grad(set_to_none=True)
    counted = fc.get_total_flops()
    with torch.no_grad():
        _, mask, labels = m.build_inputs(m.encode_img(pixels)[0], texts, max_txt_len=32)
    T, targets = mask.shape[1], int((labels[:, 1:] != -100).sum())  # lm_loss runs the LM head at targets only
    parts = train_flops(m.cfg.vit, m.cfg.qformer, m.llama_model.cfg, T, targets=targets / B)
    assert B * sum(parts.values()) == counted, (parts, T, counted)
    # the parts on their own: the image side alone (forward only, no grad)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m.encode_img(pixels)
    proj_fwd = 2 * m.cfg.qformer.n_queries * m.llama_proj.weight.numel()
    assert fc.get_total_flops() == B * (parts["vit"] + parts["qformer"] + proj_fwd)


@pytest.mark.parametrize("ablation", [dict(no_qformer=True), dict(proj_layers=3), dict(train_qformer=True),
                                      dict(proj_layers=3, train_qformer=True)], ids=str)
def test_train_flops_of_the_ablations_match_flop_counter(ablation, monkeypatch):
    """Table 5's variants: the same count as FlopCounterMode on a real step, backward included (3-layer
    projection: grads between its layers; trained Q-Former: its forward, activation and weight grads)."""
    from torch.utils.flop_counter import FlopCounterMode
    import llama
    import qformer
    import vit
    from model import MiniGPT4Config, ablate
    for mod in (vit, qformer, llama):
        monkeypatch.setattr(mod, "attention", naive_attention)
    m = bench.build_ours(ablate(MiniGPT4Config.from_name("tiny"), **ablation), torch.device("cpu"), torch.float32)
    B, texts = 2, ["a photo of a cat", "a dog"]
    pixels = torch.randn(B, 3, m.cfg.vit.img_size, m.cfg.vit.img_size)
    with FlopCounterMode(display=False) as fc:
        m(pixels, texts, max_txt_len=32).backward()
    with torch.no_grad():
        _, mask, labels = m.build_inputs(m.encode_img(pixels)[0], texts, max_txt_len=32)
    T, targets = mask.shape[1], int((labels[:, 1:] != -100).sum())
    parts = train_flops(m.cfg.vit, m.cfg.qformer, m.llama_model.cfg, T, m.cfg.group, targets / B, **m.ablation)
    assert B * sum(parts.values()) == fc.get_total_flops(), parts


def test_train_flops_7b_magnitude():
    """Sanity of the real-size numbers: the LLM matmul part is 2 * (params without the embedding) per token."""
    from llama import Llama, LlamaConfig
    from qformer import QFormerConfig
    from vit import ViTConfig
    c = LlamaConfig()
    with torch.device("meta"):
        n = sum(p.numel() for k, p in Llama(c).named_parameters() if "norm" not in k and "embed" not in k)
    T = 65
    p = train_flops(ViTConfig(), QFormerConfig(), c, T)
    assert p["llm_fwd"] - 4 * c.n_layers * T * T * c.dim == 2 * n * T
    assert p["llm_bwd"] - p["llm_fwd"] == 4 * c.n_layers * T * T * c.dim
    assert 0.45e12 < p["vit"] < 0.55e12  # ~1B parameters x 257 tokens x 2


@torch.no_grad()
def test_transformers_conversion_matches(tiny):
    """Image encoding, LLM logits and the training loss: ours == transformers with the converted weights."""
    m, (vis, qfm, llm) = tiny
    pixels = torch.randn(2, 3, m.cfg.vit.img_size, m.cfg.vit.img_size, generator=torch.Generator().manual_seed(0))
    img = m.encode_img(pixels)[0]
    assert_close(img, bench.hf_encode(m, vis, qfm, pixels), "image embeddings")
    assert_close(m.ln_vision(m.visual_encoder(pixels)), vis(pixels).last_hidden_state, "ViT + ln_vision")
    emb, mask, labels = m.build_inputs(img, ["a photo of a cat on a mat", "a dog"], max_txt_len=32)
    assert not mask.all()  # a padded row
    real = mask.bool()  # pad positions differ by design (our pads keep the last real position id)
    ref = llm(inputs_embeds=emb, attention_mask=mask).logits
    assert_close(m.llama_model(embeds=emb, mask=mask)[real], ref[real], "logits at real tokens")
    ours = m.lm_loss(emb, mask, labels)[0]
    assert_close(ours, llm(inputs_embeds=emb, attention_mask=mask, labels=labels).loss, "loss")
    # frozen like ours (no weight gradients in the timed step), and the matmul weights are shared, not copied
    assert not any(p.requires_grad for hf in (vis, qfm, llm) for p in hf.parameters())
    ptr = lambda p: p.data_ptr()
    assert ptr(llm.model.layers[0].mlp.up_proj.weight) == ptr(m.llama_model.model.layers[0].mlp.up_proj.weight)
    assert ptr(vis.encoder.layers[0].self_attn.qkv.weight) == ptr(m.visual_encoder.blocks[0].attn.qkv.weight)


def test_build_ours_dtypes():
    """bench.build_ours gives from_pretrained's dtypes: LLM, ViT/Q-Former matmuls in the low dtype, the rest fp32."""
    from model import MiniGPT4Config
    cfg = MiniGPT4Config.from_name("tiny")
    m = bench.build_ours(cfg, torch.device("cpu"), torch.bfloat16)
    dt = {k: p.dtype for k, p in m.named_parameters()}
    assert dt["llama_model.model.norm.weight"] == dt["visual_encoder.blocks.0.attn.qkv.weight"] == torch.bfloat16
    assert dt["Qformer.encoder.layer.0.crossattention.self.key.weight"] == torch.bfloat16
    for k in ("llama_proj.weight", "ln_vision.weight", "visual_encoder.pos_embed", "Qformer.query_tokens",
              "visual_encoder.blocks.0.attn.q_bias", "visual_encoder.blocks.0.norm1.weight",
              "Qformer.embeddings.LayerNorm.weight"):
        assert dt[k] == torch.float32, k
    assert [k for k, p in m.named_parameters() if p.requires_grad] == ["llama_proj.weight", "llama_proj.bias"]
