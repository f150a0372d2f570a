"""sample.py: one-shot answers equal the original's (reference*.json), interactive chat through stdin, and
bad input ends with one clear line and a non-zero exit (no traceback)."""
import json
import subprocess
import sys

import pytest
import torch

import sample
from conftest import ROOT

QUESTION = "What is in this image?"


def run(*args, stdin=None):
    p = subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=ROOT, input=stdin,
                       capture_output=True, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def reference_answer(ref_dir, stem):
    c = json.loads((ref_dir / f"{stem}.json").read_text())["chat"][0]
    return c["image"], c["answer_text"], c["generate_kwargs"]


def test_prompt_prints_reference_answer(ref_dir):
    image, answer, kw = reference_answer(ref_dir, "reference")
    rc, out, err = run("--image", ref_dir / image, "--weights", ref_dir, "--prompt", QUESTION, "--greedy",
                       "--max-new-tokens", kw["max_new_tokens"])
    assert rc == 0, err
    assert out == answer + "\n"


def test_prompt_llama2_variant(ref_dir, capsys):
    image, answer, kw = reference_answer(ref_dir, "reference_llama2")
    assert kw["repetition_penalty"] == 1.05  # the Llama-2 refactor's default, which sample.py keeps
    rc = sample.main(["--model", "llama2", "--image", str(ref_dir / image), "--weights", str(ref_dir),
                      "--prompt", QUESTION, "--greedy", "--max-new-tokens", str(kw["max_new_tokens"])])
    assert rc == 0
    assert capsys.readouterr().out == answer + "\n"


def test_interactive_chat_through_stdin(ref_dir):
    image, answer, _ = reference_answer(ref_dir, "reference")
    stdin = f"{QUESTION}\nAnd then?\n/reset\n/image {ref_dir / image}\n{QUESTION}\n/quit\n"
    rc, out, err = run("--image", ref_dir / image, "--weights", ref_dir, "--greedy", "--max-new-tokens", 20,
                       stdin=stdin)
    assert rc == 0, err
    lines = out.strip("\n").split("\n")
    assert len(lines) == 3 and all(lines)
    assert lines[0].strip() == answer and lines[2].strip() == answer  # a new conversation answers the same
    assert "Traceback" not in err


def test_missing_weights_one_message(tmp_path):
    (tmp_path / "eva_vit_g.pth").write_bytes(b"")  # present (content is checked later): not listed
    rc, out, err = run("--image", "assets/cat.jpg", "--weights", tmp_path, "--prompt", QUESTION)
    assert rc != 0 and out == "" and "Traceback" not in err
    assert err.startswith("error: missing weights:")
    for part in ["blip2_pretrained_flant5xxl.pth", "vicuna-7b/", "prerained_minigpt4_7b.pth", "storage.googleapis.com",
                 "huggingface.co/Vision-CAIR/vicuna-7b"]:
        assert part in err
    assert "eva_vit_g" not in err


def bad_input_cases(ref_dir, tmp_path):
    image = ref_dir / "image0_rgba.png"
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    proj = tmp_path / "proj.pth"
    w = torch.load(ref_dir / "minigpt4_proj.pth", weights_only=True)["model"]["llama_proj.weight"]
    torch.save({"model": {"llama_proj.weight": torch.zeros(2 * w.shape[0], w.shape[1]),
                          "llama_proj.bias": torch.zeros(2 * w.shape[0])}}, proj)
    return {
        "unreadable image": (["--image", broken, "--prompt", QUESTION], "cannot read image"),
        "missing image": (["--image", tmp_path / "nope.png", "--prompt", QUESTION], "nope.png"),
        "wrong projection size": (["--image", image, "--proj", proj, "--prompt", QUESTION], "projection outputs"),
        "empty prompt": (["--image", image, "--prompt", "  "], "empty prompt"),
    }


@pytest.mark.parametrize("case", ["unreadable image", "missing image", "wrong projection size", "empty prompt"])
def test_bad_input_one_clear_line(ref_dir, tmp_path, capsys, case):
    args, expect = bad_input_cases(ref_dir, tmp_path)[case]
    rc = sample.main([str(a) for a in args] + ["--weights", str(ref_dir)])
    out, err = capsys.readouterr()
    assert rc != 0 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], err


def one_error_line(capsys):
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert out == "" and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("args, expect", [
    (["--device", "foo"], "--device foo"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--num-beams", "0"], "--num-beams must be in [1, 64]"),
    (["--temperature", "0"], "--temperature must be in (0, 100]"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--device", "cuda"], "CUDA is not available"),
    (["--max-new-tokens", "2000"], "--max-new-tokens 2000 must be < --max-context 2000"),  # the default cap
    (["--max-new-tokens", "8", "--max-context", "8"], "--max-new-tokens 8 must be < --max-context 8"),
])
def test_bad_options_one_clear_line(ref_dir, capsys, args, expect):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION]
                     + args)
    assert rc != 0 and expect in one_error_line(capsys)


