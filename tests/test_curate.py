"""curate.py: each filter rule on hand-made texts, the continue decision at the 80-token boundary, batched
describe+continue equal to one sample.Chat per image, the fixers (local LLM; HTTP client against a stub server
on 127.0.0.1), the whole pipeline on the tiny fixture model (loadable by data.AlignDataset), and resume."""
import http.server
import json
import shutil
import threading

import pytest
import torch

import curate
from conftest import IMAGES, REFERENCE_DIRS

GOOD = ("The image shows a large brown dog sitting on a green lawn in front of a white wooden house. The sky is "
        "clear and blue, and a red ball lies near the dog's front paws while two trees stand on the left side.")
GREEDY = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's decode steps are ~10 ms on one thread, and can be 20x slower with 2 on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model():
    from model import MiniGPT4
    return MiniGPT4.from_pretrained(REFERENCE_DIRS[0], "vicuna-7b")


@pytest.fixture
def images(tmp_path):
    """Five images: the fixture photos (JPEG) and the reference PNGs (re-encoded on output)."""
    d = tmp_path / "images"
    d.mkdir()
    for p in [*sorted(IMAGES.glob("*.jpg"))[:3], *sorted(REFERENCE_DIRS[0].glob("image*.png"))]:
        shutil.copy(p, d / p.name)
    return d


def pixels(model, paths):
    from data import preprocess
    return torch.stack([preprocess(str(p), size=model.cfg.vit.img_size) for p in paths])


# ------------------------------------------------------------------------------------------------ filter
def test_good_paragraph_is_kept():
    assert curate.drop_reason(GOOD) is None
    assert curate.repeated_fraction(GOOD) == 0.0


def test_too_short():
    assert curate.drop_reason("A dog on a lawn.") == "too_short"
    assert curate.drop_reason("A dog on a lawn.", min_words=3) is None


@pytest.mark.parametrize("apology", ["I'm sorry, but I cannot see the image.", "I apologize for the confusion.",
                                     "As an AI language model I describe images."])
def test_apology(apology):
    assert curate.drop_reason(GOOD + " " + apology) == "apology"


def test_repeated_ngrams():
    # "a b c a b c": trigrams abc, bca, cab, abc -> one of four repeats an earlier one
    assert curate.repeated_fraction("a b c a b c") == pytest.approx(0.25)
    looped = GOOD + " The sky is clear and blue." * 4
    assert curate.repeated_fraction(looped) > curate.MAX_REPEATED
    assert curate.drop_reason(looped) == "repetition"
    assert curate.drop_reason(looped, max_repeated=1.0) is None


@pytest.mark.parametrize("noise", ["这是一只狗，它坐在草地上。", "\ufffd", "<ImageHere>###{}[]~~~",
                                   "xkcd bgrfq zzvtn prqmt sdfgh", "showsdsXivra prompTrai eleCtrQua thatUron"])
def test_non_english_or_meaningless(noise):
    assert curate.drop_reason(GOOD + " " + noise) == "non_english"


def test_a_rare_odd_word_is_not_meaningless():
    assert curate.drop_reason(GOOD + " An iPhone lies in the grass.") is None  # 1 odd word in 34: under 10%
    curly = GOOD.replace("'", "’") + " “Typographic” quotes – and dashes — are prose."
    assert curate.drop_reason(curly) is None


# ---------------------------------------------------------------------------------------------- continue
def test_continue_decision_at_80_tokens(model):
    tok = model.tokenizer
    assert curate.needs_continue(79) and not curate.needs_continue(80)
    text = " ".join(["dog"] * 200)
    ids = tok.encode(text)
    assert curate.count_tokens(tok, text) == len(ids)
    cut = next(n for n in range(len(ids)) if len(tok.encode(tok.decode(ids[:n]))) == 80)  # exactly 80 tokens
    assert curate.count_tokens(tok, tok.decode(ids[:cut])) == 80
    assert not curate.needs_continue(curate.count_tokens(tok, tok.decode(ids[:cut])))
    assert curate.needs_continue(curate.count_tokens(tok, tok.decode(ids[:cut - 1])))


@pytest.mark.parametrize("sep,answer,expected", [("###", "a dog###", ""), ("###", "a dog", "###"), ("", "a dog", ""),
                                                  ("<|im_end|>\n", "a dog<|im_end|>", "\n"),
                                                  ("<|im_end|>\n", "a dog", "<|im_end|>\n")])
def test_closing_separator_before_the_continue_turn(sep, answer, expected):
    assert curate.closing(sep, answer) == expected


