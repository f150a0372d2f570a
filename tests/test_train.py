"""train.py on the CPU with the tiny fixture model and shards written here: first-batch loss == MiniGPT4.forward,
overfitting, 2-process DDP == one process, resume == straight run, bad samples, NaN stop, the command line."""
import json
import math
import os
import runpy
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import data
import model as M
import train as T
from conftest import IMAGES, REFERENCE_DIRS, ROOT, assert_close, write_tar

TINY = REFERENCE_DIRS[0]
WORDS = "a the red blue green small big cat dog bird tree house car sky on under with near".split()


def _images(folder, n):
    """The fixture photos, then random-noise images: [(file name, caption)]."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, out = np.random.default_rng(0), []
    for i in range(n):
        name = f"img{i:02d}.jpg"
        photos = sorted(IMAGES.glob("*.jpg"))
        if i < len(photos):
            (folder / name).write_bytes(photos[i].read_bytes())
        else:
            Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / name)
        out.append((name, " ".join(rng.choice(WORDS, size=int(rng.integers(3, 10))))))
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """16 samples in 4 shards, written by data.pack -> the brace pattern for --data."""
    root = tmp_path_factory.mktemp("shards")
    caps = _images(root / "images", 16)
    (root / "caps.json").write_text(json.dumps(dict(caps)))
    paths, written, skipped = data.pack(str(root / "images"), str(root / "caps.json"), str(root / "tars"), 4)
    assert (len(paths), written, skipped) == (4, 16, 0)
    return str(root / "tars" / "{00000..00003}.tar")


@pytest.fixture(scope="module")
def align(tmp_path_factory):
    """A cc_sbu_align folder with 8 pairs."""
    root = tmp_path_factory.mktemp("cc_sbu_align")
    caps = _images(root / "image", 8)
    anns = [{"image_id": name[:-4], "caption": cap + ". it is a picture."} for name, cap in caps]
    (root / "filter_cap.json").write_text(json.dumps({"annotations": anns}))
    return str(root)


def config(data_spec, out_dir, stage=1, *args, **kw):
    cfg = T.parse_args(["--stage", str(stage), "--config", "tiny", f"--data={data_spec}", f"--out_dir={out_dir}",
                        *args])
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_parse_args_and_presets():
    cfg = T.parse_args(["--stage", "2", "--config=tiny", "--lr=0.5", "--resume", "--batch_size", "3"])
    assert (cfg.stage, cfg.lr, cfg.resume, cfg.batch_size, cfg.device) == (2, 0.5, True, 3, "cpu")
    s1, s2 = T.parse_args(["--stage", "1"]), T.parse_args(["--stage", "2"])
    assert (s1.batch_size, s1.lr, s1.min_lr, s1.warmup_steps, s1.max_epoch * s1.iters_per_epoch) == \
        (64, 1e-4, 8e-5, 5000, 20000)
    assert (s2.batch_size, s2.lr, s2.min_lr, s2.warmup_steps, s2.max_epoch * s2.iters_per_epoch) == \
        (12, 3e-5, 1e-5, 200, 1000)
    for bad in (["--nope=1"], ["--config", "huge"], ["--lr=fast"], ["--stage", "3"]):
        with pytest.raises(ValueError):
            T.parse_args(bad)


def test_lr_schedule_is_the_originals():
    """LinearWarmupCosineLRScheduler: warmup from warmup_lr, then a cosine over ALL steps from step 0."""
    cfg = T.parse_args(["--stage", "1"])
    total, lr = cfg.max_epoch * cfg.iters_per_epoch, [T.get_lr(cfg, s) for s in range(0, 20001, 50)]
    assert lr[0] == cfg.warmup_lr and all(a < b for a, b in zip(lr[:100], lr[1:100]))  # warmup rises
    assert all(a >= b for a, b in zip(lr[100:], lr[101:]))  # cosine falls
    assert math.isclose(T.get_lr(cfg, 4999), cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * 4999 / 5000)
    cos = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * 5000 / total))
    assert math.isclose(T.get_lr(cfg, 5000), cos) and math.isclose(T.get_lr(cfg, total), cfg.min_lr)


def test_optimizer_groups():
    """Weight decay 0.05 on the projection matrix, none on its bias; only trainable parameters."""
    net = torch.nn.Module()
    net.llama_proj, net.frozen = torch.nn.Linear(3, 4), torch.nn.Linear(4, 4)
    net.frozen.requires_grad_(False)
    opt = T.build_optimizer(T.parse_args([]), net)
    (g0, g1) = opt.param_groups
    assert g0["params"] == [net.llama_proj.weight] and g0["weight_decay"] == 0.05
    assert g1["params"] == [net.llama_proj.bias] and g1["weight_decay"] == 0.0 and g0["betas"] == (0.9, 0.999)


@pytest.mark.parametrize("stage,name,proj", [(1, "vicuna-7b", "minigpt4_proj.pth"),
                                             (2, "vicuna-7b", "minigpt4_proj.pth"),
                                             (2, "llama2-7b", "minigpt4_llama2_proj.pth")])
def test_first_batch_loss_is_model_forward(stage, name, proj, shards, align, tmp_path):
    """train.py's first loss (before any update) == MiniGPT4.forward on the same samples and prompts."""
    cfg = config(shards if stage == 1 else align, tmp_path, stage, model=name, init=str(TINY / proj),
                 stop_step=1, batch_size=3)
    got = T.train(cfg)["losses"][0]
    batch = next(T.Batches(cfg))
    assert len(batch["text"]) == 3 and (stage == 1) == ("instruction" not in batch)
    ref_model = M.MiniGPT4.from_pretrained(TINY, name, proj=str(TINY / proj))
    with torch.no_grad():
        prompts = batch.get("instruction")
        assert prompts is None or all("<ImageHere>" in p for p in prompts)
        ref = ref_model(batch["image"], batch["text"], prompts, max_txt_len=cfg.max_txt_len)
    assert_close(torch.tensor(got), ref, f"stage {stage} {name} first loss")


