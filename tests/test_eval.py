"""metrics.py on hand-made cases with known answers (VQA normalisation and scores, a CHAIR case worked by hand,
the judge's yes/no parsing), the OpenAI-compatible judge client against a stub server on 127.0.0.1, and each
eval.py command end to end on the tiny fixture model."""
import http.server
import json
import threading

import pytest

import eval as E
import metrics as M
from conftest import IMAGES, REFERENCE_DIRS

TINY = REFERENCE_DIRS[0]


@pytest.mark.parametrize("raw,norm", [
    ("Yes", "yes"), ("yes.", "yes"), ("The Two dogs!", "2 dogs"), ("an apple", "apple"), ("none", "0"),
    ("1,000", "1000"), ("3.5", "3.5"), ("dont", "don't"), ("t-shirt", "t shirt"), ("  Red \n", "red"),
    ("ten", "10"), ("left - top", "left top"), ("2.", "2"), ("Mr. Smith", "mr smith")])
def test_vqa_normalisation(raw, norm):
    assert M.normalize_answer(raw) == norm


def test_vqa_scores():
    ten = ["two"] * 2 + ["3"] * 5 + ["four"] * 3  # AOK-VQA style: 10 direct answers
    assert M.vqa_score("2", ten) == pytest.approx(2 / 3)  # 2 humans agree: 2/3
    assert M.vqa_score("Three", ten) == 1.0 and M.vqa_score("4", ten) == 1.0  # >= 3 agree: full credit
    assert M.vqa_score("five", ten) == 0.0
    assert M.vqa_score("The circle.", ["circle"]) == 1.0 and M.vqa_score("circles", "circle") == 0.0  # GQA: exact
    res = M.vqa_accuracy([{"prediction": "red", "answers": ["red"], "type": "colour"},
                          {"prediction": "blue", "answers": ["red"], "type": "colour"},
                          {"prediction": "2", "answers": ["two"], "type": "count"}])
    assert res["accuracy"] == pytest.approx(2 / 3) and res["n"] == 3
    assert res["per_type"] == {"colour": {"accuracy": 0.5, "n": 2}, "count": {"accuracy": 1.0, "n": 1}}
    with pytest.raises(ValueError, match="without reference answers"):
        M.vqa_score("x", [])


def test_chair_by_hand():
    """Worked by hand. Caption 1 (truth: person, dog): mentions man->person, dogs->dog, frisbee (hallucinated),
    hot dog (hallucinated; not a dog). Caption 2 (truth: cat): kitten->cat, cat->cat (a repeat counts).
    Caption 3 (truth: toilet): toilet; 'seat' is not a chair next to a toilet; baby elephant -> elephant
    (hallucinated; 'baby' is not a person). Mentions 4 + 2 + 2 = 8, hallucinated 2 + 0 + 1 = 3:
    CHAIR_i = 3/8; captions with a hallucination 2 of 3: CHAIR_s = 2/3; words (12 + 6 + 8) / 3."""
    vocab = M.load_vocab("coco")
    caps = ["A man throws a frisbee to two dogs, eating a hot dog.",  # 12 words
            "A kitten sleeps. The cat dreams.",  # 6
            "A toilet seat and a baby elephant nearby."]  # 8
    res = M.chair(caps, [["person", "dog"], ["cat"], ["toilet"]], vocab)
    assert (res["mentions"], res["hallucinated"]) == (8, 3)
    assert res["chair_i"] == pytest.approx(3 / 8) and res["chair_s"] == pytest.approx(2 / 3)
    assert res["avg_len"] == pytest.approx((12 + 6 + 8) / 3)
    assert [c for _, c in res["details"][0]["hallucinated"]] == ["frisbee", "hot dog"]
    assert [c for _, c in res["details"][2]["hallucinated"]] == ["elephant"]


