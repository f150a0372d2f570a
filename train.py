"""
Train MiniGPT-4's projection `llama_proj` (the only trained weights) with the original two-stage recipe.

    python train.py --stage 1 --data='laion/{00000..10488}.tar' --out_dir=out/stage1      # one GPU
    python train.py --stage 1 --data='laion/{00000..10488}.tar:115,cc_sbu/{00000..01255}.tar:14'  # mixed per batch
    torchrun --standalone --nproc_per_node=4 train.py --stage 1 --data=...                # 4 GPUs
    python train.py --stage 2 --data=cc_sbu_align --init=out/stage1/ckpt.pth --out_dir=out/stage2
    python train.py --stage 1 --config tiny --data=... --out_dir=out/tiny1                # CPU, seconds
    ... --resume  (continue out_dir/ckpt.pth exactly where it stopped)  ... --overwrite  (start out_dir afresh)

Options are the fields of TrainConfig, given as --key=value (or --key value; a bare --flag sets a bool);
they apply on top of the stage preset and then the --config preset. Outputs: out_dir/ckpt.pth (the
original's checkpoint format: {"model": {"llama_proj.weight", "llama_proj.bias"}, "optimizer", "scaler",
"config", "step", "epoch"} plus our own "rng", "data" and "loss" keys) and out_dir/log.jsonl (run_dir.py)."""
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.distributed as dist

import checks
import data as D
import run_dir
from checkpoint import CheckpointError, read_checkpoint
from flops import device_peaks, train_flops  # MFU (bench.py imports them from here too)

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures", "reference", "tiny")


@dataclass
class TrainConfig:
    stage: int = 1
    model: str = "vicuna-7b"        # model.py preset: vicuna-7b | vicuna-13b | llama2-7b (its stage-2 template)
    weights: str = "weights"        # folder laid out as model.py's find_weights expects (vit, qformer, llm)
    vit: str = ""                   # per-file overrides of the weights folder
    qformer: str = ""
    llm: str = ""
    init: str = ""                  # projection to start from (stage 2: the stage-1 ckpt.pth); "" = random
    no_qformer: bool = False        # Table 5 ablations (model.ablate): ViT tokens straight to the projection,
    proj_layers: int = 1            # Linear-GELU-Linear-GELU-Linear with 3,
    train_qformer: bool = False     # the Q-Former trained with the projection
    # data: stage 1 tar shards (brace ranges, globs, ','-lists), stage 2 cc_sbu_align/; 'A:3,B:1' mixes per batch
    data: str = ""
    max_txt_len: int = 32
    num_workers: int = 4
    # optimisation: the original recipe (train_configs/minigpt4_stage1_pretrain.yaml)
    batch_size: int = 64            # per GPU and micro-step
    grad_accum: int = 1             # micro-steps per optimizer step
    max_epoch: int = 4
    iters_per_epoch: int = 5000     # optimizer steps per "epoch" (the original's epochs are step counts)
    warmup_steps: int = 5000
    warmup_lr: float = 1e-6
    lr: float = 1e-4
    min_lr: float = 8e-5
    weight_decay: float = 0.05      # on matrices only: no decay on biases, norms and other 1-D params
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 0.0          # 0 = off (the original does not clip)
    dtype: str = "bfloat16"         # autocast on GPU: bfloat16 | float16 (+ GradScaler, as the original) | float32
    grad_checkpointing: bool = False  # recompute the LLM blocks in backward (bigger batches, ~1/3 slower)
    quant: str = ""                 # int8 | int4: the frozen LLM weight-only quantized (quant.py); "" = cfg.dtype
    # run
    device: str = ""                # "" = cuda if available, else cpu
    out_dir: str = "out/stage1"
    seed: int = 42
    log_interval: int = 50
    ckpt_interval: int = 1000       # also one at the end
    stop_step: int = 0              # stop (with a checkpoint) at this step, keeping the schedule; 0 = the end
    resume: bool = False            # continue out_dir/ckpt.pth: weights, optimizer, scaler, step, RNG, data
    overwrite: bool = False         # delete out_dir's ckpt.pth and log.jsonl first (else a used out_dir is refused)
    peak_flops: float = 0.0         # per GPU, for MFU; 0 = by GPU name (H100/H200/A100 bf16 dense)


