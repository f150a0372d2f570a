"""run_dir.py through train.py's command line (tiny fixture model, CPU): a used out_dir needs --resume or
--overwrite, log.jsonl holds one run, a finished run says so, stage 2 needs --init, the banner and saves in words."""
import json

import train as T
from conftest import FIXTURES

ALIGN = FIXTURES / "cc_sbu_align"


def main(capsys, out_dir, *extra):
    rc = T.main(["--stage", "2", "--config", "tiny", f"--data={ALIGN}", f"--out_dir={out_dir}", "--max_epoch=1",
                 "--iters_per_epoch=2", "--batch_size=2", *extra])
    out, err = capsys.readouterr()
    return rc, out, err


def log_steps(out_dir):
    return [json.loads(line)["step"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_a_used_out_dir_needs_resume_or_overwrite(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc, out, err = main(capsys, out_dir, "--init=none")
    assert rc == 0, err
    assert f"saved {out_dir / 'ckpt.pth'} (step 2)" in out
    before = (out_dir / "ckpt.pth").read_bytes(), (out_dir / "log.jsonl").read_text()
    rc, out, err = main(capsys, out_dir, "--init=none", "--seed=7")
    assert rc == 1 and err.splitlines() == [f"error: --out_dir {out_dir} already holds a run (ckpt.pth, log.jsonl): "
                                            "continue it with --resume, replace it with --overwrite, or choose "
                                            "another --out_dir"]
    assert ((out_dir / "ckpt.pth").read_bytes(), (out_dir / "log.jsonl").read_text()) == before  # untouched
    rc, out, err = main(capsys, out_dir, "--resume")
    assert rc == 0 and "this run is finished (step 2 of 2): nothing to do" in out
    assert log_steps(out_dir) == [1, 2]
    rc, out, err = main(capsys, out_dir, "--init=none", "--seed=7", "--overwrite")
    assert rc == 0 and "--overwrite: deleted" in out
    assert log_steps(out_dir) == [1, 2]  # the new run's lines only
    assert (out_dir / "ckpt.pth").read_bytes() != before[0]


def test_resume_drops_log_lines_past_the_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(capsys, out_dir, "--init=none", "--stop_step=1")[0] == 0
    with open(out_dir / "log.jsonl", "a") as f:  # a crash after logging step 2 but before its checkpoint
        f.write(json.dumps({"step": 2, "loss": 9.0}) + "\n")
    rc, out, err = main(capsys, out_dir, "--resume")
    assert rc == 0, err
    assert log_steps(out_dir) == [1, 2] and json.loads((out_dir / "log.jsonl").read_text().splitlines()[1])["loss"] != 9.0
    assert "continuing at step 1" in out


def test_resume_without_a_checkpoint_is_one_line(tmp_path, capsys):
    rc, out, err = main(capsys, tmp_path / "run", "--resume")
    assert rc == 1 and err == f"error: --resume: there is no {tmp_path / 'run' / 'ckpt.pth'} to continue (start without --resume)\n"


def test_stage2_needs_init_and_the_banner_reads_in_words(tmp_path, capsys):
    rc, out, err = main(capsys, tmp_path / "a")
    assert rc == 1 and "--init=none" in err and not (tmp_path / "a").exists()
    rc, out, err = main(capsys, tmp_path / "b", f"--init={FIXTURES / 'reference' / 'tiny' / 'minigpt4_proj.pth'}")
    assert rc == 0, err
    banner = out.split("\nstep 1")[0]
    for words in ["starting: stage 2 of vicuna-7b (LLM 2 layers x 64", "projection from " + str(FIXTURES),
                  "trainable parameters: 4,160 (llama_proj; everything else frozen)",
                  "batch: 2 per process x 1 micro-steps x 1 process(es) = 2 samples per step", "steps: 0 -> 2",
                  f"data: {ALIGN}"]:
        assert words in banner, (words, banner)