def test_chair_shapes_vocabulary_and_truth_phrases():
    """Ground truth given as phrases ('small red circle') maps through the same table; plurals and synonyms."""
    vocab = M.load_vocab("shapes")
    res = M.chair(["Two red circles and a blue star on white.", "A green oval and a square."],
                  [["small red circle", "big red circle", "blue star"], ["green ellipse"]], vocab)
    assert (res["mentions"], res["hallucinated"], res["chair_s"]) == (4, 1, 0.5)  # the square is invented
    with pytest.raises(ValueError, match="not a readable synonym table"):
        M.load_vocab("no_such_table.json")


def test_synonym_tables_have_no_word_twice():
    for name, n in (("coco", 80), ("shapes", None)):
        table = json.loads(open(f"{M.ASSETS}/{name}_synonyms.json").read())
        cats = [c for c in table if not c.startswith("_")]
        words = [w for c in cats for w in {c, *table[c]}]
        assert len(words) == len(set(words)) and (n is None or len(cats) == n)


@pytest.mark.parametrize("reply,verdict", [
    ("Yes", True), ("yes.", True), ("**No**, it misses the dog.", False), ("Answer: YES", True),
    ("No. Yes would be wrong.", False), ("It does not say.", None), ("", None), ("Nope", None)])
def test_judge_parsing(reply, verdict):
    assert M.parse_yes_no(reply) is verdict


def test_coverage_rate_counts_unparsed_as_failures():
    assert M.coverage([True, False, None, True]) == {"success_rate": 0.5, "n": 4, "unparsed": 1}


