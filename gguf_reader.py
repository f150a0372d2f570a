"""GGUF files (llama.cpp's format) for llama.py: read the header, key/values, tensor infos and the aligned data
with a numpy memory map; dequantize F32/F16/BF16/Q8_0/Q4_0/Q4_1 to a torch dtype; metadata -> LlamaConfig; GGUF
tensor names -> our (HF) names through one table; undo the Q/K row permutation llama.cpp's converter applies.

Layout (little-endian): "GGUF", u32 version (2 or 3), u64 tensor count, u64 key/value count; key/values
(string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims innermost first, u32 ggml
type, u64 offset into the data); padding to `general.alignment` (32); the tensor data."""
import os
import struct

import numpy as np
import torch

from checkpoint import CheckpointError

# key/value types: id -> (struct format, size); 8 = string, 9 = array
SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
           7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
         12: "<f8"}

# ggml tensor types we read: id -> (name, elements per block, bytes per block)
TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 30: ("BF16", 1, 2), 8: ("Q8_0", 32, 34), 2: ("Q4_0", 32, 18),
         3: ("Q4_1", 32, 20)}
GGML_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
              15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
              22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M"}


class GGUFFile:
    """A parsed GGUF file: .version, .kv {key: value}, .tensors {name: (ggml type, shape (torch order), offset)}.
    .tensor(name, dtype) dequantizes one tensor from the memory map."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"GGUF file not found: {self.path}")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.buf, self.pos = memoryview(self.data), 0  # the header is parsed from a plain buffer view (fast)
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError, OverflowError):
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header (at byte {self.pos})") from None

    def _read(self, fmt, size):
        if self.pos + size > len(self.data):
            raise IndexError
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def _string(self):
        n = self._read("<Q", 8)
        if self.pos + n > len(self.data):
            raise IndexError
        s = str(self.buf[self.pos:self.pos + n], "utf-8")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in SCALARS:
            return self._read(*SCALARS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, n = self._read("<I", 4), self._read("<Q", 8)
            if etype in NUMPY:  # numbers: one numpy read
                size = np.dtype(NUMPY[etype]).itemsize * n
                if self.pos + size > len(self.data):
                    raise IndexError
                arr = np.frombuffer(self.buf, NUMPY[etype], n, self.pos).tolist()
                self.pos += size
                return arr
            return [self._value(etype) for _ in range(n)]
        raise ValueError(f"unknown value type {vtype}")

    def _parse(self):
        if bytes(self.data[:4]) != b"GGUF":
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic)")
        self.pos = 4
        self.version = self._read("<I", 4)
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported (2 or 3)")
        n_tensors, n_kv = self._read("<Q", 8), self._read("<Q", 8)
        self.kv = {}
        for _ in range(n_kv):
            key = self._string()
            self.kv[key] = self._value(self._read("<I", 4))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q", 8) for _ in range(self._read("<I", 4))]
            self.tensors[name] = (self._read("<I", 4), tuple(reversed(dims)), self._read("<Q", 8))
        align = self.kv.get("general.alignment", 32)
        self.start = (self.pos + align - 1) // align * align

    def tensor(self, name, dtype=torch.float32):
        """Dequantize tensor `name` -> torch tensor (shape in torch order) in `dtype`; exactly the gguf package's
        values (fp32 arithmetic in numpy, in its order of operations)."""
        ggml_type, shape, offset = self.tensors[name]
        if ggml_type not in TYPES:
            kind = GGML_NAMES.get(ggml_type, f"type {ggml_type}")
            raise CheckpointError(f"{self.path}: tensor {name} has ggml type {kind}; supported: "
                                  + ", ".join(t[0] for t in TYPES.values()))
        kind, block, nbytes = TYPES[ggml_type]
        n = int(np.prod(shape))
        if n % block:
            raise CheckpointError(f"{self.path}: tensor {name} has {n} elements, not a multiple of {block} ({kind})")
        begin, size = self.start + offset, n // block * nbytes
        if begin + size > len(self.data):
            raise CheckpointError(f"{self.path}: truncated: tensor {name} ends at byte {begin + size}, "
                                  f"file has {len(self.data)}")
        w = dequantize(self.data[begin:begin + size], kind).reshape(shape)
        return torch.from_numpy(w if w.flags.writeable else w.copy()).to(dtype)  # copy: not the read-only map


def dequantize(raw, kind):
    """uint8 bytes -> flat float32 numpy array (F16 stays float16: exact in any wider dtype)."""
    if kind == "F32":
        return raw.view("<f4")
    if kind == "F16":
        return raw.view("<f2")
    if kind == "BF16":  # the top 16 bits of an fp32
        return (raw.view("<i2").astype(np.int32) << 16).view(np.float32)
    blocks = raw.reshape(-1, TYPES_BY_NAME[kind][2])
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1) scale
    if kind == "Q8_0":  # d, 32 int8
        return (blocks[:, 2:].copy().view(np.int8).astype(np.float32) * d).reshape(-1)
    nibbles = blocks[:, -16:]  # 16 bytes: elements 0..15 in the low nibbles, 16..31 in the high ones
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # (n_blocks, 32) in 0..15
    if kind == "Q4_0":  # d, 16 bytes: (q - 8) * d
        return (d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)  # Q4_1: d, m, 16 bytes: q * d + m
    return ((d * q.astype(np.float32)) + m).reshape(-1)


TYPES_BY_NAME = {v[0]: v for v in TYPES.values()}


# ----------------------------------------------------------------------------------------- to llama.py
# GGUF name -> ours (per block: blk.{i}.NAME -> model.layers.{i}.NAME)
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
IGNORED = ("rope_freqs.weight",)  # recomputed


def llama_config(g):
    """GGUF metadata -> LlamaConfig (architecture `llama` only)."""
    from llama import LlamaConfig
    arch = g.kv.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{g.path}: architecture {arch!r} is not supported (only 'llama')")
    kv = {k[len("llama."):]: v for k, v in g.kv.items() if k.startswith("llama.")}
    if kv.get("rope.scaling.type", "none") not in ("none", "linear") or kv.get("rope.scaling.factor", 1.0) != 1.0:
        raise CheckpointError(f"{g.path}: rope scaling is not supported")
    try:
        dim, n_heads = kv["embedding_length"], kv["attention.head_count"]
        if kv.get("rope.dimension_count", dim // n_heads) != dim // n_heads:
            raise CheckpointError(f"{g.path}: partial rotary embeddings are not supported")
        vocab = kv.get("vocab_size") or len(g.kv["tokenizer.ggml.tokens"])
        return LlamaConfig(dim=dim, n_layers=kv["block_count"], n_heads=n_heads,
                           n_kv_heads=kv.get("attention.head_count_kv"), vocab_size=vocab,
                           hidden_dim=kv["feed_forward_length"], norm_eps=kv["attention.layer_norm_rms_epsilon"],
                           rope_theta=kv.get("rope.freq_base", 10000.0), max_seq_len=kv.get("context_length", 2048),
                           tie_embeddings="output.weight" not in g.tensors)
    except KeyError as e:
        raise CheckpointError(f"{g.path}: missing metadata key llama.{e.args[0]}") from None


def gguf_items(path, dtype=torch.float32):
    """GGUF file -> (LlamaConfig, iterator of (our key, tensor in dtype)), dequantized one tensor at a time."""
    from llama import unpermute_rope
    g = GGUFFile(path)
    cfg = llama_config(g)

    def items():
        for name in g.tensors:
            if name in IGNORED:
                continue
            block, _, rest = name.partition(".")
            layer = block == "blk" and rest.partition(".")[0].isdigit()
            short = rest.partition(".")[2] if layer else name
            if short not in GGUF_TO_HF:
                raise CheckpointError(f"{g.path}: unexpected tensor {name}")
            key = f"model.layers.{rest.partition('.')[0]}.{GGUF_TO_HF[short]}" if layer else GGUF_TO_HF[short]
            w = g.tensor(name, dtype)
            if short in ("attn_q.weight", "attn_k.weight"):  # llama.cpp's RoPE layout -> HF's
                w = unpermute_rope(w, cfg.n_heads if short == "attn_q.weight" else cfg.n_kv_heads)
            yield key, w
    return cfg, items()
