"""What the compiler makes of attention.py's kernels, per call site and GPU architecture, on any machine.

    python kernel_report.py [--arch sm80 sm90] [--json]    # compile only: no GPU needed
    python kernel_report.py --tune                         # on a GPU: time CONFIGS candidates, write the best

Triton compiles for a CUDA target without a GPU if its driver names one: a stand-in driver reports
GPUTarget("cuda", 80 or 90, 64) and kernel.warmup() compiles without launching (pointers stand in as dtypes).
Each call site is compiled at its real shapes and strides (meta tensors: no memory) with attention.CONFIGS, and
the result read back: registers and local memory (spills) from cuobjdump -res-usage (shipped with triton),
shared memory from triton's launch metadata, and from the PTX: 128-bit global loads, 16-byte cp.async (the
software pipeline's asynchronous copies), remaining 16-bit scalar loads, and wgmma (Hopper) / mma.sync.
--tune, on a GPU, times every candidate config per site with triton.testing.do_bench, keeps the fastest that
matches SDPA and writes attention_tuned.json, which attention.py reads over CONFIGS for that architecture.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

import attention as A

# name, (B, Hq, Hkv, Lq, Lk, D), causal, layout: the shapes and memory layouts models pass (B is a runtime int)
SITES = [
    ("vit", (8, 16, 16, 257, 257, 88), False, "fused_qkv"),         # EVA ViT-G/14: q, k, v views of one qkv
    ("qformer_self", (8, 12, 12, 32, 32, 64), False, "heads"),      # BLIP-2 Q-Former, (B, L, H, D) views
    ("qformer_cross", (8, 12, 12, 32, 257, 64), False, "heads"),
    ("prefill", (1, 32, 32, 128, 128, 128), True, "cache"),         # LLaMA-7B prompt into the KV cache
    ("prefill", (1, 32, 32, 2048, 2048, 128), True, "cache"),
    ("decode", (1, 32, 32, 1, 1024, 128), True, "cache"),           # one token against the cache
    ("decode", (1, 32, 32, 1, 4096, 128), True, "cache"),
]
CAPABILITY = {"sm80": 80, "sm90": 90}
SMEM_LIMIT = {"sm80": 166912, "sm90": 232448}  # bytes of shared memory per block (A100 163 KB, H100 227 KB)
PTX_COUNTS = {  # name: regex over the PTX
    "ld128": r"ld\.global[\w.]*\.v4\.[bfu]32|ld\.global[\w.]*\.v2\.[bfu]64",
    "ld16": r"ld\.global[\w.]*\.[bfu]16\b",
    "cp.async16": r"cp\.async\.c[ag]\.shared\.global[^;]*,\s*(?:16|0x10)\s*[,;]",
    "wgmma": r"wgmma\.mma_async",
    "mma.sync": r"\bmma\.sync",
}


def site_tensors(shape, layout, dtype=torch.float16, device="meta"):
    """q, k, v, mask with the call site's strides (meta tensors by default: shapes only)."""
    B, Hq, Hkv, Lq, Lk, D = shape
    new = lambda *s: torch.empty(*s, dtype=dtype, device=device)
    mask = None
    if layout == "fused_qkv":  # vit.py: qkv (B, N, 3, H, D) permuted
        q, k, v = new(B, Lq, 3, Hq, D).permute(2, 0, 3, 1, 4)
    elif layout == "heads":  # qformer.py: (B, L, H, D).transpose(1, 2)
        q = new(B, Lq, Hq, D).transpose(1, 2)
        k, v = (new(B, Lk, Hkv, D).transpose(1, 2) for _ in range(2))
    else:  # llama.py: q from (B, T, H, D); k, v prefixes of a (B, Hkv, max_len, D) cache; mask = cache.valid
        q = new(B, Lq, Hq, D).transpose(1, 2)
        k, v = (new(B, Hkv, Lk + 512, D)[:, :, :Lk] for _ in range(2))
        mask = torch.ones(B, Lk + 512, dtype=torch.bool, device=device)[:, :Lk]
    return q, k, v, mask


def stand_in_driver(cap):
    """A Triton driver that only names a CUDA target: enough to compile, never to launch."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class StandIn(DriverBase):
        is_active = classmethod(lambda cls: False)
        get_current_target = lambda self: GPUTarget("cuda", cap, 64)
        get_current_device = lambda self: cap  # one JIT cache per target
        get_current_stream = lambda self, device=None: 0
        get_active_torch_device = lambda self: torch.device("cpu")
        map_python_to_cpp_type = lambda self, t: t

        def get_benchmarker(self):
            raise RuntimeError("stand-in driver: compile only")
    return StandIn()


def cuobjdump(cubin):
    """{'REG': .., 'LOCAL': .., 'STACK': ..} of a cubin."""
    tool = os.path.join(os.path.dirname(A.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|LOCAL|STACK):(\d+)", out)}


def missing_tools():
    """Why this triton can't compile for CUDA here (None if it can)."""
    if A.triton is None:
        return "triton is not installed"
    if A.triton.knobs.runtime.interpret:
        return "TRITON_INTERPRET=1 is set (unset it: the report compiles)"
    from triton.backends import backends
    bin_dir = os.path.join(os.path.dirname(A.triton.__file__), "backends", "nvidia", "bin")
    if "nvidia" not in backends or not os.path.exists(os.path.join(bin_dir, "cuobjdump")):
        return f"this triton build lacks the CUDA backend tools (ptxas, cuobjdump under {bin_dir})"
    return None


