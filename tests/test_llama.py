"""llama.py vs transformers' LlamaForCausalLM and vs what the original MiniGPT-4 code generated."""
import json
import re
import shutil

import pytest
import torch

from conftest import assert_close, load_reference, random_ids
from checkpoint import CheckpointError
from llama import Llama, LlamaConfig, Tokenizer, META_TO_HF, IGNORED_KEYS


@pytest.fixture(autouse=True)
def no_grad():
    """Inference only in this module (a module-level set_grad_enabled would leak into other test files)."""
    with torch.no_grad():
        yield


def copy_without(llama_dir, tmp_path, drop):
    dst = tmp_path / "llama"
    shutil.copytree(llama_dir, dst, ignore=shutil.ignore_patterns(drop))
    return dst


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("keep", ["safetensors", "bin"])
def test_logits_match_transformers(llama_dir, hf, tmp_path, keep):
    folder = copy_without(llama_dir, tmp_path, "pytorch_model.bin" if keep == "safetensors" else "*.safetensors")
    model = Llama.from_pretrained(folder)
    idx = random_ids(model.cfg, 2, 17)
    assert_close(model(idx), hf(idx).logits, f"logits ({keep})")


def test_kv_cache_equals_full_forward(ours):
    idx = random_ids(ours.cfg, 2, 12, seed=2)
    full = ours(idx)
    cache = ours.new_cache(2, 12)
    chunks = [ours(idx[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 7), (7, 12)]]
    assert cache.pos == 12
    assert_close(torch.cat(chunks, 1), full, "cached logits")


def test_right_padded_batch(ours):
    """Padded prefill: per-row logits equal each row alone; incremental decode continues exactly."""
    lens = [9, 5, 7]
    rows = [random_ids(ours.cfg, 1, n, seed=10 + i) for i, n in enumerate(lens)]
    T = max(lens)
    idx = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, :r.shape[1]], mask[b, :r.shape[1]] = r[0], 1
    batch = ours(idx, mask=mask)
    cache = ours.new_cache(len(lens), T + 4)
    assert_close(ours(idx, mask=mask, cache=cache), batch, "padded prefill with cache")
    nxt = random_ids(ours.cfg, len(lens), 4, seed=20)
    steps = [ours(nxt[:, s:s + 1], cache=cache) for s in range(4)]  # (B, 1, V) each
    for b, r in enumerate(rows):
        alone = ours(r)
        assert_close(batch[b, :lens[b]], alone[0], f"row {b}")
        solo = ours(torch.cat([r, nxt[b:b + 1]], 1))[0, lens[b]:]
        assert_close(torch.cat([s[b] for s in steps]), solo, f"decode row {b}")


def right_padded(cfg, lens, seed=30):
    idx = random_ids(cfg, len(lens), max(lens), seed=seed)
    mask = (torch.arange(max(lens)) < torch.tensor(lens)[:, None]).long()
    return idx * mask, mask


def test_logits_at_equals_full_forward_rows(ours):
    """logits_at (B, T) bool runs the LM head only at the selected positions: the same rows as the full forward,
    row-major; the cache is filled as without it."""
    idx, mask = right_padded(ours.cfg, [9, 5, 7])
    full = ours(idx, mask=mask)
    B, T = idx.shape
    last = torch.arange(T) == mask.sum(-1, keepdim=True) - 1  # one position per row (generation's prefill)
    some = torch.rand(B, T, generator=torch.Generator().manual_seed(0)) < 0.4  # any number per row
    for at in (last, some):
        out = ours(idx, mask=mask, logits_at=at)
        assert out.shape == (int(at.sum()), ours.cfg.vocab_size)
        assert_close(out, full[at], "logits_at rows")
    assert ours(idx, mask=mask, logits_at=torch.zeros(B, T, dtype=torch.bool)).shape == (0, ours.cfg.vocab_size)
    cache_a, cache_b = ours.new_cache(B, 12), ours.new_cache(B, 12)
    ours(idx, mask=mask, cache=cache_a, logits_at=last)
    ours(idx, mask=mask, cache=cache_b)
    nxt = random_ids(ours.cfg, B, 1, seed=31)
    assert_close(ours(nxt, cache=cache_a), ours(nxt, cache=cache_b), "decode after a logits_at prefill")


def test_gradient_checkpointing_same_loss_and_grads(ours):
    """The flag recomputes every block in backward (eval mode, as train.py runs the frozen LLM) and changes
    neither the loss nor the gradients."""
    idx, mask = right_padded(ours.cfg, [8, 6])
    calls = []
    for block in ours.model.layers:
        block.register_forward_pre_hook(lambda *_: calls.append(1))  # the recompute may stop early
    results = []
    for flag in (False, True):
        ours.gradient_checkpointing, calls[:] = flag, []
        embeds = ours.embed(idx).detach().requires_grad_()
        with torch.enable_grad():
            logits = ours(embeds=embeds, mask=mask)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten())
            loss.backward()
        results.append((loss.detach(), embeds.grad, ours.lm_head.weight.grad.clone()))
        ours.zero_grad()
        assert len(calls) == ours.cfg.n_layers * (2 if flag else 1)  # recomputed in backward
    for name, a, b in zip(["loss", "input grad", "lm_head grad"], *results):
        assert_close(b, a, name)
    calls[:] = []
    ours(idx, mask=mask)  # no grad (this module's fixture): the flag does nothing
    assert len(calls) == ours.cfg.n_layers


