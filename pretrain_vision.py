"""
The miniature's vision tower: a small EVA-style ViT, ln_vision and a Q-Former (the project's own vit.py and
qformer.py, model.py's "shapes" preset), pretrained on the shapes world, then frozen for both MiniGPT-4 stages.

    python pretrain_vision.py --out weights/shapes           # about 8 minutes on 2 CPU cores

Why: MiniGPT-4 starts from EVA-CLIP and BLIP-2, pretrained on hundreds of millions of images; nothing like that
can be downloaded offline, and a random tower does not do: the image-dependent part of a random Q-Former's
output is a few percent of it, and a projection trained on it learns captions that ignore the image. So this
script gives the tower what BLIP-2's pretraining gives the real one: query outputs that carry what is in the
image. It is supervised (the shapes world knows its scenes), in the BLIP-2 layout: the ViT sees the image,
the Q-Former's queries read it through cross-attention. Query p (p < 9) answers for place p of the 3x3 grid
(the colour, shape and size there, or "empty", and which place it is); query 9 answers for the whole image
(how many shapes, which background). The heads are linear and shared by the 9 place queries, so every place
is written in the same code, one that a single Linear (llama_proj) can map into the LLM's word space. The
heads are thrown away; weights/shapes/ gets the tower in the original file formats (eva_vit_g.pth,
blip2_pretrained.pth) with a config.json of its sizes, which model.py's loading reads like any release.

What made it learn (measured on the validation split; before, shape stayed at chance for 600 steps while
colour reached 100%):
- patches that are the places: 56-pixel patches on 168-pixel images, so each place is one ViT token, and a
  linear function of one patch can tell its shape (a linear probe on a place's raw pixels: 100% on held-out
  places). With 14- or 28-pixel patches a shape falls across patches and the tower did not learn it in time.
- an initialisation that keeps the image signal: positions at unit scale, query p starting as the position of
  patch p, and identity query/key/value/output weights in every cross-attention, so that from the first step
  query p looks at place p and passes on what is there (at BLIP's 0.02 init the attention is uniform: every
  query sees the average of all places);
- cross-attention in every Q-Former layer, and empty places weighted 1/3 in the loss (two places in three are
  empty).
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checks
import shapes as S
from data import MEAN, STD
from model import MiniGPT4Config
from qformer import PREFIX, QFormer
from vit import VisionTransformer

HEADS = {"colour": len(S.COLOURS) + 1, "shape": len(S.SHAPES) + 1, "size": len(S.SIZES) + 1, "place": 9,
         "count": 3, "background": len(S.BACKGROUNDS)}  # + 1: "empty" is class 0
EMPTY_WEIGHT = 1 / 3


def pin_threads():
    """One torch thread per core this process may use: on a shared machine more threads than cores made steps
    10-20x slower."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def pixels(images):
    """PIL images -> (B, 3, H, W) normalised as data.preprocess does."""
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])).permute(0, 3, 1, 2)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def labels(scenes):
    """Scenes -> {head: (B, 9) place labels (0 = empty) or (B,) image labels}."""
    out = {k: torch.zeros(len(scenes), 9, dtype=torch.long) for k in ("colour", "shape", "size")}
    for b, s in enumerate(scenes):
        for o in s["objects"]:
            p = S.PLACES.index(o["place"])
            out["colour"][b, p] = 1 + list(S.COLOURS).index(o["colour"])
            out["shape"][b, p] = 1 + S.SHAPES.index(o["shape"])
            out["size"][b, p] = 1 + list(S.SIZES).index(o["size"])
    out["count"] = torch.tensor([len(s["objects"]) - 1 for s in scenes])
    out["background"] = torch.tensor([list(S.BACKGROUNDS).index(s["background"]) for s in scenes])
    return out


class Tower(nn.Module):
    """ViT -> ln_vision -> Q-Former, as MiniGPT-4 runs them, plus the pretraining heads."""

    def __init__(self, cfg):
        super().__init__()
        self.visual_encoder = VisionTransformer(cfg.vit)
        self.ln_vision = nn.LayerNorm(cfg.vit.width, eps=cfg.ln_vision_eps)
        self.Qformer = QFormer(cfg.qformer)
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.qformer.hidden_size, n) for k, n in HEADS.items()})
        for m in self.modules():  # BLIP's init: truncated normal 0.02 for Linear weights, zero biases
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():  # an initialisation that keeps the image signal (see the module docstring)
            pos = self.visual_encoder.pos_embed.normal_(0, 1.0)  # unit scale: the places stand out
            self.Qformer.query_tokens[0, :9] = pos[0, 1:10]  # query p starts as the position of patch p = place p
            self.Qformer.query_tokens[0, 9] = pos[0, 0]  # the whole-image query as the CLS position
            eye = torch.eye(cfg.qformer.hidden_size)
            for layer in self.Qformer.encoder.layer:  # cross-attention: query p matches patch p, its content passes
                att = layer.crossattention
                for lin in (att.self.query, att.self.key, att.self.value, att.output.dense):
                    lin.weight.copy_(eye)

    def forward(self, x):  # (B, 3, H, W) -> {head: logits}
        q = self.Qformer(self.ln_vision(self.visual_encoder(x)))  # (B, 10, H)
        places, whole = q[:, :9], q[:, 9]
        out = {k: self.heads[k](places) for k in ("colour", "shape", "size", "place")}  # (B, 9, n)
        out.update({k: self.heads[k](whole) for k in ("count", "background")})  # (B, n)
        return out


