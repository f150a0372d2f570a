"""LLaMA / Vicuna / Llama-2 in one file: config, model with a KV cache, loading (HF and Meta formats), the
sentencepiece tokenizer (decoding: generate.py). Module names are the HF checkpoint keys, so an HF folder loads as an
identity; Meta's consolidated.*.pth go through one rename table and one q/k permutation (HF's RoPE layout)."""
import glob
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import checks
from attention import attention
from checkpoint import CheckpointError, assign, check_complete, json_errors, read_checkpoint


@dataclass
class LlamaConfig:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None -> n_heads (grouped-query attention when smaller)
    vocab_size: int = 32000
    hidden_dim: int = 11008
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    LIMITS = dict(dim=(1, 65536), n_layers=(1, 1024), n_heads=(1, 1024), n_kv_heads=(1, 1024), vocab_size=(1, 2**20),
                  hidden_dim=(1, 2**18), norm_eps=(0, 1, "open"), rope_theta=(0, 1e12, "open"), max_seq_len=(1, 2**20))

    def __post_init__(self):  # every field's type and range (checks.py), before anything is built
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        checks.check_fields(self, "LlamaConfig", self.LIMITS)
        checks.divisible("LlamaConfig", "dim", self.dim, "n_heads", self.n_heads)
        checks.divisible("LlamaConfig", "n_heads", self.n_heads, "n_kv_heads", self.n_kv_heads)
        self.head_dim = self.dim // self.n_heads  # derived, not a field
        checks.divisible("LlamaConfig", "head_dim", self.head_dim, "2 (RoPE pairs)", 2)

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown LLaMA preset {name!r}: choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf(cls, path):
        """HF `config.json` (or the folder holding it) -> LlamaConfig."""
        path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        with json_errors(path), checks.open_file(path, "r", "config", limit=2**20) as f:
            c = json.load(f)
            rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 moved rope_theta here
            if rope.get("rope_type", rope.get("type", "default")) != "default" or c.get("hidden_act", "silu") != "silu":
                raise CheckpointError(f"{path}: unsupported rope scaling or activation")
            return cls(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                       n_kv_heads=c.get("num_key_value_heads"), vocab_size=c["vocab_size"],
                       hidden_dim=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
                       rope_theta=c.get("rope_theta", rope.get("rope_theta", 10000.0)),
                       max_seq_len=c.get("max_position_embeddings", 2048),
                       tie_embeddings=c.get("tie_word_embeddings", False))

    @classmethod
    def from_meta(cls, path, vocab_size):
        """Meta `params.json` -> LlamaConfig (FFN width by Meta's multiple_of rule; vocab -1 -> vocab_size)."""
        with json_errors(path), checks.open_file(path, "r", "config", limit=2**20) as f:
            p = json.load(f)
            hidden = int(2 * 4 * p["dim"] / 3)  # Meta's FeedForward: 2/3 of 4 * dim, times a multiplier,
            hidden = int(hidden * (p.get("ffn_dim_multiplier") or 1))
            multiple_of = p.get("multiple_of", 256)  # rounded up to a multiple of this
            hidden = multiple_of * math.ceil(hidden / multiple_of)
            if p.get("vocab_size", -1) > 0:  # -1 in Meta's files: the tokenizer decides
                vocab_size = p["vocab_size"]
            return cls(dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads"),
                       vocab_size=vocab_size, hidden_dim=hidden, norm_eps=p.get("norm_eps", 1e-6),
                       rope_theta=p.get("rope_theta", 10000.0))


PRESETS = {
    "llama-7b": dict(),
    "vicuna-7b": dict(),  # Vicuna v0 keeps LLaMA-7B's shapes (some builds have vocab 32001: from_hf reads it)
    "vicuna-13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-7b": dict(norm_eps=1e-5, max_seq_len=4096),
    "smollm2-135m": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                         norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True),  # GGUF
    "tiny": dict(dim=64, n_layers=2, n_heads=4, vocab_size=1000, hidden_dim=172),
}


# ----------------------------------------------------------------------------------------------- model
class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # computed in fp32 and cast back, exactly as HF does
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype=torch.float32):
    """positions (B, T) -> cos, sin (B, 1, T, head_dim) computed in fp32, returned in `dtype` (as HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim))
    freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D): HF's layout, the half-table twice
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, D), cos/sin in x's dtype; rotate-half: pairs (i, i + D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, key_mask, cache, layer):  # x (B, T, C)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys = cache prefix + the new tokens
            k, v = cache.write(layer, k, v)  # (B, Hkv, pos + T, D)
        y = attention(q, k, v, causal=True, mask=key_mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):  # SwiGLU
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, key_mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, key_mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys, values (n_layers, B, Hkv, max_len, D), key-valid mask (B, max_len); slots [0, pos) are filled."""

    def __init__(self, cfg, batch_size, max_len, dtype, device):
        shape = (cfg.n_layers, batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.pos, self.max_len = 0, max_len

    def n_valid(self):  # (B,) number of real tokens held per row
        return self.valid[:, :self.pos].sum(-1)

    def write(self, layer, k, v):  # k, v (B, Hkv, T, D) at slots [pos, pos + T)
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, index):  # select/reorder rows along the batch (beam search)
        self.k, self.v, self.valid = self.k[:, index], self.v[:, index], self.valid[index]


