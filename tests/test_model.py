"""model.py (and sample.Chat): KV-cached chat == re-reading the history, batching == one by one, beam search
== transformers, clear errors for mismatched projections / missing files, the checkpoint layout, gradients."""
import functools

import pytest
import torch
from conftest import assert_close, load_reference

from checkpoint import CheckpointError
from model import TEMPLATES, MiniGPT4, MissingWeights, find_weights
from sample import Chat


@functools.lru_cache(maxsize=None)
def load(ref_dir, name="vicuna-7b"):
    return MiniGPT4.from_pretrained(ref_dir, name)


@pytest.fixture(params=["vicuna-7b", "llama2-7b"])
def model(request, ref_dir):
    return load(ref_dir, request.param)


def greedy(**kw):
    return dict(do_sample=False, stop=(), repetition_penalty=1.0, **kw)


def full_history_logits(chat):
    """Logits that predicted the last answer, by one forward over the whole history re-embedded."""
    ids = chat.messages[-1]["ids"]
    chat.messages[-1]["ids"] = None
    prefix = chat.context_embeds()  # everything up to the assistant's opening
    chat.messages[-1]["ids"] = ids
    full = torch.cat([prefix, chat.model.embed(ids)], dim=1)
    return chat.model.llama_model(embeds=full)[0, prefix.shape[1] - 1:-1], full.shape[1]


def test_chat_kv_cache_equals_full_history(model, ref_dir):
    ref, _ = load_reference(ref_dir, model.cfg.variant)
    chat = Chat(model, **greedy(max_new_tokens=6, return_scores=True))
    fed = []
    orig = model.generate
    model.generate = lambda emb, **kw: fed.append(emb.shape[1]) or orig(emb, **kw)
    try:
        chat.upload_img(ref["chat0.img_embeds"][0])
        for q in ["What is in this image?", "And what colour is it?", "Why?"]:
            chat.ask(q)
            chat.answer()
            logits, L = full_history_logits(chat)  # the same token history re-embedded in one forward
            assert_close(chat.last.scores[:, 0], logits, "kept-cache logits vs full history")
            assert logits.argmax(-1).tolist() == chat.messages[-1]["ids"]
    finally:
        del model.generate
    assert fed[1] < L // 2 and fed[2] < L // 2  # follow-ups feed only their own tokens
    assert chat.n_fed == L - 1


def test_chat_context_cap_drops_oldest_turns(model, ref_dir, capsys):
    ref, _ = load_reference(ref_dir, model.cfg.variant)
    chat = Chat(model, **greedy(max_new_tokens=6, return_scores=True))
    chat.upload_img(ref["chat0.img_embeds"][0])
    chat.ask("What is in this image?")
    chat.answer()
    first = chat.context_embeds().shape[1]
    chat.max_context = first + 36  # room for about two more short exchanges
    questions = ["Is it big?", "Why?", "Anything else?", "Sure?"]
    for q in questions:
        chat.ask(q)
        chat.answer()
        logits, L = full_history_logits(chat)
        assert L <= chat.max_context
        assert_close(chat.last.scores[:, 0], logits, "after dropping turns")
    texts = [m["text"] for m in chat.messages if m["role"] == "user"]
    assert texts[0].startswith("<Img><ImageHere></Img>") and texts[-1] == questions[-1]
    assert questions[0] not in texts  # the oldest exchange without the image went first
    assert "will not see" not in capsys.readouterr().err  # dropped whole turns, no left cut


def test_first_turn_is_the_original_prompt(model, ref_dir):
    """ChatTemplate.first_turn (MiniGPT4.answer, bench) and Chat's first context both give the original's prompt."""
    ref, js = load_reference(ref_dir, model.cfg.variant)
    prompt = js["chat"][0]["prompt"]
    assert TEMPLATES[model.cfg.variant].first_turn(js["question"]) == prompt
    chat = Chat(model)
    chat.upload_img(ref["chat0.img_embeds"][0])
    chat.ask(js["question"])
    chat.messages.append(dict(role="assistant", text=None, images=[], ids=None))  # what answer() adds first
    items = chat.items()
    assert "".join(p if isinstance(p, str) else "<ImageHere>" for p in items) == prompt


