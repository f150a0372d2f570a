"""generate.py: greedy / sampling / streaming / stop strings / kept caches and beam search, against
transformers' generate and what the original MiniGPT-4 code generated."""
import functools

import pytest
import torch

from conftest import assert_close, load_reference, random_ids
from generate import beam_search, generate, process_logits
from llama import Llama, LlamaConfig, Tokenizer


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def test_greedy_matches_transformers(ours, hf):
    idx = random_ids(ours.cfg, 1, 7, seed=1)
    ref = hf.generate(idx, max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 7:]
    out = generate(ours, idx, max_new_tokens=20, eos_id=None)
    assert out.ids[0].tolist() == ref.tolist()


@pytest.mark.parametrize("variant", ["vicuna0", "llama2"])
def test_chat_generation_matches_original(ref_dir, ours, variant):
    """The original's greedy generate from inputs_embeds (input_ids seeded with [bos]): ids and scores."""
    tensors, meta = load_reference(ref_dir, variant)
    for i, chat in enumerate(meta["chat"]):
        ctx = tensors[f"chat{i}.context_embeds"]
        assert_close(ours(embeds=ctx), tensors[f"chat{i}.logits"], "context logits")
        rp = chat["generate_kwargs"]["repetition_penalty"]
        out = generate(ours, embeds=ctx, max_new_tokens=20, repetition_penalty=rp, penalty_ids=[[1]],
                       return_scores=True)
        n = out.ids.shape[1]
        assert [1] + out.ids[0].tolist() == chat["generate_output_ids"]
        assert_close(out.scores[:, 0], tensors[f"chat{i}.gen_scores"][:n], "gen_scores")
        if "generate_output_ids_repetition_penalty_1" in chat:
            out = generate(ours, embeds=ctx, max_new_tokens=20)
            assert [1] + out.ids[0].tolist() == chat["generate_output_ids_repetition_penalty_1"]


def test_sampling_matches_transformers(ours, hf):
    """Sampling without torch.multinomial's host sync still draws what transformers draws for a seed."""
    idx = random_ids(ours.cfg, 2, 6, seed=7)
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2)
    for seed in range(3):
        torch.manual_seed(seed)
        ref = hf.generate(idx, max_new_tokens=12, eos_token_id=None, pad_token_id=0, **kw)[:, 6:]
        torch.manual_seed(seed)
        out = generate(ours, idx, max_new_tokens=12, eos_id=None, **kw)
        assert out.ids.tolist() == ref.tolist()


def test_batched_generation_rows_stop_independently(ours):
    a, b = random_ids(ours.cfg, 1, 6, seed=3), random_ids(ours.cfg, 1, 4, seed=4)
    solo_a = generate(ours, a, max_new_tokens=12, eos_id=None).ids[0]
    solo_b = generate(ours, b, max_new_tokens=12, eos_id=None).ids[0]
    eos = int(solo_a[3])  # row a "ends" at its 4th token (or earlier if it appeared before)
    stop_at = solo_a.tolist().index(eos) + 1
    idx = torch.zeros(2, 6, dtype=torch.long)
    idx[0], idx[1, :4] = a[0], b[0]
    mask = (torch.arange(6) < torch.tensor([[6], [4]])).long()
    out = generate(ours, idx, mask=mask, max_new_tokens=12, eos_id=eos, pad_id=0)
    want_b = solo_b.tolist()
    want_b = want_b[:want_b.index(eos) + 1] if eos in want_b else want_b
    assert out.lengths.tolist() == [stop_at, len(want_b)]
    assert out.ids[0].tolist() == solo_a[:stop_at].tolist() + [0] * (out.ids.shape[1] - stop_at)
    assert out.ids[1, :len(want_b)].tolist() == want_b


def test_cache_reuse_across_turns(ours):
    """Turn 2 with the returned cache == one generate over the whole history without a cache."""
    p1, p2 = random_ids(ours.cfg, 1, 6, seed=5), random_ids(ours.cfg, 1, 5, seed=6)
    turn1 = generate(ours, p1, max_new_tokens=5, eos_id=None, cache=ours.new_cache(1, 40))
    assert turn1.cache.n_valid().item() == 6 + 5 - 1  # the last generated token is not fed yet
    ids2 = torch.cat([turn1.ids[:, -1:], p2], 1)
    turn2 = generate(ours, ids2, max_new_tokens=6, eos_id=None, cache=turn1.cache, return_scores=True)
    full = torch.cat([p1, turn1.ids, p2], 1)
    ref = generate(ours, full, max_new_tokens=6, eos_id=None, return_scores=True)
    assert turn2.ids.tolist() == ref.ids.tolist()
    assert_close(turn2.scores, ref.scores, "turn-2 scores")