STAGES = {  # the original yaml files; stage 2 starts from the stage-1 projection (--init)
    1: dict(),
    2: dict(batch_size=12, max_epoch=5, iters_per_epoch=200, warmup_steps=200, lr=3e-5, min_lr=1e-5,
            max_txt_len=160, out_dir="out/stage2"),
}
CONFIGS = {  # `tiny`: the random tiny fixture model on the CPU, a few seconds
    "tiny": dict(model="vicuna-7b", weights=TINY, device="cpu", dtype="float32", batch_size=4, num_workers=0,
                 max_epoch=2, iters_per_epoch=4, warmup_steps=2, lr=1e-3, min_lr=1e-4, log_interval=1,
                 ckpt_interval=4),
    # `shapes`: the miniature (README): shapes.py's data, pretrain_vision.py's tower, SmolLM2-135M, both stages in
    # about 15 minutes on 2 CPU cores. Batch 8: many small updates learn where few large ones did not; short runs
    # need a larger lr than the original's 1e-4 / 3e-5. Stage 2 mixes descriptions and questions 1:4 per batch.
    "shapes": dict(model="shapes", weights="weights/shapes", device="cpu", dtype="float32", num_workers=0,
                   log_interval=10, ckpt_interval=100, warmup_steps=10, max_epoch=1, stages={
                       1: dict(data="data/shapes/stage1/*.tar", batch_size=8, iters_per_epoch=300, lr=3e-3, min_lr=3e-4),
                       2: dict(data="data/shapes/align:1,data/shapes/qa:4", init="out/shapes-stage1/ckpt.pth",
                               batch_size=8, iters_per_epoch=500, lr=3e-3, min_lr=3e-4, max_txt_len=96)}),
}

RESUME_MAY_CHANGE = ("stop_step", "log_interval", "ckpt_interval", "device", "out_dir", "resume",  # --resume:
                     "overwrite", "weights", "vit", "qformer", "llm", "init", "grad_checkpointing", "peak_flops")  # rest fixed
LIMITS = dict(stage=(1, 2), max_txt_len=(1, 2**16), num_workers=(0, 256), batch_size=(1, 2**16), grad_accum=(1, 2**16),
              max_epoch=(1, 10**6), iters_per_epoch=(1, 10**9), warmup_steps=(0, 10**9), warmup_lr=(0, 1), lr=(0, 1, "open"),
              min_lr=(0, 1), weight_decay=(0, 10), beta1=(0, 0.999999), beta2=(0, 0.999999), grad_clip=(0, 1e6),
              seed=(0, checks.SEED_MAX - 2**20), log_interval=(1, 10**9), ckpt_interval=(1, 10**9), stop_step=(0, 10**15),
              peak_flops=(0, 1e20))  # every option's domain (checks.check_fields), also for a resumed config
BOOLS = {"true": True, "1": True, "false": False, "0": False}


def parse_args(argv):
    """argv -> TrainConfig: defaults, then the --stage preset, then the --config preset, then --key=value.
    A bad option or value raises ValueError."""
    opts, rest = {}, list(argv)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: options are --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:  # --key value, or a bare --flag (true)
            value = rest.pop(0) if rest and not rest[0].startswith("--") else "true"
        opts[key.replace("-", "_")] = value
    stage, preset = opts.pop("stage", "1"), opts.pop("config", None)
    if stage not in ("1", "2") or (preset is not None and preset not in CONFIGS):
        raise ValueError(f"--stage must be 1 or 2 (got {stage}), --config one of {list(CONFIGS)} (got {preset})")
    opts_preset = dict(CONFIGS.get(preset, {}))  # a preset may set options per stage under "stages"
    per_stage = opts_preset.pop("stages", {}).get(int(stage), {})
    cfg = TrainConfig(stage=int(stage), **(STAGES[int(stage)] | opts_preset | per_stage))
    if preset:
        cfg.out_dir = f"out/{preset}-stage{stage}"
    types = {f.name: f.type for f in fields(TrainConfig)}
    for key, value in opts.items():
        t = types.get(key)
        if t is None:
            raise ValueError(f"unknown option --{key} (known: {', '.join(types)})")
        try:
            setattr(cfg, key, BOOLS[value.lower()] if t is bool else t(value))
        except (KeyError, ValueError):
            raise ValueError(f"--{key} expects {t.__name__}, got {value!r}") from None
    checks.check_fields(cfg, "--{}", LIMITS)
    if cfg.dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"--dtype must be bfloat16, float16 or float32, got {cfg.dtype!r}")
    if cfg.device:
        checks.device(cfg.device)  # cpu or an existing cuda[:N], else one line naming --device
    return cfg