def test_chat_left_cut_keeps_newest_tokens(model, ref_dir, capsys):
    """A context that no image-free turn can shorten is cut at its start, never to nothing; an answer longer
    than the cap is refused."""
    ref, js = load_reference(ref_dir, model.cfg.variant)
    chat = Chat(model, **greedy(max_new_tokens=6))
    chat.upload_img(ref["chat0.img_embeds"][0])
    chat.ask(js["question"])
    full = chat.context_embeds()
    chat.max_context = full.shape[1] // 2
    assert torch.equal(chat.fit(6), full[:, -(chat.max_context - 6):])
    assert torch.equal(chat.fit(chat.max_context + 5), full[:, -1:])  # the newest token at least
    assert "will not see its start" in capsys.readouterr().err
    fed = []
    orig = model.generate
    model.generate = lambda emb, **kw: fed.append(emb) or orig(emb, **kw)
    try:
        chat.answer()
    finally:
        del model.generate
    chat.messages[-1]["ids"] = None
    assert torch.equal(fed[0], chat.context_embeds()[:, -(chat.max_context - 6):])
    with pytest.raises(ValueError, match=f"max_new_tokens {chat.max_context} must be < the context cap"):
        chat.answer(max_new_tokens=chat.max_context)


def test_batch_matches_each_alone(model, ref_dir):
    ref, js = load_reference(ref_dir, model.cfg.variant)
    img = torch.cat([ref["chat0.img_embeds"], ref["chat1.img_embeds"]])
    questions = ["What is in this image?", "Describe the picture in a few words, please."]
    alone = [model.answer(img[i:i + 1], [questions[i]], **greedy(max_new_tokens=10))[0] for i in range(2)]
    assert model.answer(img, questions, **greedy(max_new_tokens=10)) == alone
    # scores row by row, and a stop string that ends row 0 early while row 1 goes on
    ctx = [model.splice(js["chat"][i]["prompt"].replace(js["question"], q), [img[i]])[0]
           for i, q in enumerate(questions)]
    solo = [model.generate(c[None], **greedy(max_new_tokens=10, return_scores=True)) for c in ctx]
    stop = model.tokenizer.decode(solo[0].ids[0, :3].tolist())[-2:]
    assert stop not in model.tokenizer.decode(solo[1].ids[0].tolist())
    T = max(len(c) for c in ctx)
    emb = torch.zeros(2, T, ctx[0].shape[1])
    mask = torch.zeros(2, T, dtype=torch.bool)
    for i, c in enumerate(ctx):
        emb[i, :len(c)], mask[i, :len(c)] = c, True
    batch = model.generate(emb, mask, **greedy(max_new_tokens=10, return_scores=True))
    for i in range(2):
        assert batch.ids[i, :batch.lengths[i]].tolist() == solo[i].ids[0].tolist()
        assert_close(batch.scores[:batch.lengths[i], i], solo[i].scores[:, 0], f"row {i}")
    stopped = model.generate(emb, mask, **dict(greedy(max_new_tokens=10), stop=(stop,)))
    assert stopped.lengths[0] <= 3 and stopped.lengths[1] == 10


def test_generate_default_beam_path_uses_bos_start(ref_dir, monkeypatch):
    """MiniGPT4.generate (original=True) hands beam_search the [bos] start, sampling options and top-k 50."""
    import model as M
    m, got = load(ref_dir), {}
    monkeypatch.setattr(M, "beam_search", lambda *a: got.update(args=a))
    emb = load_reference(ref_dir, "vicuna0")[0]["chat0.context_embeds"]
    m.generate(emb, num_beams=3, length_penalty=0.5, temperature=0.7)
    llm, _, _, K, n, rp, lp, start, tok, stop, do_sample, temp, top_k, top_p, _ = got["args"]
    assert start.tolist() == [[m.tokenizer.bos_id]] and (K, lp, do_sample, temp, top_k, top_p) == (3, 0.5, True, 0.7, 50, 0.9)