@pytest.fixture
def gqa_dir(tmp_path):
    """A random GQA model with tied embeddings and another rope_theta, saved by transformers."""
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = HFConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                   intermediate_size=100, vocab_size=200, rope_theta=500000.0, tie_word_embeddings=True,
                   rms_norm_eps=1e-5)
    m = LlamaForCausalLM(cfg).eval()
    m.save_pretrained(tmp_path / "gqa")
    return tmp_path / "gqa", m


def test_gqa_tied_matches_transformers(gqa_dir):
    folder, hf = gqa_dir
    model = Llama.from_pretrained(folder)
    assert model.cfg.n_kv_heads == 2 and model.cfg.tie_embeddings and model.cfg.rope_theta == 500000.0
    idx = random_ids(model.cfg, 2, 11)
    assert_close(model(idx), hf(idx).logits, "GQA logits")
    cache = model.new_cache(2, 11)
    assert_close(torch.cat([model(idx[:, :6], cache=cache), model(idx[:, 6:], cache=cache)], 1),
                 hf(idx).logits, "GQA cached logits")


def hf_to_meta_permute(w, n_heads):
    """Inverse of the q/k permutation in llama.meta_items: HF rotate-half rows -> Meta's interleaved pairs."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def to_meta_folder(llama_dir, dst, n_shards=2):
    """Write the HF fixture in Meta's layout: Meta names, interleaved q/k, params.json, MP shards."""
    from safetensors.torch import load_file
    sd = {k: v.float() for k, v in load_file(llama_dir / "model.safetensors").items()}
    cfg = LlamaConfig.from_hf(llama_dir)
    hf_to_meta = {hf: (meta, dim) for meta, (hf, dim) in META_TO_HF.items()}
    shards = [{} for _ in range(n_shards)]
    for key, w in sd.items():
        if any(re.fullmatch(p, key) for p in IGNORED_KEYS):
            continue
        parts = key.split(".")
        layer = parts[2] if parts[1] == "layers" else None
        meta, dim = hf_to_meta[".".join(parts[3:]) if layer else key]
        if meta == "attention.wq.weight":
            w = hf_to_meta_permute(w, cfg.n_heads)
        elif meta == "attention.wk.weight":
            w = hf_to_meta_permute(w, cfg.n_kv_heads)
        name = f"layers.{layer}.{meta}" if layer else meta
        for s in range(n_shards):
            shards[s][name] = w.clone() if dim is None else w.chunk(n_shards, dim)[s].clone()
    shards[0]["rope.freqs"] = torch.zeros(cfg.head_dim // 2)  # present in LLaMA-1 files, ignored
    dst.mkdir()
    for s, sd_s in enumerate(shards):
        torch.save(sd_s, dst / f"consolidated.{s:02d}.pth")
    base = int(2 * 4 * cfg.dim / 3)  # choose Meta's FFN rule parameters that give the fixture's hidden_dim
    (dst / "params.json").write_text(json.dumps(dict(
        dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, norm_eps=cfg.norm_eps, vocab_size=-1,
        multiple_of=cfg.hidden_dim, ffn_dim_multiplier=cfg.hidden_dim / base)))
    return dst


def test_meta_format_two_shards(llama_dir, ours, tmp_path):
    cfg = ours.cfg
    n = 2 if cfg.dim % 2 == 0 and cfg.hidden_dim % 2 == 0 and cfg.n_kv_heads % 2 == 0 else 1
    model = Llama.from_pretrained(to_meta_folder(llama_dir, tmp_path / "meta", n))
    assert model.cfg == cfg
    idx = random_ids(cfg, 2, 13)
    assert_close(model(idx), ours(idx), "Meta-format logits")
    for (k, a), b in zip(model.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), k  # the permutation round-trips exactly


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_tokenizer_matches_reference(ref_dir, ref_config, llama_dir, variant):
    tok = Tokenizer(llama_dir)
    ref = load_reference(ref_dir, variant)[1]
    t = ref["tokenizer"]
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.n_words) == (t["bos_token_id"], t["eos_token_id"],
                                                                  t["unk_token_id"], t["vocab_size"])
    for text, ids in t["encode_no_special"].items():
        assert tok.encode(text) == ids, text
    for text, ids in t["encode_with_bos"].items():
        assert tok.encode(text, bos=True) == ids, text
    for cap, ids in zip(ref_config["captions"], t["captions_plus_newline"]):
        assert tok.encode(cap + "\n") == ids
    assert tok.sp.encode(ref_config["captions"][0], out_type=str) == t["pieces_of_caption0"]
    for chat in ref["chat"]:
        segs = [tok.encode(s, bos=i == 0) for i, s in enumerate(chat["prompt_segments"])]
        assert segs == [s[0] for s in chat["prompt_segment_ids"]]
        answer = chat.get("answer_decoded", chat.get("answer_decoded_skip_special"))
        assert tok.decode(chat["generate_output_ids"]) == answer
    assert tok.decode(tok.encode("a red circle", bos=True, eos=True)) == "a red circle"