class Llama(nn.Module):
    gradient_checkpointing = False  # set True to recompute each block's activations in backward (training)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids):  # (B, T) -> (B, T, C)
        return self.model.embed_tokens(ids)

    def new_cache(self, batch_size, max_len):
        w = self.model.embed_tokens.weight  # never quantized
        return KVCache(self.cfg, batch_size, max_len, w.dtype, w.device)

    def forward(self, idx=None, embeds=None, mask=None, positions=None, cache=None, logits_at=None):
        """idx (B, T) ids or embeds (B, T, C); mask (B, T) 1 = real, 0 = pad (the new tokens); positions (B, T)
        default to the number of real tokens before each token, cache included. Appends to `cache` if given.
        -> fp32 logits (B, T, V), or (N, V) at the N True positions of logits_at (B, T) bool, row-major.
        `gradient_checkpointing` with grad enabled (even in eval mode): blocks recomputed in backward."""
        x = self.embed(idx) if embeds is None else embeds
        B, T, _ = x.shape
        key_mask = None if mask is None else mask.bool()  # None: all real (lets SDPA use its causal path)
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask.bool()
        if positions is None:  # number of real tokens before each token
            past = 0 if cache is None else cache.n_valid()[:, None]  # (B, 1)
            positions = past + mask.long().cumsum(-1) - mask.long()  # (B, T)
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)  # once, not per layer
        if cache is not None:
            if cache.pos + T > cache.max_len:
                raise ValueError(f"KV cache full: {cache.pos} + {T} tokens > max_len {cache.max_len}")
            cache.valid[:, cache.pos:cache.pos + T] = mask
            key_mask = cache.valid[:, :cache.pos + T]  # (B, pos + T)
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, key_mask, cache, i, use_reentrant=False)
            else:
                x = block(x, cos, sin, key_mask, cache, i)
        if cache is not None:
            cache.pos += T
        if logits_at is not None:  # the LM head only where logits are needed
            x = x[logits_at]  # (N, C)
        return self.lm_head(self.model.norm(x)).float()  # fp32 whatever the model dtype

    @classmethod
    def from_pretrained(cls, folder, dtype=torch.float32, device="cpu", quant=None, group_size=32):
        """HF folder (config.json + safetensors / .bin, sharded or not), Meta folder (params.json +
        consolidated.*.pth) or a GGUF file (or a folder holding one: gguf_reader.py). Built on the meta device, filled
        shard by shard (GGUF: tensor by tensor) in `dtype` on `device`.
        quant "int8"/"int4": every Linear quantized as it is read (quant.py); a folder saved quantized needs none."""
        folder = str(folder)
        gguf_file = find_gguf(folder)
        if not gguf_file and not os.path.isdir(folder):
            raise CheckpointError(f"model folder not found: {folder}")
        if gguf_file:
            from gguf_reader import gguf_items
            cfg, items = gguf_items(gguf_file, dtype)
        elif os.path.isfile(os.path.join(folder, "config.json")):
            cfg, items = LlamaConfig.from_hf(folder), hf_items(folder)
        elif os.path.isfile(os.path.join(folder, "params.json")):
            cfg, items = meta_items(folder)
        else:
            raise CheckpointError(f"{folder}: neither config.json (HF), params.json (Meta) nor a .gguf file found")
        with torch.device("meta"):
            model = cls(cfg)
        import quant as q
        saved = q.saved_quantization(folder)  # a folder written by quant.save_quantized says how
        quant, group_size = saved if saved[0] else (quant, group_size)
        ignore = re.compile("|".join(IGNORED_KEYS + (["lm_head.weight"] if cfg.tie_embeddings else [])))
        items = ((key, tensor) for key, tensor in items if not ignore.fullmatch(key))
        if quant:
            items = q.quantized_items(q.quantize_(model, quant, group_size), items)
        for key, tensor in items:
            try:
                assign(model, key, tensor, dtype, device)
            except CheckpointError as e:  # name the folder, as every other loading error does
                raise CheckpointError(f"{folder}: {e}") from None
        if cfg.tie_embeddings and not quant:
            model.lm_head.weight = model.model.embed_tokens.weight
        check_complete(model, f"checkpoint in {folder}")
        return model.eval()