def test_projection_size_mismatch(ref_dir, tmp_path):
    m = load(ref_dir)
    D, H = m.llama_proj.weight.shape
    bad = tmp_path / "pretrained_minigpt4.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(D + 16, H), "llama_proj.bias": torch.zeros(D + 16)}}, bad)
    with pytest.raises(CheckpointError, match=f"projection outputs {D + 16}.*LLM is {D} wide"):
        m.load_projection(bad)
    with pytest.raises(CheckpointError, match="projection takes .*Llama-2"):
        m.load_projection(ref_dir / "minigpt4_llama2_proj.pth")
    with pytest.raises(CheckpointError, match="Vicuna"):
        load(ref_dir, "llama2-7b").load_projection(ref_dir / "minigpt4_proj.pth")
    msg = str(pytest.raises(CheckpointError, MiniGPT4.from_pretrained, ref_dir, "vicuna-7b", proj=bad).value)
    assert "projection outputs" in msg and str(bad) in msg


def test_missing_weights_lists_every_file(tmp_path):
    with pytest.raises(MissingWeights) as e:
        find_weights(tmp_path, "vicuna-13b")
    msg = str(e.value)
    for part in ["eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "vicuna-13b", "pretrained_minigpt4.pth",
                 "storage.googleapis.com", "huggingface.co/Vision-CAIR/vicuna"]:
        assert part in msg


def test_find_weights_bad_folder_or_preset(ref_dir, tmp_path):
    afile = tmp_path / "weights.pth"
    afile.write_bytes(b"")
    with pytest.raises(MissingWeights, match=f"^--weights {afile}: not a folder$"):
        find_weights(afile, "vicuna-7b")
    with pytest.raises(ValueError, match="'tiny' has no release weights"):  # a config preset for tests only
        find_weights(ref_dir, "tiny")


def link_fixture(ref_dir, tmp_path, names):
    for name in names:
        (tmp_path / name).symlink_to(ref_dir / name)


def test_find_weights_never_pairs_the_wrong_release(ref_dir, tmp_path):
    """A 7B folder holding the 13B release names or a Llama-2 LLM must not load them for vicuna-7b."""
    link_fixture(ref_dir, tmp_path, ["eva_vit_g.pth", "blip2_pretrained.pth"])
    (tmp_path / "prerained_minigpt4_7b.pth").symlink_to(ref_dir / "minigpt4_proj.pth")
    (tmp_path / "Llama-2-7b-chat-hf").symlink_to(ref_dir / "llama")
    with pytest.raises(MissingWeights, match="llm: .*vicuna-7b/") as e:
        find_weights(tmp_path, "vicuna-7b")
    assert "Llama-2" not in str(e.value)
    (tmp_path / "vicuna").symlink_to(ref_dir / "llama")  # the 13B repo's name
    (tmp_path / "pretrained_minigpt4.pth").symlink_to(ref_dir / "minigpt4_proj.pth")  # the 13B projection
    with pytest.raises(MissingWeights, match="llm: .*vicuna-7b/"):
        find_weights(tmp_path, "vicuna-7b")
    (tmp_path / "prerained_minigpt4_7b.pth").unlink()
    assert "proj" in str(pytest.raises(MissingWeights, find_weights, tmp_path, "vicuna-7b", llm=ref_dir / "llama").value)
    assert find_weights(tmp_path, "vicuna-13b")["llm"] == str(tmp_path / "vicuna")


def test_llama2_needs_no_blip2_file(ref_dir, tmp_path):
    link_fixture(ref_dir, tmp_path, ["config.json", "eva_vit_g.pth", "minigpt4_llama2_proj.pth", "llama"])
    paths = find_weights(tmp_path, "llama2-7b")
    assert paths["qformer"] is None and paths["llm"] == str(tmp_path / "llama")
    m = MiniGPT4.from_pretrained(tmp_path, "llama2")
    assert torch.equal(m.llama_proj.weight, load(ref_dir, "llama2-7b").llama_proj.weight)