def test_streaming_and_stop_strings(ours, llama_dir):
    tok = Tokenizer(llama_dir)
    idx = torch.tensor([tok.encode("a red circle and", bos=True)])
    full = generate(ours, idx, max_new_tokens=20, eos_id=None, tokenizer=tok)
    streamed = []
    again = generate(ours, idx, max_new_tokens=20, eos_id=None, tokenizer=tok,
                     on_text=lambda row, d: streamed.append(d))
    assert "".join(streamed) == again.texts[0] == full.texts[0] == tok.decode(full.ids[0])
    text = full.texts[0]
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a string from the middle of the answer
    streamed = []
    cut = generate(ours, idx, max_new_tokens=20, eos_id=None, tokenizer=tok, stop=[stop],
                   on_text=lambda row, d: streamed.append(d))
    assert cut.texts[0] == text[:text.find(stop)] == "".join(streamed)
    assert cut.ids.shape[1] < 20 and cut.ids[0].tolist() == full.ids[0, :cut.ids.shape[1]].tolist()
    ids_stop = full.ids[0, 5:7].tolist()  # a token-id stop sequence
    out = generate(ours, idx, max_new_tokens=20, eos_id=None, stop=[ids_stop])
    assert out.ids[0].tolist() == full.ids[0, :7].tolist()


def test_sampling_processors_match_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g) * 3
    input_ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, input_ids, True)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(input_ids, logits)
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = proc(input_ids, ref)
    ours = process_logits(logits, seen, 1.3, do_sample=True, temperature=0.7, top_k=10, top_p=0.8)
    assert torch.equal(ours.isinf(), ref.isinf())
    assert_close(ours.masked_fill(ours.isinf(), 0), ref.masked_fill(ref.isinf(), 0), "processed scores")
    out = generate(Llama(LlamaConfig(dim=32, n_layers=1, n_heads=2, vocab_size=60, hidden_dim=64)),
                   torch.tensor([[1, 5, 6]]), max_new_tokens=5, do_sample=True, top_k=3, eos_id=None,
                   generator=torch.Generator().manual_seed(0))
    assert out.ids.shape == (1, 5)


# ------------------------------------------------------------------------------------------ beam search
@functools.lru_cache(maxsize=None)
def hf_llama(ref_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaForCausalLM.from_pretrained(ref_dir / "llama", dtype=torch.float32).eval()


def hf_generate(ref_dir, emb, **kw):
    with torch.no_grad():
        return hf_llama(ref_dir).generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                          early_stopping=False, pad_token_id=0, **kw)


@pytest.mark.parametrize("case", ["plain", "eos_often", "penalties", "batch", "start_ids_eos_early", "sampling"])
def test_beam_search_matches_transformers(ref_dir, ours, case):
    """transformers 5.x given only inputs_embeds (empty input_ids). "start_ids_eos_early": the default path
    (MiniGPT4.generate's [bos] start, transformers 4.28's convention): a finished hypothesis there is
    [bos] + the tokens before the eos, which has as many tokens as 5.x's new tokens with the eos, so 5.x must
    agree when eos hypotheses win (length_penalty != 1 makes an off-by-one length change the winner)."""
    tok = Tokenizer(ref_dir / "llama")
    ref, js = load_reference(ref_dir, "vicuna0")
    emb = ref["chat0.context_embeds"] if case not in ("batch", "sampling") else \
        torch.cat([ref["chat0.context_embeds"], ref["chat1.context_embeds"]])
    eos = tok.eos_id
    plain = beam_search(ours, emb[:1], None, 3, 12, tokenizer=tok).ids[0]
    if case == "eos_often":  # pretend a token the beams meet early is eos: finished hypotheses, early stop
        eos = plain[3].item()
    if case == "start_ids_eos_early":
        eos = plain[5].item()
    kw = dict(num_beams=3, max_new_tokens=12, length_penalty=1.0, repetition_penalty=1.0)
    if case == "eos_often":
        kw.update(length_penalty=0.0)  # plain sums favour the short finished hypotheses
    if case == "penalties":
        kw.update(length_penalty=0.6, repetition_penalty=1.3)
    if case == "start_ids_eos_early":
        kw.update(length_penalty=0.5)
    sample = dict(do_sample=True, temperature=0.7, top_p=0.5) if case == "sampling" else dict(do_sample=False)
    torch.manual_seed(0)
    out = hf_generate(ref_dir, emb, eos_token_id=eos, top_k=None, **sample, **kw)
    start = torch.full((emb.shape[0], 1), tok.bos_id) if case == "start_ids_eos_early" else None
    torch.manual_seed(0)
    ours = beam_search(ours, emb, None, kw["num_beams"], kw["max_new_tokens"], kw["repetition_penalty"],
                       kw["length_penalty"], start, tokenizer=tok, eos_id=eos, **sample)
    if case in ("eos_often", "start_ids_eos_early"):
        assert ours.lengths[0] < 12 and ours.ids[0, ours.lengths[0] - 1] == eos
    for b in range(emb.shape[0]):
        n = int(ours.lengths[b])
        assert ours.ids[b, :n].tolist() == out[b, :n].tolist()
        assert (out[b, n:] == 0).all()  # HF pads after the best hypothesis
