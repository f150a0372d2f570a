"""
Peak memory (RSS on CPU) of loading a LLaMA checkpoint quantized while loading (quant.py) next to the plain fp16 load:

    python quant_memory.py --make /tmp/q7b --preset llama2-7b [--layers N] [--shard-gb 2]
    python quant_memory.py --measure /tmp/q7b

--make writes random weights of a preset's shape as an HF folder (config.json, fp16 model-0000X-of-0000N.safetensors
shards of at most --shard-gb, model.safetensors.index.json), one shard in memory at a time. --measure loads it in a
fresh process per mode (fp16; int8) and prints one table: the peak RSS (ru_maxrss) after Llama.from_pretrained and
after then reading every weight once, against the budget 1.3 x the int8 weight bytes + the largest shard.

Measured on 2 shared CPU cores, llama2-7b (7 shards, the largest 1898 MiB): int8 peak 8577-9743 MiB over 8 loads
(glibc's heap keeps a varying few hundred MiB) against a 10089 MiB budget; fp16 13236 MiB once every weight is read.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

BUDGET_FACTOR = 1.3


def shard_name(i, n):
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def hf_shapes(cfg):
    """LlamaConfig -> [(HF key, shape)] in HF's order: embeddings, each layer, final norm, LM head."""
    kv = cfg.n_kv_heads * cfg.head_dim
    shapes = [("model.embed_tokens.weight", (cfg.vocab_size, cfg.dim))]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (cfg.dim, cfg.dim)), (p + "self_attn.k_proj.weight", (kv, cfg.dim)),
                   (p + "self_attn.v_proj.weight", (kv, cfg.dim)), (p + "self_attn.o_proj.weight", (cfg.dim, cfg.dim)),
                   (p + "mlp.gate_proj.weight", (cfg.hidden_dim, cfg.dim)),
                   (p + "mlp.up_proj.weight", (cfg.hidden_dim, cfg.dim)),
                   (p + "mlp.down_proj.weight", (cfg.dim, cfg.hidden_dim)),
                   (p + "input_layernorm.weight", (cfg.dim,)), (p + "post_attention_layernorm.weight", (cfg.dim,))]
    shapes.append(("model.norm.weight", (cfg.dim,)))
    if not cfg.tie_embeddings:
        shapes.append(("lm_head.weight", (cfg.vocab_size, cfg.dim)))
    return shapes


def make(folder, cfg, shard_bytes=2 * 10**9, seed=0):
    """Write random fp16 weights of `cfg`'s shape as an HF folder; shards filled greedily up to shard_bytes (HF's
    rule), each generated, written and freed before the next. -> the shard file names."""
    from safetensors.torch import save_file
    shapes = hf_shapes(cfg)
    groups, size = [[]], 0  # [[(key, shape)] per shard]
    for key, shape in shapes:
        nbytes = 2 * torch.Size(shape).numel()
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((key, shape))
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, names = {}, []
    for i, group in enumerate(groups):
        name = shard_name(i + 1, len(groups))
        shard = {key: torch.ones(shape, dtype=torch.float16) if len(shape) == 1  # norms
                 else torch.randn(shape, generator=g, dtype=torch.float16).mul_(0.02) for key, shape in group}
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
        del shard
        weight_map.update({key: name for key, _ in group})
        names.append(name)
    total = sum(2 * torch.Size(s).numel() for _, s in shapes)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  vocab_size=cfg.vocab_size, intermediate_size=cfg.hidden_dim, rms_norm_eps=cfg.norm_eps,
                  rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
                  tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", torch_dtype="float16")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return names


def peak_rss():  # bytes; ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_hwm():  # bytes: the same peak as the kernel keeps it for this process's memory map (Linux)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def child(folder, mode):
    """One load in this (fresh) process; prints its numbers as one JSON line."""
    import tempfile
    from llama import Llama, LlamaConfig
    torch.set_num_threads(1)
    quant = None if mode == "fp16" else mode
    with tempfile.TemporaryDirectory() as tmp:  # one tiny load first: imports, allocator, kernels warmed up
        make(tmp, LlamaConfig.from_name("tiny"), 10**5)
        Llama.from_pretrained(tmp, dtype=torch.float16, quant=quant)
    before = peak_rss()
    t0 = time.time()
    model = Llama.from_pretrained(folder, dtype=torch.float16, quant=quant)
    seconds = time.time() - t0
    after_load = peak_rss()
    state = model.state_dict()
    for t in state.values():  # touch every page of every weight: fp16 weights may still be on disk (safetensors mmap)
        t.reshape(-1)[::512].float().sum()
    linear_int8 = sum(t.numel() for t in state.values() if t.dtype == torch.int8)  # QuantLinear weights
    print(json.dumps(dict(mode=mode, seconds=seconds, before=before, after_load=after_load, after_read=peak_rss(),
                          vm_hwm=vm_hwm(), model_bytes=sum(t.numel() * t.element_size() for t in state.values()),
                          int8_weight_bytes=linear_int8)))