def test_fresh_projection(ref_dir, tmp_path):
    """proj=False: no projection file needed, nn.Linear's default init from the torch seed, fp32."""
    link_fixture(ref_dir, tmp_path, ["config.json", "eva_vit_g.pth", "blip2_pretrained.pth", "llama"])  # no proj
    torch.manual_seed(0)
    m = MiniGPT4.from_pretrained(tmp_path, "vicuna-7b", proj=False, dtype=torch.bfloat16)
    D, H = m.llama_proj.weight.shape
    torch.manual_seed(0)
    expect = torch.nn.Linear(H, D)
    assert m.llama_proj.weight.dtype == torch.float32 and m.llama_model.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(m.llama_proj.weight, expect.weight) and torch.equal(m.llama_proj.bias, expect.bias)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"llama_proj.weight", "llama_proj.bias"}
    with pytest.raises(MissingWeights, match="proj"):
        MiniGPT4.from_pretrained(tmp_path, "vicuna-7b")  # None still means "the file in the folder"


def test_checkpoint_layout_and_round_trip(model, ref_dir, tmp_path):
    name = "minigpt4_proj.pth" if model.cfg.variant == "vicuna0" else "minigpt4_llama2_proj.pth"
    original = torch.load(ref_dir / name, weights_only=True)
    path = tmp_path / "checkpoint_4.pth"
    torch.save({"model": model.trainable_state_dict(), "optimizer": {}, "epoch": 4}, path)  # as train.py saves
    ours = torch.load(path, weights_only=True)
    assert set(ours) == {"model", "optimizer", "epoch"}
    assert {k: (tuple(v.shape), v.dtype) for k, v in ours["model"].items()} == \
           {k: (tuple(v.shape), v.dtype) for k, v in original["model"].items()}
    other = MiniGPT4.from_pretrained(ref_dir, "vicuna-7b" if model.cfg.variant == "vicuna0" else "llama2-7b",
                                     proj=path)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[k], v) and torch.equal(original["model"][k], v)


def test_gradient_reaches_llama_proj_only(ref_dir):
    m = load(ref_dir, "llama2-7b")
    ref, js = load_reference(ref_dir, "vicuna0")
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {"llama_proj.weight", "llama_proj.bias"}
    m.zero_grad(set_to_none=True)
    m(ref["pixel_values"], js["captions"], ["<Img><ImageHere></Img> Describe it.", "<Img><ImageHere></Img> Hi"]).backward()
    assert m.llama_proj.weight.grad.abs().sum() > 0 and m.llama_proj.bias.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in m.named_parameters() if n not in trainable)
    m.zero_grad(set_to_none=True)


def test_build_inputs_batch_equals_rows_alone(model, ref_dir, ref_config):
    """Per-sample prompts of different lengths: each row of the batch is that sample built alone, then padded
    (pad embedding, mask 0, label -100) to the longest prompt + the longest text."""
    ref, js = load_reference(ref_dir, model.cfg.variant)
    img, texts = ref["img_embeds"], [js["captions"][0], js["captions"][1] + " and a much longer tail of words"]
    prompts = [ref_config["stage2_instruction"], "<Img><ImageHere></Img> Hi"]
    emb, mask, labels = model.build_inputs(img, texts, prompts)
    pad = model.embed([model.pad_id])[0, 0]
    for b in range(2):
        e, m, lab = model.build_inputs(img[b:b + 1], texts[b:b + 1], prompts[b:b + 1])
        n = e.shape[1]
        assert_close(emb[b, :n], e[0], f"row {b}")
        assert mask[b, :n].tolist() == m[0].tolist() and labels[b, :n].tolist() == lab[0].tolist()
        assert (emb[b, n:] == pad).all() and not mask[b, n:].any() and (labels[b, n:] == -100).all()
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        model.build_inputs(img, texts, prompts[:1])


def test_lm_loss_runs_the_lm_head_at_targets_only(model, ref_dir, ref_config):
    """lm_loss == HF's shifted cross-entropy over the full (B, T, V) logits, which it never computes."""
    ref, js = load_reference(ref_dir, model.cfg.variant)
    emb, mask, labels = model.build_inputs(ref["img_embeds"], js["captions"], ref_config["stage2_instruction"])
    rows = []
    hook = model.llama_model.lm_head.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
    try:
        loss, logits = model.lm_loss(emb, mask, labels)
    finally:
        hook.remove()
    full = model.llama_model(embeds=emb, mask=mask)  # (B, T, V)
    target = labels[:, 1:] != -100
    assert rows == [int(target.sum())] and 0 < rows[0] < mask.numel()
    assert_close(logits, full[:, :-1][target], "target logits")
    expect = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert_close(loss, expect, "loss")