def loss_fn(out, y):
    total = 0.0
    for k in ("colour", "shape", "size"):
        w = torch.where(y[k] == 0, EMPTY_WEIGHT, 1.0)
        total = total + (F.cross_entropy(out[k].flatten(0, 1), y[k].flatten(), reduction="none") * w.flatten()).sum() / w.sum()
    place = torch.arange(9).expand(out["place"].shape[0], 9)
    total = total + F.cross_entropy(out["place"].flatten(0, 1), place.flatten())
    return total + F.cross_entropy(out["count"], y["count"]) + F.cross_entropy(out["background"], y["background"])


@torch.no_grad()
def evaluate(tower, scenes, batch=100):
    """Accuracy of each head on these scenes: colour/shape/size at the occupied places, "empty" at the empty ones."""
    tower.eval()
    hits = {k: [0, 0] for k in ("colour", "shape", "size", "empty", "place", "count", "background")}
    for i in range(0, len(scenes), batch):
        sc = scenes[i:i + batch]
        out, y = tower(pixels([S.render(s) for s in sc])), labels(sc)
        occupied = y["shape"] > 0
        for k in ("colour", "shape", "size"):
            right = out[k].argmax(-1) == y[k]
            hits[k][0] += right[occupied].sum().item()
            hits[k][1] += occupied.sum().item()
            if k == "shape":
                hits["empty"][0] += right[~occupied].sum().item()
                hits["empty"][1] += (~occupied).sum().item()
        hits["place"][0] += (out["place"].argmax(-1) == torch.arange(9)).sum().item()
        hits["place"][1] += out["place"].shape[0] * 9
        for k in ("count", "background"):
            hits[k][0] += (out[k].argmax(-1) == y[k]).sum().item()
            hits[k][1] += len(sc)
    tower.train()
    return {k: h / max(n, 1) for k, (h, n) in hits.items()}


def save(tower, cfg, out, metrics):
    """weights/shapes/: eva_vit_g.pth (the ViT's keys as LAVIS'), blip2_pretrained.pth ({"model": Qformer.bert.*,
    query_tokens, ln_vision.*}), config.json (`dims`, read by model.folder_configs)."""
    os.makedirs(out, exist_ok=True)
    vit = {k: v.detach().clone() for k, v in tower.visual_encoder.state_dict().items()}
    qf = {(k if k == "query_tokens" else PREFIX + k): v.detach().clone() for k, v in tower.Qformer.state_dict().items()}
    qf.update({f"ln_vision.{k}": v.detach().clone() for k, v in tower.ln_vision.state_dict().items()})
    checks.atomic_save(vit, os.path.join(out, "eva_vit_g.pth"))
    checks.atomic_save({"model": qf}, os.path.join(out, "blip2_pretrained.pth"))
    v, q = cfg.vit, cfg.qformer
    dims = {"vit": dict(img_size=v.img_size, patch_size=v.patch_size, embed_dim=v.width, depth=v.depth,
                        num_heads=v.n_heads, mlp_hidden=v.mlp_hidden, norm_eps=v.norm_eps),
            "ln_vision": {"eps": cfg.ln_vision_eps},
            "qformer": dict(hidden_size=q.hidden_size, num_hidden_layers=q.n_layers, num_attention_heads=q.n_heads,
                            intermediate_size=q.intermediate_size, layer_norm_eps=q.norm_eps,
                            encoder_width=q.encoder_width, num_query_token=q.n_queries,
                            cross_attention_freq=q.cross_attention_freq,
                            cross_attention_layers=list(q.cross_attention_layers))}
    with open(os.path.join(out, "config.json.tmp"), "w") as f:
        json.dump({"dims": dims, "pretrain_vision": metrics}, f, indent=1)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))


def pretrain(out="weights/shapes", steps=900, batch_size=48, lr=1e-3, seed=0, val=300, log_interval=50):
    """Train the tower on train-split scenes drawn afresh for every batch; -> the validation accuracies."""
    torch.manual_seed(seed)
    cfg = MiniGPT4Config.from_name("shapes")
    tower = Tower(cfg).train()
    decay = [p for n, p in tower.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "query_tokens" not in n]
    rest = [p for n, p in tower.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n and "query_tokens" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=lr)
    val_scenes = [S.scene("val", i) for i in range(val)]
    warmup, t0, index = max(steps // 20, 1), time.time(), 0
    for step in range(1, steps + 1):
        for g in opt.param_groups:  # linear warmup, cosine to 0
            g["lr"] = lr * min(step / warmup, 0.5 * (1 + math.cos(math.pi * step / steps)))
        sc = [S.scene("train", S.QA_FIRST + index + b) for b in range(batch_size)]  # qa/'s images too; never val/test
        index += batch_size
        loss = loss_fn(tower(pixels([S.render(s) for s in sc])), labels(sc))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_interval == 0 or step == steps:
            dt = time.time() - t0
            print(f"step {step}/{steps} | loss {loss.item():.4f} | lr {opt.param_groups[0]['lr']:.2e} | "
                  f"samples/s {step * batch_size / dt:.1f} | ETA {dt / step * (steps - step):.0f}s", flush=True)
    metrics = evaluate(tower, val_scenes)
    metrics["steps"], metrics["seconds"] = steps, round(time.time() - t0, 1)
    print("validation accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
    save(tower, cfg, out, metrics)
    print(f"saved {out}/eva_vit_g.pth, {out}/blip2_pretrained.pth, {out}/config.json")
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description="Pretrain the miniature's vision tower on the shapes world.")
    p.add_argument("--out", default="weights/shapes")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch_size", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or not 0 < args.lr < 1:
        p.error("--steps and --batch_size must be >= 1, --lr in (0, 1)")
    print(f"threads: {pin_threads()}")
    try:
        pretrain(args.out, args.steps, args.batch_size, args.lr, args.seed)
    except OSError as e:
        print(f"error: {args.out}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