def test_overfits_4_samples(tmp_path):
    """4 one-word captions, the same 4 samples every step: the loss falls by a large factor in 6 steps.
    (The tiny random Q-Former barely tells images apart, so long captions only fall ~2x: a shared prefix.)"""
    caps = [(name, word) for (name, _), word in zip(_images(tmp_path / "images", 4), WORDS[6:])]
    (tmp_path / "caps.json").write_text(json.dumps(dict(caps)))
    data.pack(str(tmp_path / "images"), str(tmp_path / "caps.json"), str(tmp_path / "tars"), 2)
    cfg = config(str(tmp_path / "tars" / "{00000..00001}.tar"), tmp_path / "out", batch_size=4, lr=0.02,
                 min_lr=0.02, warmup_steps=0, max_epoch=1, iters_per_epoch=6, log_interval=100)
    losses = T.train(cfg)["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0] / 3, losses


def _ddp_worker(rank, world, port, cfg, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        res = T.train(cfg)
        torch.save({"state": res["state"], "losses": res["losses"]}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(shards, tmp_path):
    """2 ranks x batch 2 == 1 process with 2 micro-steps of batch 2 fed rank 0's then rank 1's batches."""
    cfg = config(shards, tmp_path / "ddp", batch_size=2, max_epoch=1, iters_per_epoch=2, lr=0.01, log_interval=100)
    # fork (as DataLoader workers): no fresh interpreters importing torch, half the time of spawn
    mp.start_processes(_ddp_worker, args=(2, _free_port(), cfg, str(tmp_path / "res")), nprocs=2,
                       start_method="fork")
    r0, r1 = (torch.load(tmp_path / f"res.{r}", weights_only=True) for r in (0, 1))
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between ranks"
    ranks = [T.Batches(cfg, r, 2) for r in (0, 1)]
    interleaved = (next(ranks[i % 2]) for i in range(10 ** 6))
    one = T.train(config(shards, tmp_path / "one", batch_size=2, max_epoch=1, iters_per_epoch=2, lr=0.01,
                         grad_accum=2, log_interval=100), batches=interleaved)
    for k in one["state"]:
        assert_close(r0["state"][k], one["state"][k], f"DDP vs one process: {k}")
    assert np.allclose(r0["losses"], one["losses"], rtol=1e-5)
    assert not torch.equal(one["state"]["llama_proj.bias"], T.build_model(cfg).llama_proj.bias.detach())  # it trained


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_equals_straight_run(stage, shards, align, tmp_path):
    """Stop at step 3 (stage 1: mid-round of 2 DataLoader workers; stage 2: mid-epoch), resume, and go on past
    the end of the data epoch (16 samples in 4 batches of 4 / 8 samples in 3 batches of 3) == a straight run."""
    kw = dict(batch_size=4 if stage == 1 else 3, max_epoch=2, iters_per_epoch=3 if stage == 1 else 2, lr=0.01,
              log_interval=100, num_workers=2 if stage == 1 else 0)
    src = shards if stage == 1 else align
    straight = T.train(config(src, tmp_path / "a", stage, **kw))
    n, stop = 2 * kw["iters_per_epoch"], 3 if stage == 1 else 2
    half = T.train(config(src, tmp_path / "b", stage, stop_step=stop, **kw))
    assert half["step"] == stop
    resumed = T.train(config(src, tmp_path / "b", stage, "--resume", **kw | dict(log_interval=1)))  # may change
    assert resumed["step"] == straight["step"] == n
    assert resumed["losses"] == straight["losses"]
    for k, v in straight["state"].items():
        assert torch.equal(resumed["state"][k], v), k


def test_resume_refuses_another_run_or_file(shards, tmp_path):
    """--resume: changed options that shape the run -> one error listing each (old -> new); a projection-only
    file, a non-checkpoint or a projection of the wrong shape -> CheckpointError naming the file."""
    kw = dict(batch_size=2, max_epoch=1, iters_per_epoch=2, lr=0.01, log_interval=100)
    T.train(config(shards, tmp_path, stop_step=1, **kw))
    ckpt = tmp_path / "ckpt.pth"
    with pytest.raises(ValueError, match=r"--batch_size 2 -> 3, --lr 0.01 -> 0.02$"):
        T.train(config(shards, tmp_path, 1, "--resume", **kw | dict(batch_size=3, lr=0.02)))
    ck = torch.load(ckpt, weights_only=True)
    ck["model"]["llama_proj.bias"] = ck["model"]["llama_proj.bias"][:-1]
    torch.save(ck, ckpt)
    with pytest.raises(M.CheckpointError, match="ckpt.pth: projection outputs"):
        T.train(config(shards, tmp_path, 1, "--resume", **kw))
    torch.save({"model": ck["model"]}, ckpt)  # a projection file, as the original saves
    with pytest.raises(M.CheckpointError, match="ckpt.pth: cannot resume, no optimizer, scaler, config, step"):
        T.train(config(shards, tmp_path, 1, "--resume", **kw))
    ckpt.write_text("not a checkpoint")
    with pytest.raises(M.CheckpointError, match="ckpt.pth: not a readable PyTorch checkpoint"):
        T.train(config(shards, tmp_path, 1, "--resume", **kw))


def test_grad_checkpointing_same_result(shards, tmp_path, monkeypatch):
    """--grad_checkpointing switches on llama.py's block recomputation: same weights after 2 steps."""
    kw = dict(batch_size=2, max_epoch=1, iters_per_epoch=2, lr=0.01, log_interval=100)
    plain = T.train(config(shards, tmp_path / "a", **kw))
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    ckpt = T.train(config(shards, tmp_path / "b", grad_checkpointing=True, **kw))
    assert len(calls) == 2 * T.build_model(config(shards, "unused")).llama_model.cfg.n_layers  # 2 steps, every block
    for k, v in plain["state"].items():
        assert_close(ckpt["state"][k], v, k)


def test_bad_samples_skipped_and_counted(tmp_path):
    """A truncated JPEG, a non-image and a caption-less sample are dropped from their batches and counted."""
    photos = [p.read_bytes() for p in sorted(IMAGES.glob("*.jpg"))]
    members = []
    for i in range(5):
        caption = json.dumps({"caption": f"photo {i}"}).encode()
        members += [(f"{i}.jpg", photos[i % len(photos)]), (f"{i}.json", caption)]
    members += [("5.jpg", photos[0][:len(photos[0]) // 3]), ("5.json", b'{"caption": "truncated"}'),
                ("6.jpg", b"not a jpeg at all"), ("6.txt", b"garbage"), ("7.jpg", photos[1])]
    write_tar(tmp_path / "bad.tar", members)
    cfg = config(str(tmp_path / "bad.tar"), tmp_path / "out", batch_size=4, max_epoch=1, iters_per_epoch=2)
    res = T.train(cfg)
    assert res["step"] == 2
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert log[-1]["skipped"] == 3 and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("stage", [1, 2])
def test_no_sample_repeats_within_an_epoch(stage, shards, align):
    """Over ranks (2) and DataLoader workers (2), one data epoch holds every sample exactly once."""
    cfg = config(shards if stage == 1 else align, "unused", stage, batch_size=3, num_workers=2)
    keys = []
    for rank in (0, 1):
        b = T.Batches(cfg, rank, 2)
        mine = []
        while True:
            batch = next(b)
            if b.sources[0].epoch > 0:
                break
            mine += batch["key"]
        keys.append(mine)
    assert not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == len(set(keys[0]) | set(keys[1])) == (16 if stage == 1 else 8)


def test_mixing_datasets_per_batch(shards, tmp_path):
    """--data='A:3,B:1': every batch comes from one dataset, A for about 3 batches in 4 (seeded per batch, as
    the original's MultiIterLoader); each dataset wraps on its own; a resumed mix goes on identically."""
    caps = _images(tmp_path / "images", 4)
    (tmp_path / "caps.json").write_text(json.dumps(dict(caps)))
    data.pack(str(tmp_path / "images"), str(tmp_path / "caps.json"), str(tmp_path / "b"), 2)
    other = str(tmp_path / "b" / "{00000..00001}.tar")
    assert T.data_sources(f"{shards}:3, {other}:1") == [(shards, 3.0), (other, 1.0)]
    assert T.data_sources("a/{0,1}.tar,b.tar") == [("a/{0,1}.tar,b.tar", 1.0)]  # no ratio: one dataset
    with pytest.raises(ValueError, match="'b.tar' has none"):
        T.data_sources("a.tar:2,b.tar")
    cfg = config(f"{shards}:3,{other}:1", "unused", batch_size=2)
    batches = T.Batches(cfg)
    picks = [batches.pick(n) for n in range(4000)]
    assert abs(picks.count(0) / len(picks) - 3 / 4) < 0.02
    folders = [os.path.dirname(shards), str(tmp_path / "b")]
    for n in range(20):
        assert {os.path.dirname(k.split(".tar:")[0]) for k in next(batches)["key"]} == {folders[picks[n]]}
    assert batches.sources[1].epoch >= 1 and picks[:20].count(1) >= 3  # B (2 batches) wrapped around
    again = T.Batches(cfg)
    again.load_state_dict(batches.state_dict())
    assert [next(again)["key"] for _ in range(6)] == [next(batches)["key"] for _ in range(6)]


def test_nan_loss_stops_and_keeps_last_checkpoint(shards, tmp_path, monkeypatch):
    calls, lm_loss = [], M.MiniGPT4.lm_loss

    def poisoned(self, *a, **kw):  # the third batch's loss is NaN
        calls.append(1)
        loss, logits = lm_loss(self, *a, **kw)
        if len(calls) == 3:
            loss = loss * float("nan")
        return loss, logits
    monkeypatch.setattr(M.MiniGPT4, "lm_loss", poisoned)
    cfg = config(shards, tmp_path, batch_size=2, ckpt_interval=2, log_interval=100)
    with pytest.raises(FloatingPointError, match=r"step 2: loss is nan .*last good checkpoint: .*ckpt.pth"):
        T.train(cfg)
    ck = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert ck["step"] == 2 and len(ck["loss"]) == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth"]  # no temp file left behind (and no log line yet)


def test_input_mistakes_end_in_one_error_line(align, tmp_path, capsys):
    """main(): a bad option, data folder, --init or --weights -> `error: ...` on stderr, exit status 1, no
    traceback (one line; a missing-weights error lists the missing files under it)."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    base = ["--config", "tiny", f"--out_dir={tmp_path / 'out'}"]
    cases = {"is a directory": [f"--data={tmp_path / 'empty'}"],
             "filter_cap.json": ["--stage", "2", "--init=none", f"--data={tmp_path / 'empty'}"],
             "--stage 2 starts from the stage-1 projection": ["--stage", "2", f"--data={align}"],
             "notes.txt: not a readable PyTorch checkpoint": [f"--data={align}", f"--init={tmp_path / 'notes.txt'}"],
             "missing weights": [f"--data={align}", "--weights=/nonexistent"],
             "--batch_size must be in [1, 65536], got 0": ["--batch_size=0"],
             "--log_interval must be in [1, ": ["--log_interval=0"],
             "--num_workers must be in [0, 256], got -1": ["--num_workers=-1"],
             "--lr must be in (0, 1], got 0.0": ["--lr=0"],
             "--data is required": []}
    for message, args in cases.items():
        assert T.main(base + args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err.splitlines()[0], (args, err)
        assert "Traceback" not in err and (message == "missing weights" or len(err.splitlines()) == 1), err
    p = subprocess.run([sys.executable, "train.py", *base, "--dtype=float8"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert (p.returncode, p.stderr, p.stdout) == (1, "error: --dtype must be bfloat16, float16 or float32, "
                                                     "got 'float8'\n", "")


def test_command_line_stage1_then_stage2(shards, align, tmp_path, monkeypatch, capsys):
    """The README commands: stage 1 (a real subprocess), stage 2 from its checkpoint, then chat with sample.py
    (these two run as `__main__` in this process with the same argv, to save two interpreter start-ups)."""
    def run(*args):
        p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    def run_here(script, *args):
        monkeypatch.setattr(sys, "argv", [script, *args])
        try:
            runpy.run_path(str(ROOT / script), run_name="__main__")
        except SystemExit as e:
            assert e.code in (None, 0), capsys.readouterr()
        return capsys.readouterr().out
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    few = ["--max_epoch=1", "--iters_per_epoch=2", "--batch_size=2"]
    out = run("train.py", "--stage", "1", "--config", "tiny", f"--data={shards}", f"--out_dir={s1}", *few)
    assert "step 2 |" in out
    out = run_here("train.py", "--stage", "2", "--config", "tiny", f"--data={align}", f"--init={s1 / 'ckpt.pth'}",
                   f"--out_dir={s2}", *few)
    assert "step 2 |" in out
    for folder, stage in ((s1, 1), (s2, 2)):
        ck = torch.load(folder / "ckpt.pth", weights_only=True)
        assert {"model", "optimizer", "scaler", "config", "step", "epoch"} <= set(ck)
        assert set(ck["model"]) == {"llama_proj.weight", "llama_proj.bias"}
        assert ck["config"]["stage"] == stage and ck["step"] == 2
    m = M.MiniGPT4.from_pretrained(TINY, "vicuna-7b", proj=str(s2 / "ckpt.pth"))  # loads as the original would
    assert torch.equal(m.llama_proj.weight.detach(), ck["model"]["llama_proj.weight"])
    if (ROOT / "sample.py").exists():
        out = run_here("sample.py", "--weights", str(TINY), "--proj", str(s2 / "ckpt.pth"), "--image",
                       str(IMAGES / "cat.jpg"), "--prompt", "What is in this image?", "--greedy",
                       "--max-new-tokens", "5", "--device", "cpu")
        assert out.strip()


@pytest.mark.parametrize("switches", [["--no_qformer"], ["--proj_layers=3"], ["--train_qformer"]], ids=str)
def test_ablation_switches_train_and_load_in_sample(switches, shards, align, tmp_path, capsys):
    """Table 5's switches: the first loss == MiniGPT4.forward of the same fresh variant; only its trained
    parameters move; the checkpoint records the switches, stage 2 starts from it (the same switches; others: one
    clear error), and sample.py loads it without being told."""
    cfg = config(shards, tmp_path, 1, *switches, stop_step=2, batch_size=3, lr=0.01)
    got = T.train(cfg)
    ck = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    ab = dict(no_qformer=cfg.no_qformer, proj_layers=cfg.proj_layers, train_qformer=cfg.train_qformer)
    assert ck["ablation"] == ab and set(ck["model"]) == set(got["state"])
    fresh = M.MiniGPT4.from_pretrained(TINY, "vicuna-7b", proj=False, ablation=ab)
    torch.manual_seed(cfg.seed)
    fresh.reset_projection()
    before = fresh.trainable_state_dict()
    assert set(before) == set(ck["model"]) and all(not torch.equal(before[k], v) for k, v in ck["model"].items())
    batch = next(T.Batches(cfg))
    with torch.no_grad():
        assert_close(torch.tensor(got["losses"][0]), fresh(batch["image"], batch["text"], max_txt_len=cfg.max_txt_len))
    s2 = config(align, tmp_path / "s2", 2, *switches, init=str(tmp_path / "ckpt.pth"), stop_step=1, batch_size=2)
    assert T.train(s2)["step"] == 1
    with pytest.raises(M.CheckpointError, match="give the switches it was trained with"):
        T.train(config(align, tmp_path / "s2", 2, init=str(tmp_path / "ckpt.pth"), stop_step=1, batch_size=2))
    import sample
    rc = sample.main(["--weights", str(TINY), "--proj", str(tmp_path / "ckpt.pth"), "--image", str(IMAGES / "cat.jpg"),
                      "--prompt", "What is it?", "--greedy", "--max-new-tokens", "3", "--device", "cpu"])
    assert rc == 0 and capsys.readouterr().out.strip()