def shard_sizes(folder):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.getsize(os.path.join(folder, n)) for n in names]


def measure(folder, modes=("fp16", "int8")):
    """Each mode in a fresh process, one after the other -> (rows, largest shard bytes); prints the table."""
    env, me = dict(os.environ, OMP_NUM_THREADS="1"), os.path.abspath(__file__)
    rows = []
    for mode in modes:
        # through sh, not exec'd directly: a process exec'd from this one starts with this one's ru_maxrss
        cmd = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, me, "--child", mode, folder]
        r = subprocess.run(cmd, cwd=os.path.dirname(me), env=env, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{mode} load failed:\n{r.stderr[-3000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    sizes = shard_sizes(folder)
    largest = max(sizes)
    mib = lambda n: f"{n / 2**20:.0f}"
    print(f"{folder}: {len(sizes)} shards, {mib(sum(sizes))} MiB, largest {mib(largest)} MiB (sizes in MiB; RSS: "
          f"ru_maxrss of a fresh process per mode)")
    print(f"{'mode':5} {'load s':>6} {'model':>6} {'int8 w':>6} {'before':>6} {'peak':>6} {'+read':>6} {'load':>6} "
          f"{'budget':>6}  peak<=budget")
    for r in rows:
        r["peak"] = max(r["after_load"], r["after_read"])
        r["budget"] = BUDGET_FACTOR * r["int8_weight_bytes"] + largest if r["mode"] == "int8" else None
        r["pass"] = None if r["budget"] is None else r["peak"] <= r["budget"]
        verdict = "-" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL")
        budget = "-" if r["budget"] is None else mib(r["budget"])
        print(f"{r['mode']:5} {r['seconds']:6.1f} {mib(r['model_bytes']):>6} {mib(r['int8_weight_bytes']):>6} "
              f"{mib(r['before']):>6} {mib(r['after_load']):>6} {mib(r['after_read']):>6} "
              f"{mib(r['peak'] - r['before']):>6} {budget:>6}  {verdict}")
    print(f"model: bytes the loaded model holds (int8: int8 Linear weights, their scales, fp16 embeddings and norms); "
          f"int8 w: its int8 Linear weights alone; before: peak RSS before the load (interpreter, torch, one tiny "
          f"load); peak: after from_pretrained; +read: after then reading every weight; load: the larger minus before; "
          f"budget: {BUDGET_FACTOR} x int8 w + largest shard")
    return rows, largest


def main(argv=None):
    from llama import PRESETS, LlamaConfig
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", metavar="FOLDER", help="write a random fp16 checkpoint of --preset's shape")
    p.add_argument("--preset", default="llama2-7b", choices=list(PRESETS))
    p.add_argument("--layers", type=int, help="override the preset's number of layers")
    p.add_argument("--shard-gb", type=float, default=2.0, help="largest shard, 10^9 bytes (HF's max_shard_size)")
    p.add_argument("--measure", metavar="FOLDER", help="peak RSS of loading FOLDER: fp16 vs int8")
    p.add_argument("--child", nargs=2, metavar=("MODE", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[1], args.child[0])
    if not (args.make or args.measure):
        p.error("give --make FOLDER and/or --measure FOLDER")
    if args.make:
        torch.set_num_threads(1)
        cfg = LlamaConfig(**{**PRESETS[args.preset], **({"n_layers": args.layers} if args.layers else {})})
        t0 = time.time()
        names = make(args.make, cfg, int(args.shard_gb * 10**9))
        print(f"wrote {args.make}: {args.preset}, {cfg.n_layers} layers, {len(names)} shards "
              f"in {time.time() - t0:.0f}s")
    if args.measure:
        rows, _ = measure(args.measure)
        if any(r["pass"] is False for r in rows):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