def test_malformed_llm_config_one_clear_line(ref_dir, tmp_path, capsys):
    for p in ref_dir.iterdir():
        if p.name != "llama":
            (tmp_path / p.name).symlink_to(p)
    (tmp_path / "llama").mkdir()
    for p in (ref_dir / "llama").iterdir():
        (tmp_path / "llama" / p.name).symlink_to(p)
    (tmp_path / "llama" / "config.json").unlink()
    (tmp_path / "llama" / "config.json").write_text("{not json")
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(tmp_path), "--prompt", QUESTION])
    assert rc != 0
    one_error_line(capsys)


def test_seed_reproduces_sampling(ref_dir, capsys):
    argv = ["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION,
            "--max-new-tokens", "8", "--seed", "3"]
    answers = [(sample.main(argv), capsys.readouterr().out)[1] for _ in range(2)]
    assert answers[0] == answers[1]
    assert sample.parse_args([]).seed is None  # default: a fresh seed each run, as the original demo


def test_interactive_commands(ref_dir, capsys, monkeypatch):
    """Unknown /commands print the help (never reach the model); /image BADPATH keeps the conversation."""
    import io
    image, answer, _ = reference_answer(ref_dir, "reference")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/help\n/image {ref_dir / 'nope.png'}\n{QUESTION}\n/quit\n"))
    asked = []
    monkeypatch.setattr(sample.Chat, "ask", lambda self, text, orig=sample.Chat.ask: asked.append(text) or orig(self, text))
    rc = sample.main(["--image", str(ref_dir / image), "--weights", str(ref_dir), "--greedy", "--max-new-tokens", "20"])
    out, err = capsys.readouterr()
    assert rc == 0 and asked == [QUESTION]
    assert err.count(sample.HELP) == 2 and "nope.png" in err and "new conversation" not in err
    assert out.strip() == answer  # the image survived the bad /image: same answer as a fresh chat about it


def test_answer_longer_than_the_llm_context(ref_dir, capsys):
    """--max-context above the LLM's context is capped there: an answer that cannot fit is one clear line."""
    n = json.loads((ref_dir / "llama" / "config.json").read_text())["max_position_embeddings"]
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION,
                      "--max-context", str(n + 2), "--max-new-tokens", str(n + 1)])
    assert rc != 0 and f"must be < the context cap {n}" in one_error_line(capsys)


def test_model_choices_and_weights_not_a_folder(ref_dir, capsys):
    argv = ["--image", str(ref_dir / "image0_rgba.png"), "--prompt", QUESTION]
    with pytest.raises(SystemExit) as e:
        sample.main(argv + ["--weights", str(ref_dir), "--model", "tiny"])  # a test-only preset: no release files
    assert e.value.code == 2 and "invalid choice: 'tiny'" in capsys.readouterr().err
    afile = ref_dir / "minigpt4_proj.pth"
    assert sample.main(argv + ["--weights", str(afile)]) == 1
    assert one_error_line(capsys) == f"error: --weights {afile}: not a folder"


def test_image_preprocessed_at_the_model_size(ref_dir, ref_config, capsys, monkeypatch):
    """The image is checked before the weights load, then preprocessed at the ViT's img_size (from the folder)."""
    import data
    sizes, orig = [], data.preprocess
    monkeypatch.setattr(data, "preprocess", lambda *a, **kw: sizes.append(kw.get("size")) or orig(*a, **kw))
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION,
                      "--greedy", "--max-new-tokens", "2"])
    assert rc == 0 and sizes == [ref_config["dims"]["vit"]["img_size"]]
    capsys.readouterr()
    loads = []
    monkeypatch.setattr(sample.MiniGPT4, "from_pretrained", lambda *a, **kw: loads.append(a))
    rc = sample.main(["--image", str(ref_dir / "config.json"), "--weights", str(ref_dir), "--prompt", QUESTION])
    assert rc == 1 and loads == [] and "cannot read image" in one_error_line(capsys)


def test_missing_weights_end_with_the_fetch_command(tmp_path, capsys):
    argv = ["--image", "assets/cat.jpg", "--prompt", QUESTION, "--device", "cpu"]
    assert sample.main(argv + ["--weights", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.rstrip().endswith(f"fetch them with: python fetch.py --model vicuna-7b --out {tmp_path}")
    assert sample.main(argv + ["--model", "llama2", "--weights", "weights"]) == 1  # the default folder: no --out
    assert capsys.readouterr().err.rstrip().endswith("python fetch.py --model llama2-7b")


def test_a_file_the_user_trains_is_never_called_downloadable(ref_dir, capsys):
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION,
                      "--proj", "out/stage1/ckpt.pth"])
    line = one_error_line(capsys)
    assert rc == 1 and line == "error: --proj out/stage1/ckpt.pth: no such file or folder"