# ---------------------------------------------------------------------------------------------- schedule
def get_lr(cfg, step):
    """The original LinearWarmupCosineLRScheduler (minigpt4/common/optims.py) before optimizer step `step`:
    linear from warmup_lr to lr over warmup_steps, then a cosine from lr to min_lr over all max_epoch *
    iters_per_epoch steps from step 0, warmup included (stage 1: ~1e-4 to 9.7e-5 at step 5000). The original
    counts micro-steps; we count optimizer steps (the same with grad_accum=1)."""
    if step < cfg.warmup_steps:
        return min(cfg.lr, cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * step / max(cfg.warmup_steps, 1))
    total = cfg.max_epoch * cfg.iters_per_epoch
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / total))


def build_optimizer(cfg, model):
    """AdamW over the trainable parameters; weight decay on matrices only (not biases, norms, 1-D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


# ------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, model, optimizer, scaler, cfg, step, losses, data_state, rank, world):
    """Every rank calls it: rank 0 writes the RNG and data states of all ranks, atomically (a temp file, then
    os.replace: a crash never leaves half a file). The CPU torch RNG is the only global one training draws from
    (the DataLoader's worker seeds; data.py and Batches seed their own generators; no dropout)."""
    per_rank = [(torch.get_rng_state(), data_state)]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, (torch.get_rng_state(), data_state))
    if rank == 0:
        ckpt = {"model": model.trainable_state_dict(), "ablation": model.ablation, "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "config": asdict(cfg), "step": step,
                "epoch": step // cfg.iters_per_epoch, "loss": losses,
                "rng": [rng for rng, _ in per_rank], "data": [data for _, data in per_rank]}
        checks.atomic_save(ckpt, path)  # temp + fsync + rename; on failure the last good file stays, one line
        print(f"saved {path} (step {step})")