# ------------------------------------------------------------------------------------- checkpoint files
def find_gguf(path):
    """`path` if it is a .gguf file, else the one .gguf file in folder `path` (no config.json), else None."""
    path = str(path)
    if path.endswith(".gguf") and not os.path.isdir(path):
        return path  # a missing file is reported by the reader
    if not os.path.isdir(path) or any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "params.json")):
        return None
    found = sorted(glob.glob(os.path.join(path, "*.gguf")))
    if len(found) > 1:
        raise CheckpointError(f"{path}: {len(found)} .gguf files; give the one to load")
    return found[0] if found else None


IGNORED_KEYS = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"rope\.freqs"]  # buffers we recompute


def hf_items(folder):
    """Yield (key, tensor) from an HF folder, one shard in memory at a time; safetensors preferred."""
    names = ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"]
    files = [n for n in names if os.path.isfile(os.path.join(folder, n))][:1]
    if not files:
        raise CheckpointError(f"{folder}: no model.safetensors[.index.json] or pytorch_model.bin[.index.json]")
    if files[0].endswith(".index.json"):
        index = os.path.join(folder, files[0])
        with json_errors(index), checks.open_file(index, "r", "index", limit=2**26) as fh:
            files = sorted(set(json.load(fh)["weight_map"].values()))
            for f in files:
                checks.inside(folder, f, "shard")  # no absolute name, no ../, no symlink out of the folder
        for f in files:
            if not os.path.isfile(os.path.join(folder, f)):
                raise CheckpointError(f"shard {f} listed in {index} is missing")
    return (item for f in files for item in read_checkpoint(os.path.join(folder, f)).items())  # lazy: 1 shard


# Meta name -> HF name, and the dim along which model-parallel shards are concatenated (None: replicated)
META_TO_HF = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}


def meta_items(folder):
    """Meta folder -> (config, iterator of (HF key, tensor)); MP shards (13B: 2) are concatenated."""
    paths = sorted(glob.glob(os.path.join(folder, "consolidated.*.pth")))
    if not paths:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth")
    shards = [read_checkpoint(p) for p in paths]  # mmap'ed: tensors stay on disk until used
    if "tok_embeddings.weight" not in shards[0]:
        raise CheckpointError(f"{paths[0]}: missing key tok_embeddings.weight")
    cfg = LlamaConfig.from_meta(os.path.join(folder, "params.json"), shards[0]["tok_embeddings.weight"].shape[0])

    def items():
        for key in shards[0]:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)", key)
            name = m.group(2) if m else key
            if name not in META_TO_HF:
                yield key, shards[0][key]  # ignored buffers (rope.freqs) are dropped by the caller; others raise
                continue
            hf, dim = META_TO_HF[name]
            hf = f"model.layers.{m.group(1)}.{hf}" if m else hf
            if any(key not in s for s in shards):
                raise CheckpointError(f"key {key} missing from one of {paths}")
            parts = [s[key] for s in shards]
            w = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
            if name in ("attention.wq.weight", "attention.wk.weight"):
                w = unpermute_rope(w, cfg.n_heads if name == "attention.wq.weight" else cfg.n_kv_heads)
            yield hf, w
    return cfg, items()


def unpermute_rope(w, n):
    """Meta's / llama.cpp's q or k rows, RoPE pairs (2i, 2i+1) in each of n heads -> HF's pairs (i, i+D/2):
    (n * D, C) -> (n, D/2 pairs, 2, C) -> (n, 2, D/2, C): even rows of each head first, then odd."""
    return w.view(n, w.shape[0] // n // 2, 2, -1).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path):
    """The LLM's tokenizer: byte-level BPE from a GGUF file / folder holding one (bpe.py), else sentencepiece."""
    gguf_file = find_gguf(path)
    if gguf_file:
        from bpe import BPETokenizer
        return BPETokenizer.from_gguf(gguf_file)
    return Tokenizer(path)


class Tokenizer:
    """sentencepiece with slow HF's rules (transformers 4.28-4.30): a literal "<s>", "</s>" or "<unk>" becomes
    its id; the text between them is encoded piece by piece (each gets a leading "▁"). pad_id: pad, else unk."""

    def __init__(self, path):
        import sentencepiece as spm
        path = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else str(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except Exception:  # missing or unreadable file
            raise ValueError(f"{path}: missing or not a sentencepiece model") from None
        self.n_words = self.sp.vocab_size()
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self.special = {self.sp.id_to_piece(i): i for i in (self.unk_id, self.bos_id, self.eos_id) if i >= 0}
        self.split_re = re.compile("(" + "|".join(re.escape(s) for s in self.special) + ")")

    def piece_to_id(self, piece):
        return self.sp.piece_to_id(piece)

    def encode(self, text, bos=False, eos=False):
        ids = [self.bos_id] if bos else []
        for seg in self.split_re.split(text):  # each segment on its own (sp.encode("") == [])
            ids += [self.special[seg]] if seg in self.special else self.sp.encode(seg)
        return ids + ([self.eos_id] if eos else [])

    def decode(self, ids):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.sp.decode([i for i in ids if 0 <= i < self.n_words])
