"""gguf_reader.py: dequantization vs the `gguf` package (synthetic files written by its writer, and the real
SmolLM2 file), SmolLM2-135M-Instruct logits and greedy tokens vs transformers loading the same GGUF, errors."""
import numpy as np
import pytest
import torch

from conftest import assert_close
from checkpoint import CheckpointError
from gguf_reader import GGUFFile, TYPES
from llama import Llama, load_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (test-only reference) is not installed")
Q = gguf.GGMLQuantizationType


def write_gguf(path, tensors, arch="llama", kv=None):
    """tensors {name: (float32 array, ggml type)} -> a GGUF file written by the gguf package."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (kv or {}).items():
        w.add_uint32(k, v) if isinstance(v, int) else w.add_float32(k, v)
    for name, (x, qtype) in tensors.items():
        if qtype == Q.F32:
            w.add_tensor(name, x.astype(np.float32))
        elif x.dtype == np.uint8:  # raw blocks (types the package cannot quantize)
            w.add_tensor(name, x, raw_dtype=qtype)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference(path, names):
    """{name: float32 tensor} dequantized by the gguf package's reader."""
    r = gguf.GGUFReader(str(path))
    return {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(
        tuple(reversed([int(d) for d in t.shape]))).astype(np.float32)) for t in r.tensors if t.name in names}


# --------------------------------------------------------------------------------------- dequantization
def test_every_supported_type_dequantizes_as_the_gguf_package(tmp_path):
    rng = np.random.default_rng(0)
    types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1]
    assert {int(t) for t in types} == set(TYPES)
    path = write_gguf(tmp_path / "types.gguf", {t.name: (rng.standard_normal((6, 64)).astype(np.float32) * 3, t)
                                                for t in types})
    ours, ref = GGUFFile(path), reference(path, [t.name for t in types])
    for t in types:
        x = ours.tensor(t.name)
        assert x.dtype == torch.float32 and x.shape == (6, 64)
        assert torch.equal(x, ref[t.name]), t.name  # bit-exact
    assert ours.tensor("F16", torch.float16).dtype == torch.float16


def test_smollm2_tensors_dequantize_as_the_gguf_package(smollm2_gguf):
    ours = GGUFFile(smollm2_gguf)
    names = ["token_embd.weight", "output_norm.weight"] + [n for n in ours.tensors if n.startswith("blk.0.")]
    ref, kinds = reference(smollm2_gguf, names), {}
    for name in names:
        kinds[TYPES[ours.tensors[name][0]][0]] = name
        assert torch.equal(ours.tensor(name), ref[name]), name
    assert set(kinds) == {"Q8_0", "Q4_1", "F32"}


# ------------------------------------------------------------------------ SmolLM2 vs transformers
PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "The quick brown fox jumps over the lazy dog. 1234 + 5678 = ",
           "Les élèves étudient l'histoire 🌍 et la géographie."]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return Llama.from_pretrained(smollm2_gguf), load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    import os
    from transformers import LlamaForCausalLM
    folder, name = os.path.split(smollm2_gguf)
    return LlamaForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_config_from_metadata(smollm2):
    cfg = smollm2[0].cfg
    got = (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size, cfg.rope_theta,
           cfg.max_seq_len, cfg.tie_embeddings)
    assert got == (576, 30, 9, 3, 1536, 49152, 100000.0, 8192, True)
    assert smollm2[0].lm_head.weight is smollm2[0].model.embed_tokens.weight


@torch.no_grad()
def test_logits_match_transformers(smollm2, hf_smollm2):
    model, tok = smollm2
    for prompt in PROMPTS:
        idx = torch.tensor([tok.encode(prompt)])
        assert_close(model(idx), hf_smollm2(idx).logits, prompt[:20])


@torch.no_grad()
def test_30_greedy_tokens_match_transformers(smollm2, hf_smollm2):
    from generate import generate
    model, tok = smollm2
    for prompt in PROMPTS[1:3]:
        idx = torch.tensor([tok.encode(prompt)])
        ours = generate(model, idx, max_new_tokens=30).ids[0].tolist()
        ref = hf_smollm2.generate(idx, max_new_tokens=30, min_new_tokens=30, do_sample=False)[0, idx.shape[1]:]
        assert ours == ref.tolist(), prompt[:20]


# ------------------------------------------------------------------------------------------ errors
def tiny_llama_kv():
    return {"llama.block_count": 1, "llama.embedding_length": 64, "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 32}


def test_unsupported_tensor_type(tmp_path):
    x = np.zeros((2, 144), np.uint8)  # two Q4_K blocks of 256 values
    path = write_gguf(tmp_path / "k.gguf", {"token_embd.weight": (x, Q.Q4_K)}, kv=tiny_llama_kv())
    with pytest.raises(CheckpointError, match="token_embd.weight has ggml type Q4_K; supported: F32"):
        Llama.from_pretrained(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {"x": (np.zeros(4, np.float32), Q.F32)}, arch="gpt2")
    with pytest.raises(CheckpointError, match="architecture 'gpt2' is not supported"):
        Llama.from_pretrained(path)


def test_bad_version_magic_truncation_and_missing(tmp_path):
    x = np.ones((4, 64), np.float32)
    path = write_gguf(tmp_path / "ok.gguf", {"token_embd.weight": (x, Q.Q8_0)}, kv=tiny_llama_kv())
    blob = path.read_bytes()
    (tmp_path / "v1.gguf").write_bytes(blob[:4] + (1).to_bytes(4, "little") + blob[8:])
    with pytest.raises(CheckpointError, match="GGUF version 1 is not supported"):
        GGUFFile(tmp_path / "v1.gguf")
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + blob[4:])
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        GGUFFile(tmp_path / "magic.gguf")
    (tmp_path / "head.gguf").write_bytes(blob[:100])
    with pytest.raises(CheckpointError, match="truncated or corrupt GGUF header"):
        GGUFFile(tmp_path / "head.gguf")
    (tmp_path / "data.gguf").write_bytes(blob[:-40])
    with pytest.raises(CheckpointError, match="truncated: tensor token_embd.weight ends at byte"):
        GGUFFile(tmp_path / "data.gguf").tensor("token_embd.weight")
    with pytest.raises(CheckpointError, match="GGUF file not found"):
        Llama.from_pretrained(tmp_path / "absent.gguf")


def test_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "part.gguf", {"token_embd.weight": (np.ones((32, 64), np.float32), Q.F32)},
                      kv=tiny_llama_kv())
    with pytest.raises(CheckpointError, match="missing .* key"):
        Llama.from_pretrained(path)