def load_checkpoint(path, model, optimizer, scaler, cfg, rank, world):
    """--resume: put back what save_checkpoint wrote -> (step, losses, this rank's data state). Refuses a file
    without those keys, one saved by another number of processes, or with a changed option that shapes the
    run (all but RESUME_MAY_CHANGE): one error listing each difference."""
    ck = read_checkpoint(path)  # weights_only; a missing or unreadable file -> CheckpointError naming it
    checks.train_checkpoint(ck, path, optimizer, cfg.max_epoch * cfg.iters_per_epoch, world)  # types, shapes
    changed = [f"--{key} {ck['config'].get(key)!r} -> {new!r}" for key, new in asdict(cfg).items()
               if key not in RESUME_MAY_CHANGE and ck["config"].get(key) != new]
    if changed:
        raise ValueError(f"{path} was saved with other options; resume with the same or start a new out_dir: "
                         + ", ".join(changed))
    model.load_projection(path)  # exactly llama_proj.{weight,bias}, shapes checked
    try:
        optimizer.load_state_dict(ck["optimizer"])
        scaler.load_state_dict(ck["scaler"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: optimizer or scaler state does not fit: {e}") from None
    torch.set_rng_state(ck["rng"][rank])
    return ck["step"], list(ck["loss"]), ck["data"][rank]


# ------------------------------------------------------------------------------------------------- data
def data_sources(spec):
    """--data -> [(dataset, ratio)]: 'laion/{00000..10488}.tar:115,cc_sbu/{00000..01255}.tar:14' mixes two
    datasets; without any :RATIO the whole value is one dataset (a ','-list of shards included)."""
    pieces = [p.strip() for p in re.split(r",(?![^{]*\})", spec)]
    found = [re.fullmatch(r"(.+):(\d+(?:\.\d*)?)", p) for p in pieces]
    if not any(found):
        return [(spec, 1.0)]
    bad = [p for p, m in zip(pieces, found) if not m or not 0 < float(m.group(2)) < 1e9]
    if bad:
        raise ValueError(f"--data: mixing datasets needs a :RATIO in (0, 1e9) after each one; {bad[0]!r} has none")
    return [(m.group(1), float(m.group(2))) for m in found]


class Source:
    """One dataset's endless batches on this rank, data epoch after data epoch (the original's "epochs" are
    step counts: the data wraps around). Stage 1: data.ShardDataset (shards split over ranks and workers, exact
    resume with data.track); stage 2: data.AlignDataset, a seeded permutation per epoch split over the ranks
    (drop_last: no sample twice). Skips batches of only bad samples. Batches saves/restores (epoch, pos)."""

    def __init__(self, cfg, spec, seed, rank=0, world=1, size=224):
        self.cfg, self.spec, self.seed, self.rank, self.world = cfg, spec, seed, rank, world
        if cfg.stage == 1:
            self.ds = D.ShardDataset(spec, seed=seed, rank=rank, world_size=world, size=size)
        else:
            self.ds = D.AlignDataset(spec, seed=seed, size=size)
        self.epoch, self.pos, self.it, self.skipped = 0, None, None, 0

    def _loader(self):
        self.ds.set_epoch(self.epoch)
        sampler = None
        if self.cfg.stage == 2:  # a seeded permutation per epoch, each rank every world-th index
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            n = len(self.ds) // self.world * self.world
            idx = torch.randperm(len(self.ds), generator=g)[:n][self.rank::self.world].tolist()
            self.pos = self.pos or {"epoch": self.epoch, "batches": 0}
            sampler = idx[self.pos["batches"] * self.cfg.batch_size:]
        return iter(torch.utils.data.DataLoader(self.ds, batch_size=self.cfg.batch_size, sampler=sampler,
                                                num_workers=self.cfg.num_workers, collate_fn=D.collate))

    def __next__(self):
        empty_epochs = 0
        while True:
            if self.it is None:
                self.it = self._loader()
            batch = next(self.it, None)
            if batch is None:  # the end of this data epoch: on to the next
                empty_epochs += 1
                if empty_epochs > 1:
                    raise ValueError(f"rank {self.rank}: no usable samples in --data={self.spec}")
                self.epoch, self.pos, self.it = self.epoch + 1, None, None
                continue
            if self.cfg.stage == 1:
                self.pos = D.track(self.pos, batch)
            else:
                self.pos["batches"] += 1
            for e in batch["errors"][:max(0, 5 - self.skipped)]:  # the first few, then only the count
                print(f"rank {self.rank}: skipped a bad sample: {e}", file=sys.stderr)
            self.skipped += batch["skipped"]
            if batch["text"]:
                return batch


class Batches:
    """This rank's training batches from one dataset, or from several mixed PER BATCH by --data's ratios, as
    the original's MultiIterLoader: each batch comes from one dataset, drawn with probability ratio / sum
    (seeded by seed, rank and batch number). Images at the model's size. state_dict(): where to resume."""

    def __init__(self, cfg, rank=0, world=1, size=224):
        if not cfg.data:
            raise ValueError("--data is required (stage 1: tar shards, stage 2: the cc_sbu_align folder)")
        specs = data_sources(cfg.data)
        self.sources = [Source(cfg, spec, cfg.seed + i, rank, world, size) for i, (spec, _) in enumerate(specs)]
        self.ratios, self.seed, self.rank, self.drawn = [r for _, r in specs], cfg.seed, rank, 0

    def pick(self, n):  # the dataset of batch n on this rank
        return random.Random(f"{self.seed}/{self.rank}/{n}").choices(range(len(self.sources)), self.ratios)[0]

    def __next__(self):
        self.drawn += 1
        return next(self.sources[self.pick(self.drawn - 1)])

    def state_dict(self):
        return {"drawn": self.drawn, "sources": [{"epoch": s.epoch, "pos": s.pos} for s in self.sources]}

    def load_state_dict(self, st):
        self.drawn = st["drawn"]
        for s, saved in zip(self.sources, st["sources"]):
            s.epoch, s.pos, s.it = saved["epoch"], saved["pos"], None
            if s.cfg.stage == 1 and s.pos is not None:
                s.ds.load_state_dict(s.pos)


# ------------------------------------------------------------------------------------------------ model
def build_model(cfg, device=None):
    """The frozen ViT, Q-Former and LLM in cfg.dtype (GPU; CPU: fp32; --quant: the LLM's Linears int8/int4) on
    `device`; llama_proj in fp32 (AdamW's master weights): from --init, else fresh from cfg.seed (as the original)."""
    from model import MiniGPT4
    device = torch.device(device or cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if device.type == "cpu" else getattr(torch, cfg.dtype)
    ablation = dict(no_qformer=cfg.no_qformer, proj_layers=cfg.proj_layers, train_qformer=cfg.train_qformer)
    model = MiniGPT4.from_pretrained(cfg.weights, cfg.model, vit=cfg.vit or None, qformer=cfg.qformer or None,
                                     llm=cfg.llm or None, proj=cfg.init or False, dtype=dtype, device=device,
                                     ablation=ablation, quant=cfg.quant)  # quant "": none
    for p in model.parameters():  # fp32 master weights: llama_proj (+ the Q-Former with --train_qformer)
        p.data = p.data.float() if p.requires_grad else p.data
    if not cfg.init:  # proj=False: a fresh projection; re-drawn from cfg.seed, identical on every rank
        torch.manual_seed(cfg.seed)
        model.reset_projection()
    model.llama_model.gradient_checkpointing = cfg.grad_checkpointing
    return model.eval()  # the frozen parts run in eval mode, as in the original; llama_proj has no dropout


# ------------------------------------------------------------------------------------------------- train
def train(cfg, batches=None):
    """Run (or, with cfg.resume, continue) training -> {"losses": mean loss per step, "state": llama_proj's
    state dict, "step"}. `batches` replaces Batches (tests feed one process the global batch of two ranks)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = 0, 1
    if "RANK" in os.environ:  # torchrun: one process per GPU (NCCL), or per CPU process (gloo) in the tests
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    device, master = torch.device(device), rank == 0
    amp = device.type == "cuda" and cfg.dtype != "float32"
    autocast = torch.autocast(device.type, dtype=getattr(torch, cfg.dtype), enabled=amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and cfg.dtype == "float16")
    model = build_model(cfg, device)
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(cfg.seed + rank)
    if batches is None:
        batches = Batches(cfg, rank, world, model.cfg.vit.img_size)
    ckpt_path, step, losses = run_dir.prepare(cfg, master), 0, []  # a used out_dir: --resume or --overwrite
    checks.writable_dir(cfg.out_dir)  # before the first step: a probe file written, fsynced, removed
    if cfg.resume:  # weights, optimizer, scaler, step, RNG and data position of out_dir/ckpt.pth
        step, losses, data_state = load_checkpoint(ckpt_path, model, optimizer, scaler, cfg, rank, world)
        run_dir.trim_log(cfg, step) if master else None  # the log lines past the checkpoint are redone
        if isinstance(batches, Batches):
            batches.load_state_dict(data_state)
    end = min(cfg.stop_step or cfg.max_epoch * cfg.iters_per_epoch, cfg.max_epoch * cfg.iters_per_epoch)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = cfg.peak_flops or 1e12 * (device_peaks(gpu)[0] or 0)  # one GPU's bf16 FLOP/s (0: no MFU)
    parts = (model.cfg.vit, model.cfg.qformer, model.llama_model.cfg)  # qformer None: llama2 / no_qformer
    trained = [p for p in model.parameters() if p.requires_grad]
    names = ("loss", "samples", "tokens", "flops", "skipped")  # what the log sums, over micro-steps and ranks
    interval, logged_step, t0, skipped = dict.fromkeys(names, 0), step, time.time(), 0  # this log interval
    if master:
        print(run_dir.banner(cfg, model, sum(p.numel() for p in model.llama_proj.parameters()), step, end, world))
    while step < end:
        lr = get_lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sums = dict.fromkeys(names, 0)
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            with autocast:  # MiniGPT4.forward's three calls, keeping the mask and the targets for the log
                img_embeds, _ = model.encode_img(batch["image"].to(device))
                embeds, mask, labels = model.build_inputs(img_embeds, batch["text"], batch.get("instruction"),
                                                          max_txt_len=cfg.max_txt_len)  # stage 2: + template
                loss, logits = model.lm_loss(embeds, mask, labels)  # logits: (targets, V)
            scaler.scale(loss / cfg.grad_accum).backward()
            (B, T), targets = mask.shape, logits.shape[0]
            sums["loss"] += loss.item() / cfg.grad_accum
            sums["samples"] += B
            sums["tokens"] += mask.sum().item()  # real (not padding) LLM tokens
            sums["flops"] += B * sum(train_flops(*parts, T, model.cfg.group, targets / B, **model.ablation).values())
            sums["skipped"] += batch["skipped"]
        if world > 1:  # data parallel: average the trained weights' gradients over the ranks
            for p in trained:
                dist.all_reduce(p.grad)
                p.grad /= world
            total = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(total)  # the log's sums over the ranks; also how every rank learns of a NaN
            sums = dict(zip(names, total.tolist()))
        loss_val = sums["loss"] / world
        if not math.isfinite(loss_val):  # stop before the update: the weights and the last checkpoint stay good
            last = f"last good checkpoint: {ckpt_path}" if os.path.isfile(ckpt_path) else "no checkpoint yet"
            raise FloatingPointError(f"step {step}: loss is {loss_val} (not finite); stopped without updating "
                                     f"the weights; {last}. Try a lower lr, or --dtype=bfloat16 rather than float16")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss_val)
        sums["loss"] = loss_val
        for name in names:
            interval[name] += sums[name]
        skipped += int(sums["skipped"])
        if step % cfg.log_interval == 0 or step == end:
            dt, n = time.time() - t0, step - logged_step
            rec = {"step": step, "epoch": (step - 1) // cfg.iters_per_epoch, "loss": interval["loss"] / n, "lr": lr,
                   "samples_per_s": interval["samples"] / dt, "tokens_per_s": interval["tokens"] / dt,
                   "skipped": skipped, "eta_s": dt / n * (end - step)}  # at this interval's pace
            if peak:
                rec["mfu"] = interval["flops"] / dt / (peak * world)
            if device.type == "cuda":
                rec["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if master:
                print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
                checks.append_line(os.path.join(cfg.out_dir, "log.jsonl"), json.dumps(rec))  # never via a link/FIFO
            interval, logged_step, t0 = dict.fromkeys(names, 0), step, time.time()
        if step % cfg.ckpt_interval == 0 or step == end:
            data_state = batches.state_dict() if isinstance(batches, Batches) else None
            save_checkpoint(ckpt_path, model, optimizer, scaler, cfg, step, losses, data_state, rank, world)
    return {"losses": losses, "state": model.trainable_state_dict(), "step": step}


def main(argv=None):
    """The command line -> exit status: an input mistake (bad option, data, weights, checkpoint) or a NaN loss
    prints one `error: ...` line, no traceback, and returns 1."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        defaults = "\n".join(f"  --{f.name}={f.default}" for f in fields(TrainConfig))
        print(f"{__doc__}\noptions (stage-1 defaults; --stage 2 and --config tiny change some):\n{defaults}")
        return 0
    try:
        train(run_dir.check_init(parse_args(argv)))
    except (CheckpointError, D.ImageError, ValueError, OSError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