def test_describe_continues_below_the_boundary_only(model):
    px = pixels(model, sorted(IMAGES.glob("*.jpg"))[:2])
    n = [r["tokens"] for r in curate.describe(model, px, min_tokens=0, **GREEDY)]
    at = curate.describe(model, px, min_tokens=n[0], **GREEDY)  # row 0 has exactly min_tokens: no continue
    above = curate.describe(model, px, min_tokens=n[0] + 1, **GREEDY)  # one short: continue
    assert at[0]["second"] is None and at[0]["text"] == at[0]["first"]
    assert above[0]["second"] is not None and above[0]["text"] == f"{above[0]['first']} {above[0]['second']}".strip()
    assert at[0]["first"] == above[0]["first"]


def test_batched_describe_equals_one_chat_per_image(model):
    """Several images in one padded batch, rows stopping on their own (here: 2 of 3 before the 50-token cap),
    the short ones continued on the kept KV cache: the same texts as sample.Chat holding one conversation per
    image (greedy)."""
    from sample import Chat
    opts = dict(max_new_tokens=50, do_sample=False)
    paths = [sorted(IMAGES.glob("*.jpg"))[i] for i in (0, 2)] + sorted(REFERENCE_DIRS[0].glob("image1*.png"))
    px = pixels(model, paths)
    got = curate.describe(model, px, min_tokens=45, **opts)
    assert {r["second"] is None for r in got} == {True, False}  # some rows continue, some do not
    lengths = []
    for p, r in zip(px, got):
        chat = Chat(model, **opts)
        chat.upload_img(p)
        chat.ask(curate.PROMPT)
        assert chat.answer() == r["first"]
        lengths.append(int(chat.last.lengths[0]))
        if r["tokens"] < 45:
            chat.ask(curate.CONTINUE)
            assert chat.answer() == r["second"]
    assert lengths[0] == 50 and max(lengths[1:]) < 50  # the batch held rows that stopped on their own


# -------------------------------------------------------------------------------------------------- fixers
@pytest.mark.parametrize("template", ["vicuna0", "llama2"])
def test_local_fixer_batched_equals_one_by_one(model, template):
    fixer = curate.LocalFixer(model.llama_model, model.tokenizer, template, max_new_tokens=10)
    texts = [GOOD, "a dog dog dog", "The cat sits."]
    batched = fixer(texts)
    assert batched == [fixer([t])[0] for t in texts] and all(isinstance(t, str) for t in batched)
    with pytest.raises(ValueError, match="fix template 'nope'"):
        curate.LocalFixer(model.llama_model, model.tokenizer, "nope")