# ----------------------------------------------------------------------------------- the HTTP judge client
class Stub(http.server.BaseHTTPRequestHandler):
    requests, reply, status = [], {"choices": [{"message": {"content": "Yes, it covers them."}}]}, 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Stub.requests.append((self.path, dict(self.headers), body))
        data = json.dumps(Stub.reply).encode()
        self.send_response(Stub.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture
def stub():
    server = http.server.HTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Stub.requests.clear()
    Stub.reply, Stub.status = {"choices": [{"message": {"content": "Yes, it covers them."}}]}, 200
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()
    server.server_close()


def test_http_judge_against_stub(stub, monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    judge = E.HTTPJudge(stub, "judge-model", key_env="MY_KEY")
    prompt = M.COVERAGE_PROMPT.format(reference="a dog", generated="a dog on grass")
    assert judge(prompt) == "Yes, it covers them."
    path, headers, body = Stub.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-test"
    assert body["model"] == "judge-model" and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": prompt}]
    Stub.status = 500
    with pytest.raises(ValueError, match=r"HTTP 500"):
        judge("x")
    Stub.status, Stub.reply = 200, {"unexpected": 1}
    with pytest.raises(ValueError, match="not an OpenAI-style chat completion reply"):
        judge("x")
    with pytest.raises(ValueError, match="unreachable"):
        E.HTTPJudge("http://127.0.0.1:9/v1", "m", timeout=2)("x")


# ------------------------------------------------------------------------- the commands on the tiny model
@pytest.fixture(scope="module")
def tiny():
    from model import MiniGPT4
    return MiniGPT4.from_pretrained(TINY, "vicuna-7b")


def write(tmp_path, items):
    for name in ("cat.jpg", "coffee.jpg"):
        (tmp_path / name).write_bytes((IMAGES / name).read_bytes())
    (tmp_path / "data.json").write_text(json.dumps(items))
    return str(tmp_path / "data.json")


def args(tmp_path, *argv):
    return E.parse_args([*argv, "--weights", str(TINY), "--device", "cpu", "--max-new-tokens", "4",
                         "--out", str(tmp_path / "out.json")])


def test_vqa_command(tiny, tmp_path):
    data = write(tmp_path, [{"image": "cat.jpg", "question": "What animal?", "answers": ["cat"] * 3, "type": "a"},
                            {"image": "coffee.jpg", "question": "What drink?", "answer": "coffee", "type": "b"}])
    res, text = E.evaluate(args(tmp_path, "vqa", "--data", data), tiny)
    assert [it["score"] for it in res["items"]] == [M.vqa_score(it["prediction"], it["answers"]) for it in res["items"]]
    assert res["n"] == 2 and set(res["per_type"]) == {"a", "b"} and "accuracy" in text
    assert json.loads((tmp_path / "out.json").read_text())["n"] == 2
    assert res["model"]["ablation"] == tiny.ablation


def test_chair_command_both_prompts(tiny, tmp_path):
    data = write(tmp_path, [{"image": "cat.jpg", "objects": ["cat"]}, {"image": "coffee.jpg", "objects": ["cup"]}])
    res, text = E.evaluate(args(tmp_path, "chair", "--data", data), tiny)
    for name in ("long", "short"):
        again = M.chair(res[name]["captions"], [["cat"], ["cup"]], M.load_vocab("coco"))
        assert res[name]["chair_i"] == again["chair_i"] and res[name]["n"] == 2
    assert "CHAIR_i" in text and "short" in text


def test_coverage_command_with_stub_and_local_judge(tiny, tmp_path, stub):
    data = write(tmp_path, [{"image": "cat.jpg", "caption": "a cat"}, {"image": "coffee.jpg", "caption": "a cup"}])
    res, _ = E.evaluate(args(tmp_path, "coverage", "--data", data, "--judge-url", stub), tiny)
    assert res["success_rate"] == 1.0 and len(Stub.requests) == 2
    assert "Ground-truth caption: a cat" in Stub.requests[0][2]["messages"][0]["content"]
    res, _ = E.evaluate(args(tmp_path, "coverage", "--data", data), tiny)  # the model's own LLM judges
    assert res["n"] == 2 and res["success_rate"] == M.coverage([it["covered"] for it in res["items"]])["success_rate"]


def test_shapes_eval_json_layout(tiny, tmp_path):
    """shapes.py's eval.json: {"images": [{image, objects: [{shape, colour, size, place}]}], "questions": [...]}."""
    shapes = {"images": [{"image": "cat.jpg", "objects": [{"shape": "circle", "colour": "red", "size": "small",
                                                            "place": "top left"}], "background": "white"}],
              "questions": [{"image": "cat.jpg", "type": "colour", "question": "What colour is the circle?",
                             "answer": "red"}]}
    data = write(tmp_path, [])
    (tmp_path / "data.json").write_text(json.dumps(shapes))
    res, _ = E.evaluate(args(tmp_path, "vqa", "--data", data), tiny)
    assert res["n"] == 1 and list(res["per_type"]) == ["colour"]
    res, _ = E.evaluate(args(tmp_path, "chair", "--data", data, "--vocab", "shapes"), tiny)
    assert res["long"]["n"] == 1


def test_local_judge_from_an_llm_folder(tmp_path):
    """--judge-llm: the project's LLM loading; greedy, so the same prompt gets the same reply."""
    judge = E.make_judge(E.parse_args(["coverage", "--data", "x.json", "--judge-llm", str(TINY / "llama")]), None)
    prompt = M.COVERAGE_PROMPT.format(reference="a cat", generated="a cat on a mat")
    assert isinstance(judge(prompt), str) and judge(prompt) == judge(prompt)


@pytest.mark.parametrize("page", ["tasks.md", "tasks.html"])
def test_advanced_page(tiny, tmp_path, page):
    folder = tmp_path / "imgs"
    folder.mkdir()
    write(folder, [])
    res, _ = E.evaluate(args(tmp_path, "advanced", "--images", str(folder), "--page", str(tmp_path / page)), tiny)
    text = (tmp_path / page).read_text()
    assert len(res["items"]) == 8 and all(q in text for q in E.ADVANCED)
    assert text.count("cat.jpg") == 4 and text.count("☐" if page.endswith(".md") else "&#9744;") == 8


def test_bad_input_one_line(tmp_path, capsys):
    rc = E.main(["vqa", "--data", str(tmp_path / "missing.json"), "--weights", str(TINY), "--device", "cpu"])
    assert rc == 1 and capsys.readouterr().err.startswith("error: --data")
    data = write(tmp_path, [{"image": "nope.jpg", "question": "q", "answers": ["a"]}])
    assert E.main(["vqa", "--data", data, "--weights", str(TINY), "--device", "cpu"]) == 1
    assert "nope.jpg not found" in capsys.readouterr().err