# ------------------------------------------------------------------------------------- Table 5's ablations
ABLATIONS = {  # switches -> the parameters that must be trained (prefixes)
    "paper": (dict(), ("llama_proj.weight", "llama_proj.bias")),
    "no_qformer": (dict(no_qformer=True), ("llama_proj.weight", "llama_proj.bias")),
    "proj_layers_3": (dict(proj_layers=3), tuple(f"llama_proj.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias"))),
    "train_qformer": (dict(train_qformer=True), ("llama_proj.weight", "llama_proj.bias", "Qformer.")),
}


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_gradients_reach_exactly_the_trained_parameters(ref_dir, name):
    """Each switch trains what Table 5 says: every trained parameter gets a non-zero gradient, no other one
    any gradient (no_qformer: the projection takes 4 grouped ViT tokens; 3 layers: Linear-GELU-Linear-GELU-Linear)."""
    switches, trained = ABLATIONS[name]
    torch.manual_seed(0)
    m = MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=False, ablation=switches)
    assert m.ablation == {"no_qformer": False, "proj_layers": 1, "train_qformer": False, **switches}
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(trained) for n in names)
    assert all(any(n.startswith(t) for n in names) for t in trained)
    if switches.get("train_qformer"):
        assert names >= {"Qformer.query_tokens"} | {n for n, _ in m.named_parameters() if n.startswith("Qformer.")}
    if switches.get("no_qformer"):
        assert m.Qformer is None and m.llama_proj.in_features == 4 * m.cfg.vit.width
    if switches.get("proj_layers"):
        assert [type(x).__name__ for x in m.llama_proj] == ["Linear", "GELU", "Linear", "GELU", "Linear"]
    ref, js = load_reference(ref_dir, "vicuna0")
    m(ref["pixel_values"], js["captions"]).backward()
    for n, p in m.named_parameters():
        if n in names:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


@pytest.mark.parametrize("name", [n for n in ABLATIONS if n != "paper"])
def test_ablation_checkpoint_records_itself_and_round_trips(ref_dir, tmp_path, name):
    """A train.py-style checkpoint of an ablated model loads as that ablation without being told (sample.py's
    path), with the same weights and image embeddings; asking for other switches is one clear error."""
    switches, _ = ABLATIONS[name]
    torch.manual_seed(1)
    m = MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=False, ablation=switches)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)  # "trained": differs from any fresh init or the fixture
    path = tmp_path / "ckpt.pth"
    torch.save({"model": m.trainable_state_dict(), "ablation": m.ablation, "optimizer": {}}, path)
    other = MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=str(path))
    assert other.ablation == m.ablation
    assert other.trainable_state_dict().keys() == m.trainable_state_dict().keys()
    assert all(torch.equal(v, other.trainable_state_dict()[k]) for k, v in m.trainable_state_dict().items())
    pixels = load_reference(ref_dir, "vicuna0")[0]["pixel_values"]
    with torch.no_grad():
        assert torch.equal(m.encode_img(pixels)[0], other.encode_img(pixels)[0])
    with pytest.raises(CheckpointError, match="give the switches it was trained with"):
        MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=str(path), ablation={k: not v if isinstance(v, bool)
                                                                                else 1 for k, v in switches.items()})
    with pytest.raises(CheckpointError, match=r"expected exactly the keys|projection takes \d+-wide"):  # into the paper's
        load(ref_dir).load_projection(path)


def test_ablation_switch_errors(ref_dir, tmp_path):
    with pytest.raises(ValueError, match="--train_qformer needs a Q-Former"):
        MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=False, ablation=dict(no_qformer=True, train_qformer=True))
    with pytest.raises(ValueError, match="--proj_layers must be >= 1"):
        MiniGPT4.from_pretrained(ref_dir, "vicuna-7b", proj=False, ablation=dict(proj_layers=0))
    link_fixture(ref_dir, tmp_path, ["config.json", "eva_vit_g.pth", "llama"])  # no BLIP-2 file: not needed
    assert MiniGPT4.from_pretrained(tmp_path, "vicuna-7b", proj=False, ablation=dict(no_qformer=True)).Qformer is None
