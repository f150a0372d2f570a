"""quant_memory.py on small shapes: the folder it writes loads, and an int8 load's numbers come from a real load in
its own process, its own memory (peak RSS - RSS before) within 1.3 x int8 weights + the largest shard. The whole peak
is the 7B run's criterion; here the interpreter alone (~0.4 GB) outweighs the model."""
import json

import torch

from llama import Llama, LlamaConfig
from quant_memory import hf_shapes, make, measure

CFG = LlamaConfig(dim=512, n_layers=80, n_heads=8, hidden_dim=1408, vocab_size=4000)  # 247 MiB of int8 weights
MiB = 2**20


def test_make_writes_an_hf_folder(tmp_path):
    cfg = LlamaConfig.from_name("tiny")
    names = make(tmp_path, cfg, shard_bytes=200_000)  # > any one tensor (the embeddings: 128 kB)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(names) > 1 and sorted(set(index["weight_map"].values())) == names
    assert names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    assert set(index["weight_map"]) == {k for k, _ in hf_shapes(cfg)}
    assert all((tmp_path / n).stat().st_size <= 200_000 + 10_000 for n in names)  # + the header
    m = Llama.from_pretrained(tmp_path)
    assert m.cfg == cfg and m.lm_head.weight.abs().max() > 0


def test_int8_load_memory_within_budget(tmp_path, capsys):
    """Narrow and deep: the quantizer's temporaries (1024 rows x K in fp32) and the allocator's slack are a few
    tens of MiB whatever the model, so the model must be large enough for 0.3 x its int8 weights to cover them."""
    make(tmp_path, CFG, shard_bytes=128 * 10**6)
    rows, largest = measure(str(tmp_path), modes=("int8",))  # a SystemExit here: the child failed
    (r,) = rows
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["mode", "load", "s", "model", "int8", "w", "before", "peak", "+read", "load", "budget",
                                "peak<=budget"]
    assert table[2].split()[0] == "int8" and table[2].split()[-1] == ("PASS" if r["pass"] else "FAIL")
    shapes = hf_shapes(CFG)
    assert 100 * MiB < largest <= 128e6 and largest == max(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert r["int8_weight_bytes"] == sum(torch.Size(s).numel() for _, s in shapes if len(s) == 2) - 4000 * 512
    # a real process: torch imported before, every weight resident after, ru_maxrss its own (= VmHWM)
    assert 150 * MiB < r["before"] <= r["after_load"] <= r["after_read"] == r["peak"] < 4096 * MiB
    assert r["peak"] - r["before"] > r["model_bytes"] > r["int8_weight_bytes"]
    assert abs(r["peak"] - r["vm_hwm"]) < 16 * MiB
    assert r["budget"] == 1.3 * r["int8_weight_bytes"] + largest
    assert r["peak"] - r["before"] <= r["budget"]