def test_published_parameter_counts():
    for name, count in [("llama-7b", 6_738_415_616), ("vicuna-7b", 6_738_415_616),
                        ("llama2-7b", 6_738_415_616), ("vicuna-13b", 13_015_864_320)]:
        with torch.device("meta"):
            model = Llama(LlamaConfig.from_name(name))
        assert sum(p.numel() for p in model.parameters()) == count, name


def test_bad_inputs(llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        Llama.from_pretrained(tmp_path / "nope")
    folder = copy_without(llama_dir, tmp_path, "pytorch_model.bin")
    index = {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors listed in .* is missing"):
        Llama.from_pretrained(folder)
    shutil.rmtree(folder)

    from safetensors.torch import load_file, save_file
    sd = load_file(llama_dir / "model.safetensors")
    cases = {"truncated": None, "garbage": None,
             "unexpected": dict(sd, **{"model.extra.weight": torch.zeros(2)}),
             "shape": dict(sd, **{"model.norm.weight": torch.zeros(3)}),
             "missing": {k: v for k, v in sd.items() if k != "model.norm.weight"}}
    messages = {"truncated": "not a readable safetensors file", "garbage": "not a readable safetensors file",
                "unexpected": "unexpected key in checkpoint: model.extra.weight",
                "shape": r"shape mismatch for model.norm.weight", "missing": "missing 1 key.*model.norm.weight"}
    for case, state in cases.items():
        folder = copy_without(llama_dir, tmp_path / case, "pytorch_model.bin")
        st = folder / "model.safetensors"
        if case == "truncated":
            st.write_bytes(st.read_bytes()[:5000])
        elif case == "garbage":
            st.write_bytes(b"this is not a checkpoint" * 10)
        else:
            save_file(state, st)
        with pytest.raises(CheckpointError, match=messages[case]):
            Llama.from_pretrained(folder)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer(bad)


def test_config_errors(llama_dir, tmp_path):
    """Malformed config.json / params.json / index files: one CheckpointError naming the file and key."""
    hf_cfg = json.loads((llama_dir / "config.json").read_text())
    path = tmp_path / "config.json"
    cases = [({"hidden_size": hf_cfg["hidden_size"]}, r"config\.json: missing key 'num_hidden_layers'"),
             ("{not json", r"config\.json: JSONDecodeError"), ("[1, 2]", r"config\.json: AttributeError"),
             (dict(hf_cfg, num_attention_heads=hf_cfg["hidden_size"] + 1),
              r"config\.json: .*dim \d+ is not divisible by n_heads \d+")]
    for content, message in cases:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(CheckpointError, match=message):
            LlamaConfig.from_hf(path)
    folder = copy_without(llama_dir, tmp_path / "bad_config", "pytorch_model.bin")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad_config/llama/config\.json: JSONDecodeError"):
        Llama.from_pretrained(folder)

    folder = copy_without(llama_dir, tmp_path / "bad_index", "pytorch_model.bin")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    for content, message in [("{oops", "JSONDecodeError"), ("{}", "missing key 'weight_map'")]:
        (folder / "model.safetensors.index.json").write_text(content)
        with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: " + message):
            Llama.from_pretrained(folder)

    params = tmp_path / "params.json"
    for content, message in [("{oops", "JSONDecodeError"), (json.dumps({"n_layers": 2}), "missing key 'dim'")]:
        params.write_text(content)
        with pytest.raises(CheckpointError, match=r"params\.json: " + message):
            LlamaConfig.from_meta(params, vocab_size=hf_cfg["vocab_size"])


def test_config_value_errors(ours):
    c = ours.cfg
    with pytest.raises(ValueError, match=rf"dim {c.dim} is not divisible by n_heads {c.dim + 1}"):
        LlamaConfig(dim=c.dim, n_heads=c.dim + 1)
    with pytest.raises(ValueError, match=rf"n_heads {c.n_heads} is not divisible by n_kv_heads {c.n_heads + 1}"):
        LlamaConfig(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_heads + 1)
    with pytest.raises(ValueError, match="unknown LLaMA preset 'nope'.*vicuna-7b.*tiny"):
        LlamaConfig.from_name("nope")


def test_json_files_are_closed(llama_dir, tmp_path):
    """Every JSON read closes its file (an unclosed one warns ResourceWarning when collected)."""
    import gc
    import warnings
    folder = copy_without(llama_dir, tmp_path, "pytorch_model.bin")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    sd_keys = json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})
    (folder / "model.safetensors.index.json").write_text(sd_keys)
    cfg = LlamaConfig.from_hf(folder)
    (folder / "params.json").write_text(json.dumps(dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LlamaConfig.from_hf(folder)
        LlamaConfig.from_meta(folder / "params.json", vocab_size=cfg.vocab_size)
        Llama.from_pretrained(folder)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
