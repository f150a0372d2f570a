"""quant.py: int4 packing and quantization round trips, the int8 error bound per Linear and on the tiny fixture's
logits, quantize-while-loading == quantizing a loaded model, save/load, the KV cache, and training through a
quantized frozen LLM (the gradient reaches llama_proj only)."""
import copy
import functools
import json

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, load_reference, random_ids

from llama import Llama
from model import MiniGPT4
from quant import (QuantLinear, dequantize_int4, pack_int4, quantize_, quantize_int4, quantize_int8, save_quantized,
                   unpack_int4)


@functools.lru_cache(maxsize=None)
def loaded(llama_dir, quant=None):
    return Llama.from_pretrained(llama_dir, quant=quant)


def test_int4_packing_round_trip():
    q = torch.randint(0, 16, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.shape == (5, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)
    assert torch.equal(packed[0, 0], q[0, 0] | q[0, 1] << 4)  # low nibble: the even column


@pytest.mark.parametrize("K,group", [(128, 32), (128, 64), (172, 64)])  # 172: padded to whole groups
def test_int4_quantization_error_is_half_a_step(K, group):
    w = torch.randn(48, K, generator=torch.Generator().manual_seed(1))
    packed, scales, zeros = quantize_int4(w, group)
    deq = dequantize_int4(packed, scales, zeros, K, torch.float32)
    step = scales.repeat_interleave(group, dim=1)[:, :K]  # (N, K): each weight's group step
    assert deq.shape == w.shape and ((deq - w).abs() <= step / 2 + 1e-6).all()


def test_int8_linear_error_bound():
    """Rounding to nearest moves each weight by at most half a step s_i = max_j |w_ij| / 127, so each output
    y_i = sum_j w_ij x_j moves by at most s_i / 2 * ||x||_1 (fused op and fallback alike)."""
    g = torch.Generator().manual_seed(2)
    lin = nn.Linear(96, 40, bias=False)
    nn.init.normal_(lin.weight, generator=g)
    x = torch.randn(7, 96, generator=g)
    ql = quantize_(nn.Sequential(lin), "int8")[0]
    s = lin.weight.abs().amax(1) / 127
    bound = s / 2 * x.abs().sum(-1, keepdim=True)  # (7, 40)
    y = ql(x)
    assert ((y - lin(x)).abs() <= bound + 1e-5).all()
    assert torch.allclose(y, x @ ql.dequantize().T, atol=1e-5)  # fused == dequantize-then-matmul


def test_int8_fixture_logits_within_bound(llama_dir):
    """Rounding moves a weight uniformly within half a step, so each quantized Linear adds a relative RMS error of
    at most eps = max_i (max_j |w_ij| / 127) / (sqrt(12) rms_j(w_ij)) to its output. The logits sit behind at most
    1 + 2 L such additions in series (L layers, each adding an attention and an MLP branch to the residual stream,
    then the LM head), so to first order rms(d logits) <= (1 + 2 L) eps rms(logits); elementwise, <= 6x that."""
    fp32, int8 = loaded(llama_dir), loaded(llama_dir, "int8")
    eps = max((m.weight.abs().amax(1) / 127 / (12 ** 0.5 * m.weight.pow(2).mean(1).sqrt())).max().item()
              for m in fp32.modules() if isinstance(m, nn.Linear))
    ids = random_ids(fp32.cfg, 2, 24)
    ref, out = fp32(ids), int8(ids)
    rms_bound = (1 + 2 * fp32.cfg.n_layers) * eps * ref.pow(2).mean().sqrt()
    assert (out - ref).pow(2).mean().sqrt() <= rms_bound
    assert (out - ref).abs().max() <= 6 * rms_bound


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_while_loading_equals_quantizing_loaded(llama_dir, mode):
    a, b = Llama.from_pretrained(llama_dir, quant=mode), quantize_(Llama.from_pretrained(llama_dir), mode)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_parameter_free_and_unquantized_modules_untouched(llama_dir):
    fp32, q = loaded(llama_dir), loaded(llama_dir, "int4")
    kinds = {n: type(m) for n, m in fp32.named_modules()}
    for name, m in q.named_modules():  # only the Linears are replaced; every other module keeps its type
        assert isinstance(m, QuantLinear) if kinds[name] is nn.Linear else type(m) is kinds[name], name
    ref = fp32.state_dict()
    kept = [k for k in ref if not k.endswith(("proj.weight", "lm_head.weight"))]
    assert kept and all(torch.equal(q.state_dict()[k], ref[k]) for k in kept)  # embeddings, norms: bitwise


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kv_cache_quantized(llama_dir, mode):
    m = loaded(llama_dir, mode)
    ids = random_ids(m.cfg, 2, 12)
    full = m(ids)
    cache = m.new_cache(2, 16)
    assert cache.k.dtype == torch.float32  # the cache takes the activations' dtype, not the int weights'
    step = torch.cat([m(ids[:, :8], cache=cache)] + [m(ids[:, t:t + 1], cache=cache) for t in range(8, 12)], 1)
    assert torch.allclose(step, full, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_save_load_round_trip(llama_dir, tmp_path, mode):
    m = loaded(llama_dir, mode)
    save_quantized(m, tmp_path / "q", tokenizer=llama_dir)
    back = Llama.from_pretrained(tmp_path / "q")  # the folder says how it was quantized
    sa, sb = m.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(isinstance(x, QuantLinear) and x.mode == mode for x in back.modules() if hasattr(x, "scales"))
    assert (tmp_path / "q" / "tokenizer.model").is_file()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_training_through_quantized_llm_reaches_llama_proj_only(ref_dir, mode):
    m = MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", quant=mode)
    assert isinstance(m.llama_model.model.layers[0].mlp.up_proj, QuantLinear)
    assert type(m.llama_proj) is nn.Linear and m.llama_proj.weight.dtype == torch.float32  # not quantized
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias"}
    ref, js = load_reference(ref_dir, "vicuna0")
    m(ref["pixel_values"], js["captions"], "<Img><ImageHere></Img> Describe it.").backward()
    assert m.llama_proj.weight.grad.abs().sum() > 0 and m.llama_proj.bias.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)


def test_unknown_mode_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        QuantLinear(8, 8, "int3")


def test_tied_head_is_quantized_from_the_embeddings(tmp_path):
    from safetensors.torch import save_file
    from llama import LlamaConfig
    torch.manual_seed(0)
    m = Llama(LlamaConfig.from_name("tiny"))
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}  # a tied checkpoint stores no head
    save_file(sd, tmp_path / "model.safetensors")
    c = m.cfg
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=c.dim, num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, vocab_size=c.vocab_size,
        intermediate_size=c.hidden_dim, tie_word_embeddings=True)))
    q = Llama.from_pretrained(tmp_path, quant="int8")
    w8, scales = quantize_int8(sd["model.embed_tokens.weight"])
    assert torch.equal(q.lm_head.weight, w8) and torch.equal(q.lm_head.scales, scales)
    save_quantized(q, tmp_path / "q")
    back = Llama.from_pretrained(tmp_path / "q")
    assert torch.equal(back.lm_head.weight, q.lm_head.weight) and torch.equal(back.lm_head.scales, q.lm_head.scales)


def test_smollm2_perplexity(smollm2_gguf):
    """A real pretrained LLM (SmolLM2-135M-Instruct; its Q4_1/Q8_0 file dequantized to fp32 is the baseline):
    perplexity on a fixed text (this repo's README) rises < 1% with int8, < 10% with int4 (groups of 32, the default)."""
    from llama import load_tokenizer
    ids = torch.tensor([load_tokenizer(smollm2_gguf).encode((ROOT / "README.md").read_text())[:256]])
    fp32 = Llama.from_pretrained(smollm2_gguf)

    def ppl(m):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:]).exp().item()
    base = ppl(fp32)
    int8, int4 = ppl(quantize_(copy.deepcopy(fp32), "int8")), ppl(quantize_(copy.deepcopy(fp32), "int4"))
    print(f"SmolLM2 ppl fp32 {base:.3f} int8 {int8:.3f} ({int8 / base:.4f}x) int4/32 {int4:.3f} ({int4 / base:.4f}x)")
    assert int8 / base < 1.01 and int4 / base < 1.10