def test_log_names_the_model_actually_loaded(ref_dir, capsys):
    assert sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--prompt", QUESTION,
                        "--greedy", "--max-new-tokens", "2"]) == 0
    log = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loaded")][0]
    assert log.startswith("loaded an LLM of no release size") and "2 layers x 64" in log  # the tiny fixture


def chat_with(ref_dir, monkeypatch, stdin, interrupt_after=None):
    """Interactive sample.main on stdin; the first streamed answer raises Ctrl-C after `interrupt_after` pieces."""
    import io
    import chat
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    orig, calls = chat.Chat.answer, []

    def answer(self, on_text=None, **kw):
        calls.append(1)
        if interrupt_after is None or len(calls) > 1:
            return orig(self, on_text=on_text, **kw)
        seen = []

        def cut(delta):
            seen.append(on_text(delta))
            if len(seen) == interrupt_after:
                raise KeyboardInterrupt
        return orig(self, on_text=cut, **kw)
    monkeypatch.setattr(chat.Chat, "answer", answer)
    return sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir), "--greedy",
                        "--max-new-tokens", "20"])


def test_ctrl_c_stops_the_answer_and_the_next_question_works(ref_dir, capsys, monkeypatch):
    assert chat_with(ref_dir, monkeypatch, f"{QUESTION}\n/quit\n") == 0
    fresh = capsys.readouterr().out.strip()
    assert chat_with(ref_dir, monkeypatch, f"{QUESTION}\n{QUESTION}\n/quit\n", interrupt_after=2) == 0
    out, err = capsys.readouterr()
    assert "(stopped: that answer and its question are dropped)" in err and "Traceback" not in err
    assert out.splitlines()[-1].strip() == fresh  # the cut exchange is gone: the same answer as a fresh chat


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt])
def test_ctrl_d_and_ctrl_c_at_an_empty_prompt_exit_cleanly(ref_dir, capsys, monkeypatch, key):
    import builtins
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)

    def press(prompt):
        raise key
    monkeypatch.setattr(builtins, "input", press)
    rc = sample.main(["--image", str(ref_dir / "image0_rgba.png"), "--weights", str(ref_dir)])
    out, err = capsys.readouterr()
    assert rc == 0 and out == "\n" and "Traceback" not in err


def test_image_command_on_a_text_file_says_not_an_image(ref_dir, capsys, monkeypatch):
    assert chat_with(ref_dir, monkeypatch, "/image README.md\n/quit\n") == 0
    err = capsys.readouterr().err
    assert "error: cannot read image README.md: not an image file" in err and "object at 0x" not in err


def test_help_is_fast_and_shows_defaults():
    import time
    for script in ("sample.py", "fetch.py"):
        t0 = time.time()
        rc, out, err = run_script(script, "--help")
        assert rc == 0 and "(default: " in out, err
        assert time.time() - t0 < 3, script  # about 0.3 s here; the bound leaves room for a loaded machine
        assert "import torch" not in err


def run_script(script, *args):
    p = subprocess.run([sys.executable, "-X", "importtime", script, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    return p.returncode, p.stdout, "import torch" if "| torch\n" in p.stderr else ""


# ------------------------------------------------------------- text-only chat with SmolLM2 (GGUF, ChatML)
def test_text_only_chat_answers_a_fact(smollm2_gguf, capsys):
    rc = sample.main(["--llm", smollm2_gguf, "--prompt", "What is the capital of France?", "--greedy",
                      "--max-new-tokens", "20"])
    out, err = capsys.readouterr()
    assert rc == 0 and "text only" in err
    assert "Paris" in out, out


def test_chatml_history_equals_the_gguf_chat_template(smollm2_gguf):
    """Two turns through Chat.items (the answer as generated ids, ending in <|im_end|>) == the file's own
    Jinja chat template rendered with add_generation_prompt."""
    from types import SimpleNamespace
    import jinja2
    from gguf_reader import GGUFFile
    from llama import load_tokenizer
    from chat import TextModel
    from model import MiniGPT4Config
    tok = load_tokenizer(smollm2_gguf)
    llm = SimpleNamespace(cfg=SimpleNamespace(max_seq_len=8192))
    chat = sample.Chat(TextModel(MiniGPT4Config.from_name("smollm2"), llm, tok))
    chat.ask("Hi!")
    chat.messages.append(dict(role="assistant", text="Hello.", images=[], ids=tok.encode("Hello.<|im_end|>")))
    chat.ask("Name a color.")
    chat.messages.append(dict(role="assistant", text=None, images=[], ids=None))
    ours = "".join(p if isinstance(p, str) else tok.decode(p) for p in chat.items())
    template = jinja2.Template(GGUFFile(smollm2_gguf).kv["tokenizer.chat_template"])
    messages = [dict(role="user", content="Hi!"), dict(role="assistant", content="Hello."),
                dict(role="user", content="Name a color.")]
    assert ours == template.render(messages=messages, add_generation_prompt=True)
