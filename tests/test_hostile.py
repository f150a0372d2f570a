"""Hostile and mistaken inputs (issue 15), one section per class. The corpus is built here, at test time, in tmp
folders. Each refused case must end in a non-zero exit with exactly ONE `error:` line naming the file, field or
option, no traceback, within a time bound (and a memory bound where the input could fill memory), touching
nothing outside its tmp folder; a bad sample inside a dataset is skipped and counted instead. Class 8 adds fault
tests: a write that fails with ENOSPC half-way, a full tmpfs (where mount works), a SIGKILL; the last checkpoint
survives and --resume continues to the same weights as a run that was never interrupted."""
import contextlib
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc

import pytest
import torch
from safetensors.torch import load_file, save_file

import checks
import data
import sample
import train as T
from checkpoint import CheckpointError
from conftest import IMAGES, REFERENCE_DIRS, ROOT

TINY = REFERENCE_DIRS[0]
PHOTO = IMAGES / "cat.jpg"
TIME_LIMIT = 30           # seconds per case; each takes 0-3 s here
MEMORY_LIMIT = 48 * 2**20  # Python-allocated bytes, for inputs that could fill memory (/dev/zero, big members)
EVIL_GLOBAL = f"GLOBAL {os.system.__module__}.system"


# ------------------------------------------------------------------------------------------- harness
def _tree(root):
    """{path: (size, mtime)} under root (no .git/caches): what a case may not change."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache")]
        for f in files:
            st = os.lstat(os.path.join(folder, f))
            out[os.path.join(folder, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def box(tmp_path, monkeypatch):
    """The case's tmp folder (also the cwd); afterwards the repository and tmp_path's siblings are unchanged."""
    repo, siblings = _tree(ROOT), set(os.listdir(tmp_path.parent))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    assert _tree(ROOT) == repo, "a case wrote into the repository"
    assert set(os.listdir(tmp_path.parent)) == siblings, "a case wrote next to its tmp folder"


@contextlib.contextmanager
def bounded(seconds=TIME_LIMIT, memory=None):
    """Fail a case that runs longer than `seconds` (SIGALRM) or, with `memory`, allocates more from Python."""
    def alarm(*_):
        raise TimeoutError(f"case ran over {seconds} s")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    if memory:
        tracemalloc.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        peak = tracemalloc.get_traced_memory()[1] if memory else 0
        tracemalloc.stop()
    assert peak <= (memory or 0), f"peak Python allocation {peak / 2**20:.0f} MiB"


def call(main, argv, memory=None):
    """main(argv) in this process -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with bounded(memory=memory), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def refused(result, *names):
    """Non-zero exit, exactly one `error:` line holding each of `names`, no traceback -> that line."""
    rc, out, err = result
    lines = [line for line in err.splitlines() if "error:" in line]
    assert rc not in (0, None), f"accepted (exit {rc}): {err[-500:]}"
    assert "Traceback" not in err and "weights_only=False" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def raises_one_line(fn, *names):
    """fn() raises one of the errors the CLIs print as `error: ...`, one line naming each of `names`."""
    with bounded(), pytest.raises((CheckpointError, ValueError, OSError)) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and "weights_only=False" not in msg, msg
    for name in names:
        assert str(name) in msg, (name, msg)
    return msg


def weights_copy(box):
    """A writable copy of the tiny release-layout weights folder."""
    return shutil.copytree(TINY, box / "w", ignore=shutil.ignore_patterns("reference*"))


def sample_args(weights, *extra):
    return ["--weights", weights, "--image", PHOTO, "--prompt", "What is this?", "--device", "cpu",
            "--max-new-tokens", "3", "--greedy", *extra]


def edit_pth(path, fn):
    """Load a .pth (tensors only), let fn change its state dict in place, save it back."""
    ck = torch.load(path, weights_only=True)
    fn(ck["model"] if isinstance(ck.get("model"), dict) else ck)
    torch.save(ck, path)


def evil_pickle(path, legacy=False):
    class Evil:
        def __reduce__(self):
            return os.system, ("touch PWNED",)
    torch.save({"model": {"llama_proj.weight": Evil()}}, path, _use_new_zipfile_serialization=not legacy)
    return path


def fifo(path):
    os.mkfifo(path)
    return path