class Stub(http.server.BaseHTTPRequestHandler):
    requests, status, reply = [], 200, None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.requests.append((self.path, dict(self.headers), body))
        text = body["messages"][-1]["content"].split("\n\n", 1)[1]
        reply = Stub.reply or json.dumps({"choices": [{"message": {"role": "assistant",
                                                                   "content": f" FIXED {text.upper()} "}}]})
        self.send_response(Stub.status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Stub.requests, Stub.status, Stub.reply = [], 200, None
    srv = http.server.HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_http_fixer_against_stub_server(server):
    fixer = curate.HTTPFixer(server + "/", model="stub-llm", api_key="k123")
    assert fixer(["a dog.", "a cat."]) == ["FIXED A DOG.", "FIXED A CAT."]
    path, headers, body = Stub.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k123"
    assert body["model"] == "stub-llm" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": curate.FIX_PROMPT + "\n\na dog."}]


@pytest.mark.parametrize("status,reply,message", [(500, "{}", "HTTP 500"), (200, "not json", "not an OpenAI"),
                                                  (200, '{"choices": []}', "not an OpenAI")])
def test_http_fixer_errors_are_one_line(server, status, reply, message):
    Stub.status, Stub.reply = status, reply
    with pytest.raises(curate.FixerError, match=message) as e:
        curate.HTTPFixer(server)(["a dog."])
    assert "\n" not in str(e.value)


def test_http_fixer_unreachable():
    with pytest.raises(curate.FixerError, match="cannot reach"):
        curate.HTTPFixer("http://127.0.0.1:9/v1", timeout=5)(["a dog."])


# ------------------------------------------------------------------------------------------------ pipeline
def fake_fixer(texts):
    """Deterministic 'fixes': GOOD for most texts, an apology for the ones starting like an odd row."""
    return [GOOD if len(t) % 3 else "I'm sorry, I cannot describe this image in any detail at all today." for t in texts]


def test_pipeline_writes_a_stage2_set(model, images, tmp_path):
    from data import AlignDataset, collate
    out = tmp_path / "align"
    counts = curate.curate(images, out, model, fake_fixer, batch_size=2, log=lambda m: None, **GREEDY)
    state = curate.State(out / curate.STATE)
    described = state.done["describe"]
    expected_kept = [k for k, r in described.items() if len(r["text"]) % 3]
    assert counts["images"] == counts["described"] == counts["fixed"] == 5 and counts["unreadable"] == 0
    assert counts["kept"] == len(expected_kept) and counts.get("dropped_apology", 0) == 5 - len(expected_kept)
    assert counts["continued"] == sum(r["second"] is not None for r in described.values())
    anns = json.loads((out / "filter_cap.json").read_text())["annotations"]
    assert sorted(a["image_id"] for a in anns) == sorted(expected_kept) and all(a["caption"] == GOOD for a in anns)
    assert sorted(p.stem for p in (out / "image").iterdir()) == sorted(expected_kept)
    ds = AlignDataset(str(out), size=model.cfg.vit.img_size)
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == 0 and batch["image"].shape == (len(anns), 3, model.cfg.vit.img_size,
                                                               model.cfg.vit.img_size)
    report = (out / "report.md").read_text()
    assert "| kept | %d |" % counts["kept"] in report and report.count("| `") == 5
    assert not list(out.glob("*.tmp"))


def test_pipeline_with_the_models_own_llm_as_fixer(model, images, tmp_path):
    fixer = curate.LocalFixer(model.llama_model, model.tokenizer, max_new_tokens=8)
    counts = curate.curate(images, tmp_path / "a", model, fixer, batch_size=5, min_words=1, log=lambda m: None,
                           **GREEDY)
    assert counts["fixed"] == 5 and counts["kept"] + sum(v for k, v in counts.items() if k.startswith("dropped_")) == 5
    assert len(json.loads((tmp_path / "a" / "filter_cap.json").read_text())["annotations"]) == counts["kept"]


def test_resume_after_interruption_redoes_nothing(model, images, tmp_path, monkeypatch):
    out, seen, fixed = tmp_path / "align", [], []
    real = curate.describe

    def crashing(model, px, *a, **kw):
        if seen:  # the second batch dies mid-run
            raise KeyboardInterrupt
        seen.append(len(px))
        return real(model, px, *a, **kw)

    monkeypatch.setattr(curate, "describe", crashing)
    with pytest.raises(KeyboardInterrupt):
        curate.curate(images, out, model, fake_fixer, batch_size=2, log=lambda m: None, **GREEDY)
    assert not (out / "filter_cap.json").exists() and not (out / "report.md").exists()
    with open(out / curate.STATE, "a") as f:
        f.write('{"step": "describe", "key": "torn')  # a line cut by the crash
    monkeypatch.setattr(curate, "describe", lambda model, px, *a, **kw: seen.append(len(px)) or real(model, px, *a, **kw))
    fixer = lambda texts: fixed.extend(texts) or fake_fixer(texts)  # noqa: E731
    counts = curate.curate(images, out, model, fixer, batch_size=2, log=lambda m: None, **GREEDY)
    assert seen == [2, 2, 1] and len(fixed) == 5 and counts["described"] == 5  # the first 2 images not redone
    n_fixed = len(fixed)
    curate.curate(images, out, model, fixer, batch_size=2, log=lambda m: None, **GREEDY)  # all done: nothing redone
    assert seen == [2, 2, 1] and len(fixed) == n_fixed
    lines = (out / curate.STATE).read_text().splitlines()
    assert len(lines) == 11 and all(json.loads(line) for line in lines)  # settings, 5 describe, 5 fix; no torn line
    with pytest.raises(ValueError, match="other settings"):  # a resume must not mix two different runs
        curate.curate(images, out, model, fixer, batch_size=2, log=lambda m: None, max_new_tokens=13)
    fresh = tmp_path / "fresh"
    curate.curate(images, fresh, model, fake_fixer, batch_size=5, log=lambda m: None, **GREEDY)
    assert (fresh / "filter_cap.json").read_text() == (out / "filter_cap.json").read_text()
    texts = lambda d: {k: r["text"] for k, r in curate.State(d / curate.STATE).done["describe"].items()}  # noqa
    assert texts(fresh) == texts(out)  # batches of 2 after a crash == one batch of 5 (greedy)


def test_damaged_state_file_is_one_clear_error(tmp_path):
    (tmp_path / curate.STATE).write_text('{"step": "describe", "key": "a", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not a curate.py state record"):
        curate.State(str(tmp_path / curate.STATE))


def test_cli_end_to_end_and_bad_folder(images, tmp_path, capsys):
    ref = str(REFERENCE_DIRS[0])
    rc = curate.main(["--images", str(images), "--out", str(tmp_path / "o"), "--weights", ref, "--greedy",
                      "--max-new-tokens", "8", "--fix-max-new-tokens", "8", "--min-words", "1",
                      "--fixer", ref + "/llama", "--fix-template", "llama2"])
    assert rc == 0 and (tmp_path / "o" / "filter_cap.json").is_file() and (tmp_path / "o" / "report.md").is_file()
    rc = curate.main(["--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), "--weights", ref])
    err = capsys.readouterr().err
    assert rc == 1 and err.strip().splitlines()[-1].startswith("error: --images") and "Traceback" not in err
