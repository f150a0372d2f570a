"""
The miniature's stage-1 training step on the CPU, ours vs the same model composed from transformers modules on the
same weight tensors (bench.py's to_transformers), in one run, with real shapes-world captions and images:

    python bench_shapes.py [--weights weights/shapes|random] [--batch 8] [--iters 5]

The model: preset "shapes" (pretrain_vision.py's small ViT + Q-Former, SmolLM2-135M-Instruct from weights/smollm2/,
`python fetch.py --model smollm2`), fp32. The tower: --weights (written by `python pretrain_vision.py`), else
random weights as pretraining starts them (the header says which).
"""
import argparse
import os
import random
import statistics
import sys
import time

import torch

from bench import hf_encode, seconds, to_transformers
from model import MiniGPT4, MiniGPT4Config
from pretrain_vision import Tower, pin_threads, pixels

SMOLLM2_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "smollm2")


def shapes_model(weights_dir):
    """MiniGPT4 preset "shapes" in fp32 with a fresh projection -> (model, what the tower is). "random" or a missing
    folder: pretrain_vision.Tower's initial ViT and Q-Former (seed 0) and the LLM from weights/smollm2/."""
    if weights_dir != "random" and os.path.isdir(weights_dir):
        return MiniGPT4.from_pretrained(weights_dir, "shapes", proj=False, dtype=torch.float32), f"pretrained ({weights_dir})"
    from llama import Llama, load_tokenizer
    torch.manual_seed(0)
    cfg = MiniGPT4Config.from_name("shapes")
    tower = Tower(cfg)
    m = MiniGPT4(cfg, tower.visual_encoder, tower.Qformer, Llama.from_pretrained(SMOLLM2_DIR), load_tokenizer(SMOLLM2_DIR))
    return m.eval(), "random" + ("" if weights_dir == "random" else f", {weights_dir} absent")


def shapes_batch(B, size):
    """B stage-1 samples of the shapes world: train scenes 0..B-1 rendered at `size` (the tower's image size) and
    normalised as pretrain_vision.pixels, captions as shapes.write_stage1 writes them. -> (pixels, captions)"""
    import shapes as S
    scenes = [S.scene("train", i) for i in range(B)]
    captions = [S.caption(s, random.Random(f"cap/{i}")) for i, s in enumerate(scenes)]
    return pixels([S.render(s, size=size) for s in scenes]), captions


def bench_shapes(args):
    """Stage-1 step of the miniature (forward -> loss -> backward -> AdamW on llama_proj), fp32 on the CPU with one
    thread per usable core: ours (m(pixels, captions)) vs transformers (hf_encode, our build_inputs, then
    LlamaForCausalLM(inputs_embeds, labels)). Losses checked first (rel 1e-4); then 1 warmup step each and
    --iters timed steps each, ours and theirs alternating (a loaded machine slows both alike); median."""
    import transformers
    threads = torch.get_num_threads()
    try:
        return _bench_shapes(args, pin_threads(), transformers.__version__)
    finally:
        torch.set_num_threads(threads)


def _bench_shapes(args, threads, hf_version):
    B, iters, max_txt_len, tol = args.batch, args.iters, 32, 1e-4
    t_build = time.perf_counter()
    m, tower = shapes_model(args.weights)
    vis, qfm, llm = to_transformers(m)
    c = m.llama_model.cfg
    print(f"MiniGPT-4 miniature (shapes) stage-1 step | CPU, {threads} threads | fp32 | torch {torch.__version__} | "
          f"transformers {hf_version} | tower: {tower}, {m.visual_encoder.config.img_size} px | LLM: SmolLM2 "
          f"{c.dim}x{c.n_layers}, vocab {c.vocab_size} | built in {time.perf_counter() - t_build:.1f}s")
    pixels, texts = shapes_batch(B, m.visual_encoder.config.img_size)
    opt = torch.optim.AdamW(m.llama_proj.parameters(), lr=1e-5, weight_decay=0.05)

    def ours_loss():
        return m(pixels, texts, max_txt_len=max_txt_len)

    def hf_loss():
        emb, mask, labels = m.build_inputs(hf_encode(m, vis, qfm, pixels), texts, max_txt_len=max_txt_len)
        return llm(inputs_embeds=emb, attention_mask=mask, labels=labels, use_cache=False).loss

    def step(loss_fn):
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():
        _, mask, labels = m.build_inputs(m.encode_img(pixels)[0], texts, max_txt_len=max_txt_len)
        T, targets = mask.shape[1], (labels[:, 1:] != -100).sum().item()
        l_ours, l_hf = ours_loss().item(), hf_loss().item()
    if abs(l_ours - l_hf) > tol * max(1, abs(l_hf)):
        print(f"MISMATCH: loss {l_ours:.6f} (ours) vs {l_hf:.6f} (transformers)")
        return False
    for fn in (ours_loss, hf_loss):  # warmup
        step(fn)
    wall, cpu = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for _ in range(iters):
        for who, fn in (("ours", ours_loss), ("hf", hf_loss)):
            c0 = time.process_time()
            wall[who].append(seconds(lambda: step(fn), 0, 1))
            cpu[who].append(time.process_time() - c0)
    (w_ours, w_hf), (c_ours, c_hf) = ([statistics.median(d[k]) for k in ("ours", "hf")] for d in (wall, cpu))
    print(f"{'':36} {'ours':>12} {'transformers':>12} {'speedup':>8} {'goal':>6}  notes")
    print(f"{f'stage-1 step B={B}, samples/s':36} {B / w_ours:12.4g} {B / w_hf:12.4g} {w_hf / w_ours:8.2f} "
          f"{'x1.2':>6}  T={T} tokens, {targets} target tokens ({targets / B:.1f}/sample), "
          f"loss {l_ours:.4f} vs {l_hf:.4f}")
    print(f"{'  seconds per step':36} {w_ours:12.4g} {w_hf:12.4g}")
    print(f"{'  CPU seconds per step (all threads)':36} {c_ours:12.4g} {c_hf:12.4g} {c_hf / c_ours:8.2f} "
          f"{'':6}  less sensitive than wall time to other processes on the machine")
    print(f"median of {iters} steps each after 1 warmup, ours and transformers alternating; "
          f"ratio ours/transformers samples/s = {w_hf / w_ours:.2f}")
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description="The miniature's stage-1 step: ours vs transformers, CPU.")
    p.add_argument("--weights", default="weights/shapes", help="pretrain_vision.py's folder, or 'random'")
    p.add_argument("--batch", type=int, default=8, help="samples per training step (the shapes preset: 8)")
    p.add_argument("--iters", type=int, default=5, help="timed steps of each (median)")
    args = p.parse_args(argv)
    return 0 if bench_shapes(args) else 1


if __name__ == "__main__":
    sys.exit(main())