def report(arch_name):
    """One row per (call site, kernel) compiled for arch_name."""
    A.triton.runtime.driver.set_active(stand_in_driver(CAPABILITY[arch_name]))
    rows = []  # (the stand-in stays active: this script never launches)
    for name, shape, causal, layout in SITES:
        q, k, v, mask = site_tensors(shape, layout)
        cfg = A.CONFIGS[arch_name][name]
        for kern in A.triton_attention(q, k, v, causal, mask, config=cfg, compile_only=True):
            ptx, res = kern.asm["ptx"], cuobjdump(kern.asm["cubin"])
            row = dict(arch=arch_name, site=name, shape=shape, kernel=kern.name, config=cfg,
                       warps=kern.metadata.num_warps, stages=kern.metadata.num_stages, regs=res["REG"],
                       spill_bytes=res["LOCAL"] + res["STACK"], smem=kern.metadata.shared,
                       smem_limit=SMEM_LIMIT[arch_name])
            row.update({c: len(re.findall(p, ptx)) for c, p in PTX_COUNTS.items()})
            rows.append(row)
    return rows


def print_rows(rows):
    cols = ["regs", "spill_bytes", "smem", "ld128", "ld16", "cp.async16", "wgmma", "mma.sync"]
    print(f"{'arch':5} {'site':14} {'B,Hq,Hkv,Lq,Lk,D':24} {'kernel':16} {'config':18} "
          + " ".join(f"{c:>11}" for c in cols))
    for r in rows:
        print(f"{r['arch']:5} {r['site']:14} {','.join(map(str, r['shape'])):24} {r['kernel']:16} "
              f"{str(r['config']).replace(' ', ''):18} " + " ".join(f"{r[c]:>11}" for c in cols))


# ----------------------------------------------------------------------------- --tune (needs a GPU)

CANDIDATES = {
    "tile": [(m, n, w, s) for m in (32, 64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)],
    "decode": [(n, w, s, split) for n in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)
               for split in (128, 256, 512)],
}


def tune():
    """Time every candidate at each site's real shape; write the fastest correct ones to attention_tuned.json."""
    from triton.testing import do_bench
    arch_name = A.arch(torch.device("cuda"))
    best = {}
    for name, (shape, causal, layout) in {n: rest for n, *rest in SITES}.items():  # a site's longest shape
        q, k, v, mask = (t.normal_() if t.dtype != torch.bool else t.fill_(True)
                         for t in site_tensors(shape, layout, device="cuda"))
        ref = A.sdpa_attention(q, k, v, causal, mask).float()
        timed = []
        for cfg in CANDIDATES["decode" if name == "decode" else "tile"]:
            if name != "decode" and cfg[0] > max(16, A.triton.next_power_of_2(shape[3])):
                continue  # tiles taller than the query length
            try:
                out = A.triton_attention(q, k, v, causal, mask, config=cfg)
                if (out.float() - ref).abs().max().item() > 1e-2 * max(1.0, ref.abs().max().item()):
                    continue
                timed.append((do_bench(lambda: A.triton_attention(q, k, v, causal, mask, config=cfg)), cfg))
            except Exception:  # out of shared memory / registers for this GPU
                continue
        if not timed:
            print(f"{name:14} {shape}: no candidate ran correctly; CONFIGS kept")
            continue
        ms, cfg = min(timed)
        print(f"{name:14} {shape}: best {cfg} {ms * 1e3:.1f} us of {len(timed)} that ran", flush=True)
        best[name] = (ms, cfg)
    tuned = json.load(open(A.TUNED_FILE)) if os.path.exists(A.TUNED_FILE) else {}
    tuned[arch_name] = {s: list(c) for s, (_, c) in best.items()}
    with open(A.TUNED_FILE, "w") as f:
        json.dump(tuned, f, indent=1)
    print(f"wrote {A.TUNED_FILE} for {arch_name}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=list(CAPABILITY), default=list(CAPABILITY))
    p.add_argument("--json", action="store_true", help="print the rows as one JSON line")
    p.add_argument("--tune", action="store_true", help="on a GPU: time candidate configs per site")
    args = p.parse_args()
    if args.tune:
        if not torch.cuda.is_available():
            sys.exit("kernel_report.py --tune: needs a CUDA GPU")
        tune()
        sys.exit(0)
    problem = missing_tools()
    if problem:
        sys.exit(f"kernel_report.py: {problem}")
    rows = [r for a in args.arch for r in report(a)]
    print("ROWS " + json.dumps(rows) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        print_rows(rows)