def pack_input(root, captions, n=2):
    """An images folder with n photos and a captions file -> (images dir, captions path)."""
    images = root / "imgs"
    images.mkdir(exist_ok=True)
    for i, src in enumerate(sorted(IMAGES.glob("*.jpg"))[:n]):
        shutil.copy(src, images / f"p{i}.jpg")
    caps = root / "caps.json"
    caps.write_text(json.dumps(captions))
    return images, caps


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Shards, a cc_sbu_align folder and a 2-step tiny training run (ckpt at step 2 of 4)."""
    root = tmp_path_factory.mktemp("run")
    images, caps = pack_input(root, {f"p{i}.jpg": f"a photo number {i}" for i in range(4)}, n=4)
    data.pack(str(images), str(caps), str(root / "tars"), 1)
    align = root / "align"
    shutil.copytree(images, align / "image")
    (align / "filter_cap.json").write_text(json.dumps({"annotations": [
        {"image_id": f"p{i}", "caption": f"a photo number {i}"} for i in range(4)]}))
    argv = ["--config", "tiny", f"--data={root}/tars/{{00000..00003}}.tar", f"--out_dir={root}/out",
            "--batch_size=2", "--max_epoch=1", "--iters_per_epoch=4", "--ckpt_interval=2"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert T.main(argv + ["--stop_step=2"]) == 0
    return dict(root=root, argv=argv, align=align, ckpt=root / "out" / "ckpt.pth")


def train_argv(run, out_dir, *extra):
    return [a if not a.startswith("--out_dir=") else f"--out_dir={out_dir}" for a in run["argv"]] + list(extra)


# ------------------------------------------------------------------- 1. values read from files are trusted
LLAMA_CONFIG = [  # config.json field -> hostile value, and the field the error must name
    ("num_hidden_layers", 10**8, "n_layers"), ("hidden_size", -64, "dim"), ("num_attention_heads", 0, "n_heads"),
    ("num_attention_heads", "64", "n_heads"), ("hidden_size", 63, "dim 63 is not divisible"),
    ("vocab_size", 10**12, "vocab_size"), ("intermediate_size", 1.5, "hidden_dim"),
    ("rms_norm_eps", float("nan"), "norm_eps"), ("rope_theta", -1, "rope_theta"),
    ("max_position_embeddings", 2**40, "max_seq_len"), ("tie_word_embeddings", "yes", "tie_embeddings"),
    ("num_key_value_heads", 3, "n_kv_heads"), ("hidden_size", None, "dim"), ("num_hidden_layers", True, "n_layers"),
    ("num_hidden_layers", 10**400, "n_layers"), ("rms_norm_eps", float("inf"), "norm_eps"),
]
VISION_CONFIG = [  # config.json dims.{vit,qformer} (the fixture layout) -> the field named
    ("vit", "depth", 10**6, "depth"), ("vit", "num_heads", 0, "n_heads"), ("vit", "norm_eps", -1, "norm_eps"),
    ("qformer", "hidden_size", "64", "hidden_size"), ("qformer", "cross_attention_layers", [99], "cross_attention"),
    ("qformer", "num_query_token", 10**9, "n_queries"), ("qformer", "num_attention_heads", 3, "divisible"),
    ("ln_vision", "eps", "x", "ln_vision.eps"), ("ln_vision", "eps", 0, "ln_vision.eps"),
]


@pytest.mark.parametrize("key, value, field", LLAMA_CONFIG, ids=[f"{k}={v!r}" for k, v, _ in LLAMA_CONFIG])
def test_1_llama_config_fields(box, key, value, field):
    w = weights_copy(box)
    cfg = json.loads((w / "llama" / "config.json").read_text())
    (w / "llama" / "config.json").write_text(json.dumps(cfg | {key: value}))
    refused(call(sample.main, sample_args(w)), "config.json", field)


@pytest.mark.parametrize("text", ["[1, 2]", "not json", "null", " " * (2**20 + 1)])
def test_1_llama_config_file(box, text):
    w = weights_copy(box)
    (w / "llama" / "config.json").write_text(text)
    refused(call(sample.main, sample_args(w)), "config.json")


@pytest.mark.parametrize("part, key, value, field", VISION_CONFIG, ids=[f"{p}.{k}" for p, k, _, _ in VISION_CONFIG])
def test_1_vision_configs(box, part, key, value, field):
    w = weights_copy(box)
    cfg = json.loads((w / "config.json").read_text())
    cfg["dims"][part][key] = value
    (w / "config.json").write_text(json.dumps(cfg))
    refused(call(sample.main, sample_args(w)), "config.json", field)


def _opt_state(ck, name, value):
    ck["optimizer"]["state"][0][name] = value


RESUME = {  # a train.py checkpoint with one key made hostile -> what the error names
    "config-not-dict": (lambda ck: ck.update(config=[1]), "config"),
    "config-changed-type": (lambda ck: ck["config"].update(lr="0.001"), "--lr"),
    "rng-str": (lambda ck: ck.update(rng="x"), "rng"),
    "rng-shape": (lambda ck: ck.update(rng=[torch.zeros(3, dtype=torch.uint8)]), "rng[0]"),
    "rng-count": (lambda ck: ck.update(rng=[]), "processes"),
    "optimizer-empty": (lambda ck: ck.update(optimizer={}), "optimizer"),
    "optimizer-shape": (lambda ck: _opt_state(ck, "exp_avg", torch.zeros(5)), "exp_avg"),
    "optimizer-int": (lambda ck: _opt_state(ck, "exp_avg_sq", torch.zeros(64, 64, dtype=torch.long)), "exp_avg_sq"),
    "optimizer-groups": (lambda ck: ck["optimizer"].update(param_groups=[]), "groups"),
    "data-int": (lambda ck: ck.update(data=5), "data"),
    "data-negative": (lambda ck: ck.update(data=[{"drawn": -1, "sources": []}]), "data"),
    "data-positions": (lambda ck: ck["data"][0]["sources"][0]["pos"].update(positions={"a": 1}), "positions"),
    "step-str": (lambda ck: ck.update(step="2"), "step"),
    "step-negative": (lambda ck: ck.update(step=-1), "step"),
    "step-beyond-schedule": (lambda ck: ck.update(step=10**9), "beyond the schedule"),
    "loss-length": (lambda ck: ck.update(loss=[1.0]), "loss"),
    "loss-str": (lambda ck: ck.update(loss="x"), "loss"),
    "scaler-list": (lambda ck: ck.update(scaler=[1]), "scaler"),
    "no-rng": (lambda ck: ck.pop("rng"), "no rng"),
    "weights-nan": (lambda ck: ck["model"]["llama_proj.weight"].fill_(float("nan")), "llama_proj.weight"),
    "weights-int": (lambda ck: ck["model"].update({"llama_proj.bias": torch.zeros(64, dtype=torch.int32)}), "bias"),
}


@pytest.mark.parametrize("case", RESUME)
def test_1_resume_checkpoint_fields(box, run, case):
    change, name = RESUME[case]
    os.mkdir(box / "out")
    ck = torch.load(run["ckpt"], weights_only=True)
    change(ck)
    torch.save(ck, box / "out" / "ckpt.pth")
    refused(call(T.main, train_argv(run, box / "out", "--resume")), "ckpt.pth", name)


def test_1_resume_not_a_dict(box, run):
    os.mkdir(box / "out")
    torch.save([1, 2], box / "out" / "ckpt.pth")
    refused(call(T.main, train_argv(run, box / "out", "--resume")), "ckpt.pth", "cannot resume")


# ------------------------------------------------------------------------ 2. weights of the wrong kind
def _proj(fn):
    return lambda w: edit_pth(w / "minigpt4_proj.pth", fn)


def _llama(key, fn):
    def edit(w):
        sd = load_file(w / "llama" / "model.safetensors")
        sd[key] = fn(sd[key])
        save_file(sd, w / "llama" / "model.safetensors")
    return edit


WEIGHTS = {  # one tensor of the release folder made hostile -> what the error names
    "proj-int-bits": (_proj(lambda sd: sd.update({"llama_proj.weight": sd["llama_proj.weight"].view(torch.int32)})),
                      "llama_proj.weight"),
    "proj-bool": (_proj(lambda sd: sd.update({"llama_proj.weight": sd["llama_proj.weight"] > 0})), "llama_proj.weight"),
    "proj-nan": (_proj(lambda sd: sd["llama_proj.weight"].fill_(float("nan"))), "minigpt4_proj.pth: llama_proj.weight"),
    "proj-inf-bias": (_proj(lambda sd: sd["llama_proj.bias"].fill_(float("inf"))), "llama_proj.bias"),
    "proj-shape": (_proj(lambda sd: sd.update({"llama_proj.weight": sd["llama_proj.weight"][:, :5]})), "projection"),
    "llama-norm-nan": (_llama("model.norm.weight", lambda t: t.fill_(float("nan"))), "llama: model.norm.weight"),
    "llama-embed-int": (_llama("model.embed_tokens.weight", lambda t: t.long()), "llama: model.embed_tokens.weight"),
    "llama-norm-shape": (_llama("model.norm.weight", lambda t: t[:3].clone()), "llama: shape mismatch for model.norm"),
    "vit-norm-int": (lambda w: edit_pth(w / "eva_vit_g.pth", lambda sd: sd.update(
        {"blocks.0.norm1.weight": sd["blocks.0.norm1.weight"].int()})), "eva_vit_g.pth: blocks.0.norm1.weight"),
    "vit-width-over-limit": (lambda w: edit_pth(w / "eva_vit_g.pth", lambda sd: sd.update(
        {"patch_embed.proj.weight": torch.zeros(20000, 3, 1, 1)})), "eva_vit_g.pth: ViTConfig: width"),
    "qformer-width-over-limit": (lambda w: edit_pth(w / "blip2_pretrained.pth", lambda sd: sd.update(
        {"query_tokens": torch.zeros(1, 4, 20000)})), "blip2_pretrained.pth"),
    "vit-bias-nan": (lambda w: edit_pth(w / "eva_vit_g.pth", lambda sd: sd["blocks.0.norm1.bias"].fill_(float("nan"))),
                     "blocks.0.norm1.bias"),
    "qformer-bias-inf": (lambda w: edit_pth(w / "blip2_pretrained.pth", lambda sd: next(
        v for k, v in sd.items() if k.endswith("embeddings.LayerNorm.bias")).fill_(float("-inf"))), "blip2_pretrained.pth: embeddings.LayerNorm.bias"),
}


@pytest.mark.parametrize("case", WEIGHTS)
def test_2_weights_must_be_finite_floats_of_the_right_shape(box, case):
    change, name = WEIGHTS[case]
    w = weights_copy(box)
    change(w)
    refused(call(sample.main, sample_args(w)), name)


# --------------------------------------------------------------------------------- 3. paths escape
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/hostname", "sub/../../x.safetensors"])
def test_3_index_shard_names(box, shard):
    w = weights_copy(box)
    (box / "outside.safetensors").write_bytes(b"x")
    (w / "llama" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    refused(call(sample.main, sample_args(w)), "model.safetensors.index.json", "shard")


@pytest.mark.parametrize("image_id", ["../../outside", "/etc/hostname", "a/../../b", "link"])
def test_3_filter_cap_image_ids(box, run, image_id):
    align = shutil.copytree(run["align"], box / "align")
    (box / "outside.jpg").write_bytes(PHOTO.read_bytes())
    os.symlink(box / "outside.jpg", align / "image" / "link.jpg")
    anns = {"annotations": [{"image_id": image_id, "caption": "a photo"}]}
    (align / "filter_cap.json").write_text(json.dumps(anns))
    argv = train_argv(run, box / "out", "--stage", "2", "--init=none", f"--data={align}")
    argv = [a for a in argv if not a.startswith("--data=") or a.endswith(str(align))]
    refused(call(T.main, argv), "filter_cap.json", "image_id")


@pytest.mark.parametrize("file", ["../outside.jpg", "/etc/hostname", "link.jpg"])
def test_3_pack_file_names(box, file):
    images, caps = pack_input(box, {"p0.jpg": "a photo", file: "a secret"})
    (box / "outside.jpg").write_bytes(PHOTO.read_bytes())
    os.symlink(box / "outside.jpg", images / "link.jpg")
    refused(call(data.main, ["pack", images, caps, box / "out"]), "caps.json", file)
    assert not (box / "out").exists()


# ------------------------------------------------------------------------ 4. inputs that never end
def test_4_decompression_bomb_is_refused(box, monkeypatch):
    """More pixels than PIL.Image.MAX_IMAGE_PIXELS (lowered here: a real bomb costs seconds to build) is an error,
    also between 1x and 2x the limit, where Pillow itself only warns and would decode it."""
    from PIL import Image
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (40, 40)).save(box / "bomb.png")  # 1600 pixels: Pillow's warning zone
    argv = sample_args(TINY)
    argv[argv.index("--image") + 1] = box / "bomb.png"
    refused(call(sample.main, argv), "bomb.png", "MAX_IMAGE_PIXELS")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder", "too-big"])
def test_4_image_not_a_bounded_regular_file(box, kind):
    path = {"fifo": lambda: fifo(box / "img.jpg"), "dev-zero": lambda: "/dev/zero", "folder": lambda: box,
            "too-big": lambda: box / "big.jpg"}[kind]()
    if kind == "too-big":
        with open(path, "wb") as f:
            f.truncate(data.MAX_IMAGE_BYTES + 1)  # sparse: no disk used
    argv = sample_args(TINY)
    argv[argv.index("--image") + 1] = path
    refused(call(sample.main, argv, memory=MEMORY_LIMIT), "image", path)


def test_4_pack_fifo_captions_and_fifo_image(box):
    images, caps = pack_input(box, {"p0.jpg": "a photo", "p1.jpg": "another photo", "pipe.jpg": "a pipe"})
    fifo(images / "pipe.jpg")
    fifo(box / "caps_pipe.json")
    refused(call(data.main, ["pack", images, box / "caps_pipe.json", box / "o1"]), "caps_pipe.json")
    rc, out, err = call(data.main, ["pack", images, caps, box / "o2"], memory=MEMORY_LIMIT)
    assert rc in (0, None) and "wrote 2 samples in 1 shards" in out and "(1 skipped)" in out, (out, err)
    assert "pipe.jpg: not a regular file" in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["init", "filter_cap"])
def test_4_fifo_checkpoint_and_annotations(box, run, what):
    if what == "init":
        refused(call(T.main, train_argv(run, box / "out", f"--init={fifo(box / 'p.pth')}")), "p.pth", "regular")
    else:
        align = box / "align"
        shutil.copytree(run["align"] / "image", align / "image")
        fifo(align / "filter_cap.json")
        argv = [a for a in train_argv(run, box / "out", "--stage", "2", "--init=none") if not a.startswith("--data=")]
        refused(call(T.main, argv + [f"--data={align}"]), "filter_cap.json", "regular")


def test_4_tar_member_too_big_is_skipped_and_counted(box):
    """A gzip shard whose member inflates past the bound (64 MiB of zeros in ~64 KiB): skipped unread."""
    import shards
    class Zeros(io.RawIOBase):
        def __init__(self, n):
            self.left = n
        def readable(self):
            return True

        def readinto(self, b):
            n = min(len(b), self.left)
            b[:n] = bytes(n)
            self.left -= n
            return n
    path = box / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("k0.jpg")
        info.size = shards.MAX_MEMBER_BYTES + 1
        tar.addfile(info, io.BufferedReader(Zeros(info.size)))
        for name, blob in (("k0.txt", b"bomb"), ("k1.jpg", PHOTO.read_bytes()), ("k1.txt", b"a cat")):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    assert path.stat().st_size < 2**20
    with bounded(memory=MEMORY_LIMIT):
        batch = data.collate(list(data.ShardDataset(str(path), shuffle=1)))
    assert (batch["text"], batch["skipped"]) == (["a cat"], 1), batch["errors"]
    assert "k0.jpg" in batch["errors"][0] and "bytes" in batch["errors"][0]


# ---------------------------------------------------------------------- 5. user text is only text
def test_5_user_text_cannot_insert_an_image_slot_or_special_tokens(box):
    from model import IMAGE, MiniGPT4
    m = MiniGPT4.from_pretrained(str(TINY), "vicuna-7b")
    chat = sample.Chat(m, max_new_tokens=3, do_sample=False)
    chat.upload_img(str(PHOTO))
    tok = m.tokenizer
    for text in (f"two {IMAGE} slots {IMAGE}", "stop </s> here <s> <unk>", "bad \udcff bytes", "lone \ud800"):
        with bounded():
            chat.ask(text)
            chat.answer()  # the conversation goes on
        pieces = chat.items()
        assert sum(torch.is_tensor(p) for p in pieces) == 1  # only the uploaded image
        for i, p in enumerate(p for p in pieces if isinstance(p, str)):
            ids = tok.encode(p, bos=i == 0)
            assert tok.eos_id not in ids and tok.unk_id not in ids and tok.bos_id not in ids[1:], (p, ids)
    assert len(chat.messages) == 8


def test_5_invalid_utf8_from_argv_and_stdin(box, monkeypatch):
    """Undecodable bytes in --prompt (a real process: Python's own argv decoding) and on stdin are replaced, and
    the chat answers."""
    argv = ["--weights", TINY, "--image", PHOTO, "--device", "cpu", "--max-new-tokens", "3", "--greedy"]
    p = subprocess.run([sys.executable, os.fsencode(ROOT / "sample.py"), *map(os.fsencode, argv), b"--prompt",
                        b"what \xff\xfe <ImageHere> </s>?"], capture_output=True, timeout=120, cwd=box)
    assert p.returncode == 0 and b"Traceback" not in p.stderr and b"error:" not in p.stderr, p.stderr[-2000:]
    assert p.stdout.strip(), p.stderr[-2000:]  # answered
    stdin = io.TextIOWrapper(io.BytesIO(b"hello \xff\xc3\n<ImageHere> </s>\n/quit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    rc, out, err = call(sample.main, argv)
    assert rc == 0 and len(out.strip().splitlines()) == 2 and "Traceback" not in err and "error:" not in err, err


# ---------------------------------------------------------------- 6. options outside their domain
SAMPLE_OPTIONS = [
    ("--repetition-penalty", "0"), ("--repetition-penalty", "-1"), ("--repetition-penalty", "nan"),
    ("--length-penalty", "nan"), ("--length-penalty", "inf"), ("--temperature", "nan"), ("--temperature", "inf"),
    ("--top-p", "nan"), ("--max-new-tokens", "-5"), ("--num-beams", "abc"), ("--num-beams", "1000000000"),
    ("--seed", str(2**70)),
]
TRAIN_OPTIONS = [
    "--min_lr=-1", "--warmup_lr=nan", "--grad_clip=-1", "--lr=inf", "--beta1=1", "--weight_decay=-0.1",
    "--max_epoch=10000000", "--seed=-1", f"--seed={2**70}", f"--seed={10**400}", "--batch_size=1e9", "--stage=3",
    "--dtype=int8", "--lr=1e400",
]
PACK_OPTIONS = [("--resize", "0"), ("--resize", "100000"), ("--shard-size", "0"), ("--shard-size", "abc")]


@pytest.mark.parametrize("option, value", SAMPLE_OPTIONS)
def test_6_sample_options(box, option, value):
    argv = [a for a in sample_args(TINY) if a != "--greedy"] + [option, value]  # sampling: every option counts
    refused(call(sample.main, argv), option)


@pytest.mark.parametrize("option", TRAIN_OPTIONS)
def test_6_train_options(box, option):
    refused(call(T.main, ["--config", "tiny", "--data=x.tar", option]), option.split("=")[0])


@pytest.mark.parametrize("spec, names", [("x/{3..1}.tar", ("{3..1}", "reversed")),
                                         ("x/{0..99999999}.tar", ("{0..99999999}", "over 1,000,000")),
                                         ("x/{0..999}{0..9999}.tar", ("{0..999}", "over 1,000,000")),
                                         ("x/a.tar:1,x/b.tar:" + "9" * 400, ("--data", ":RATIO"))], ids=range(4))
def test_6_train_data_specs(box, spec, names):
    refused(call(T.main, ["--config", "tiny", f"--data={spec}"]), *names)


@pytest.mark.parametrize("option, value", PACK_OPTIONS)
def test_6_pack_options(box, option, value):
    images, caps = pack_input(box, {"p0.jpg": "a photo"})
    refused(call(data.main, ["pack", images, caps, box / "out", option, value], memory=MEMORY_LIMIT), option)
    assert not (box / "out").exists()


def test_6_pack_empty_captions_are_skipped_and_counted(box):
    images, caps = pack_input(box, {"p0.jpg": "a photo", "p1.jpg": "  "})
    rc, out, err = call(data.main, ["pack", images, caps, box / "out"])
    assert rc in (0, None) and "wrote 1 samples" in out and "(1 skipped)" in out and "empty caption" in err
    refused(call(data.main, ["pack", images, pack_input(box, {"p1.jpg": ""})[1], box / "o2"]), "no sample written")


# ----------------------------------------------------------------------------------------- 7. devices
DEVICES = ["mps", "meta", "nonsense", "cuda:99", "cpu:x"] + ([] if torch.cuda.is_available() else ["cuda"])


@pytest.mark.parametrize("device", DEVICES)
def test_7_devices(box, device):
    argv = sample_args(TINY)
    argv[argv.index("--device") + 1] = device
    refused(call(sample.main, argv), "--device", device)
    refused(call(T.main, ["--config", "tiny", "--data=x.tar", f"--device={device}"]), "--device", device)


# ------------------------------------------------------------------------------------ 8. writing outputs
def test_8_out_dir_not_writable_before_the_first_step(box, run):
    (box / "file").write_text("x")
    line = refused(call(T.main, train_argv(run, box / "file" / "out")), "--out_dir")
    assert "step" not in line


def _resume_matches_straight_run(run, out_dir, box):
    """--resume from out_dir finishes the 4 steps with the weights of a run that was never interrupted."""
    rc, out, err = call(T.main, train_argv(run, out_dir, "--resume"))
    assert rc == 0 and "steps: 2 -> 4" in out, err
    straight = run["root"] / "straight"  # once per module
    if not (straight / "ckpt.pth").exists():
        assert call(T.main, train_argv(run, straight))[0] == 0
    a, b = (torch.load(d / "ckpt.pth", weights_only=True) for d in (out_dir, straight))
    assert a["step"] == b["step"] == 4 and a["loss"] == b["loss"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_8_disk_full_mid_write_keeps_the_last_checkpoint(box, run, monkeypatch):
    """torch.save writes half the checkpoint, then ENOSPC: one line, no .tmp left, ckpt.pth (step 2) intact."""
    out_dir = shutil.copytree(run["ckpt"].parent, box / "out")
    before = (out_dir / "ckpt.pth").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    line = refused(call(T.main, train_argv(run, out_dir, "--resume")), "ckpt.pth", "No space left", "last good")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(out_dir)) == ["ckpt.pth", "log.jsonl"], line
    assert (out_dir / "ckpt.pth").read_bytes() == before
    _resume_matches_straight_run(run, out_dir, box)


def test_8_full_tmpfs(box, run):
    """A real full file system where mounting works (root with CAP_SYS_ADMIN); skipped elsewhere."""
    mnt = box / "mnt"
    mnt.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                                 capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):  # no mount command
        mounted = False
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (the ENOSPC injection test covers the same path)")
    try:
        out_dir = shutil.copytree(run["ckpt"].parent, mnt / "out")
        before = (out_dir / "ckpt.pth").read_bytes()
        with open(mnt / "filler", "wb") as f:  # fill to ~16 KiB free: the probe fits, a checkpoint does not
            while os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize > 16 * 1024:
                f.write(bytes(4096))
                f.flush()
        refused(call(T.main, train_argv(run, out_dir, "--resume")), "ckpt.pth", "No space left", "last good")
        assert sorted(os.listdir(out_dir)) == ["ckpt.pth", "log.jsonl"]
        assert (out_dir / "ckpt.pth").read_bytes() == before
        os.remove(mnt / "filler")
        _resume_matches_straight_run(run, out_dir, box)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_8_sigkill_then_resume(box, run):
    """The real process killed (SIGKILL) once a checkpoint exists: the checkpoint loads and --resume goes on."""
    out_dir = box / "out"
    argv = [a.replace("--iters_per_epoch=4", "--iters_per_epoch=100000").replace("--ckpt_interval=2",
                                                                                   "--ckpt_interval=1")
            for a in train_argv(run, out_dir)]
    p = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=box, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while not (out_dir / "ckpt.pth").exists() and time.time() < deadline and p.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # somewhere in the following steps and saves
    finally:
        p.kill()
        p.wait()
    assert (out_dir / "ckpt.pth").exists(), p.stderr.read()[-2000:]
    step = torch.load(out_dir / "ckpt.pth", weights_only=True)["step"]
    rc, out, err = call(T.main, argv + ["--resume", f"--stop_step={step + 1}"])
    assert rc == 0 and f"steps: {step} -> {step + 1}" in out, err
    assert not (out_dir / "ckpt.pth.tmp").exists()


def test_8_planted_links_and_fifos_in_out_dir(box, run):
    """A ckpt.pth.tmp symlink to a file outside is replaced, never written through; a log.jsonl FIFO is refused
    without blocking."""
    out_dir = shutil.copytree(run["ckpt"].parent, box / "out")
    (box / "victim.txt").write_text("keep me")
    os.symlink(box / "victim.txt", out_dir / "ckpt.pth.tmp")
    rc, out, err = call(T.main, train_argv(run, out_dir, "--resume"))
    assert rc == 0 and (box / "victim.txt").read_text() == "keep me", err
    assert torch.load(out_dir / "ckpt.pth", weights_only=True)["step"] == 4
    os.mkdir(box / "fifo_out")
    fifo(box / "fifo_out" / "log.jsonl")
    refused(call(T.main, train_argv(run, box / "fifo_out", "--stop_step=1")), "log.jsonl")


def test_8_pack_into_a_folder_with_shards_is_refused(box):
    images, caps = pack_input(box, {"p0.jpg": "a photo", "p1.jpg": "another"})
    assert call(data.main, ["pack", images, caps, box / "out", "--shard-size", "1"])[0] in (0, None)
    old = {p.name: p.read_bytes() for p in (box / "out").iterdir()}
    refused(call(data.main, ["pack", images, caps, box / "out"]), "out", "not empty")
    assert {p.name: p.read_bytes() for p in (box / "out").iterdir()} == old
    (box / "empty").mkdir()  # an empty folder is fine
    assert call(data.main, ["pack", images, caps, box / "empty"])[0] in (0, None)


def test_8_pack_failing_mid_write_leaves_nothing(box, monkeypatch):
    images, caps = pack_input(box, {"p0.jpg": "a photo", "p1.jpg": "another"})

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    refused(call(data.main, ["pack", images, caps, box / "out", "--shard-size", "1"]), "No space left")
    assert sorted(os.listdir(box)) == ["caps.json", "imgs"]  # no out/, no temp folder


def test_8_atomic_save_removes_its_temp_file(box):
    def broken(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")
    (box / "ck.pth").write_bytes(b"good")
    msg = raises_one_line(lambda: checks.atomic_save({}, str(box / "ck.pth"), save=broken), "ck.pth", "last good")
    assert sorted(os.listdir(box)) == ["ck.pth"] and (box / "ck.pth").read_bytes() == b"good", msg


# ----------------------------------------------------------------------------------------- 9. messages
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_9_unsafe_pickle_names_what_was_blocked(box, run, legacy):
    evil = evil_pickle(box / "evil.pth", legacy)
    refused(call(T.main, train_argv(run, box / "out", f"--init={evil}")), "evil.pth", "refused", EVIL_GLOBAL)
    w = weights_copy(box)
    os.remove(w / "llama" / "model.safetensors")
    evil_pickle(w / "llama" / "pytorch_model.bin", legacy)
    refused(call(sample.main, sample_args(w)), "pytorch_model.bin", "refused", EVIL_GLOBAL)
    assert not (box / "PWNED").exists()


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_9_seed_out_of_range(box, seed):
    refused(call(sample.main, sample_args(TINY, "--seed", seed)), "--seed", "must be in [0, ")
    refused(call(T.main, ["--config", "tiny", "--data=x.tar", f"--seed={seed}"]), "--seed", "must be in [0, ")


def test_9_real_exit_path_one_line(box):
    """The CLIs as processes: exit status 1 (2: argparse), one `error:` line, for a few of the cases above."""
    cases = ((["sample.py", "--image", "/dev/zero", "--weights", str(TINY), "--device", "cpu"], "/dev/zero"),
             (["train.py", "--config", "tiny", "--data=x.tar", "--device=mps"], "--device"),
             (["data.py", "pack", ".", "x.json", "out", "--resize", "0"], "--resize"))
    procs = [subprocess.Popen([sys.executable, str(ROOT / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=box) for argv, _ in cases]
    for p, (_, name) in zip(procs, cases):
        out, err = p.communicate(timeout=120)
        refused((p.returncode, out, err), name)
