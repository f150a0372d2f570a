"""
What train.py does with its out_dir, so that no run is lost or mixed up by accident:
- an out_dir that already holds a run (ckpt.pth or log.jsonl) is refused unless --resume (continue it) or
  --overwrite (delete it first) is given;
- on --resume, log.jsonl keeps only the lines up to the checkpoint's step, so the log is one run's, in order;
- stage 2 needs --init (the stage-1 projection); --init=none trains from a random projection on purpose;
- the start banner says, in words, what is about to happen.
"""
import json
import os


def check_init(cfg):
    """--init=none -> "" (a fresh projection, deliberately); stage 2 without --init and not resuming: refused."""
    if cfg.init.lower() == "none":
        cfg.init = ""
    elif cfg.stage == 2 and not cfg.init and not cfg.resume:
        raise ValueError("--stage 2 starts from the stage-1 projection: give --init=out/stage1/ckpt.pth "
                         "(or --init=none to train stage 2 from a random projection on purpose)")
    return cfg


def prepare(cfg, master=True):
    """Check (and with --overwrite, rank 0 clears) cfg.out_dir before anything is written -> the checkpoint path."""
    ckpt, log = os.path.join(cfg.out_dir, "ckpt.pth"), os.path.join(cfg.out_dir, "log.jsonl")
    held = [p for p in (ckpt, log) if os.path.isfile(p)]
    if cfg.resume and not os.path.isfile(ckpt):
        raise ValueError(f"--resume: there is no {ckpt} to continue (start without --resume)")
    if held and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"--out_dir {cfg.out_dir} already holds a run ({', '.join(map(os.path.basename, held))}):"
                             " continue it with --resume, replace it with --overwrite, or choose another --out_dir")
        if master:
            for p in held:
                os.remove(p)
            print(f"--overwrite: deleted {', '.join(held)}")
    return ckpt  # train.py then creates out_dir and proves it writable (checks.writable_dir)


def trim_log(cfg, step):
    """--resume at `step`: drop log lines past it (logged after the last checkpoint, about to be redone)."""
    path = os.path.join(cfg.out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


def banner(cfg, model, n_trained, step, end, world):
    """The start of a run in words."""
    llm = model.llama_model.cfg
    what = f"continuing at step {step}" if step else "starting"
    init = cfg.init or "a fresh random projection"
    return (f"{what}: stage {cfg.stage} of {cfg.model} (LLM {llm.n_layers} layers x {llm.dim} from "
            f"{cfg.llm or cfg.weights}), projection from {init}\n"
            f"  trainable parameters: {n_trained:,} (llama_proj; everything else frozen)\n"
            f"  batch: {cfg.batch_size} per process x {cfg.grad_accum} micro-steps x {world} process(es) = "
            f"{cfg.batch_size * cfg.grad_accum * world} samples per step\n"
            f"  steps: {step} -> {end} (lr {cfg.lr:g}, warmup {cfg.warmup_steps})\n"
            f"  data: {cfg.data or '(none)'}\n  output: {cfg.out_dir}/ckpt.pth, {cfg.out_dir}/log.jsonl"
            + (f"\n  this run is finished (step {step} of {end}): nothing to do; to go on, raise --max_epoch"
               if step >= end else ""))
