"""
The BLIP-2 Q-Former, reduced to the query path that MiniGPT-4 runs (LAVIS `Qformer.py`, `init_Qformer`).

A BERT-base encoder (post-LN) whose input is 32 learned query tokens, no text: the queries go through
`embeddings.LayerNorm`, then each layer applies self-attention over the queries, cross-attention to the image
tokens (every 2nd layer, starting at 0; keys/values projected from the 1408-wide ViT tokens), and the query
FFN (`intermediate_query`, `output_query`). Output: (B, 32, 768). MiniGPT-4 deletes the text parts (word and
position embeddings, each layer's text FFN `intermediate`/`output`, the LM head `cls`); so do we.

Names follow the BLIP-2 checkpoint with the `Qformer.bert.` prefix stripped (one rule, `PREFIX`);
`query_tokens` keeps its name; `ln_vision.*` is handed back to the caller (model.py owns ln_vision).

Precision, as in vit.py: Linear weights in `dtype`; LayerNorms and query_tokens in fp32; the hidden stream is
fp32 and each Linear casts its input to its weight dtype, so forward returns fp32. On CPU use fp32.
"""
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import checks
from attention import attention
from checkpoint import CheckpointError, assign, check_complete, from_file, param_dtype, read_checkpoint, unwrap
from vit import LayerNorm, Linear  # the same fp32-stream building blocks as the ViT


@dataclass
class QFormerConfig:
    hidden_size: int = 768
    n_layers: int = 12
    n_heads: int = 12
    intermediate_size: int = 3072
    norm_eps: float = 1e-12
    encoder_width: int = 1408          # width of the image tokens (EVA ViT-G)
    n_queries: int = 32
    cross_attention_freq: int = 2
    cross_attention_layers: Optional[tuple] = None  # None -> (0, freq, 2 * freq, ...)
    LIMITS = dict(hidden_size=(1, 16384), n_layers=(1, 256), n_heads=(1, 1024), intermediate_size=(1, 65536),
                  norm_eps=(0, 1, "open"), encoder_width=(1, 16384), n_queries=(1, 4096), cross_attention_freq=(1, 256),
                  cross_attention_layers=(0, 255))

    def __post_init__(self):  # every field's type and range (checks.py)
        if isinstance(self.cross_attention_layers, list):
            self.cross_attention_layers = tuple(self.cross_attention_layers)
        checks.check_fields(self, "QFormerConfig", self.LIMITS)
        checks.divisible("QFormerConfig", "hidden_size", self.hidden_size, "n_heads", self.n_heads)
        if self.cross_attention_layers is None:
            self.cross_attention_layers = tuple(range(0, self.n_layers, self.cross_attention_freq))
        if any(i >= self.n_layers for i in self.cross_attention_layers):
            raise ValueError(f"QFormerConfig: cross_attention_layers {self.cross_attention_layers} must be < "
                             f"n_layers {self.n_layers}")

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name])


PRESETS = {
    "blip2": dict(),
    "tiny": dict(hidden_size=64, n_layers=2, n_heads=4, intermediate_size=256, encoder_width=64, n_queries=4),
    "shapes": dict(hidden_size=192, n_layers=4, n_heads=4, intermediate_size=768, encoder_width=192, n_queries=10,
                   cross_attention_freq=1),  # the miniature's: 9 queries, one per place, and one for the whole image
}

PREFIX = "Qformer.bert."  # checkpoint key = PREFIX + our key (except query_tokens, ln_vision.*)
# Keys of BLIP-2 files that the query path never uses (text side, other heads, the LLM projections).
SKIP = [
    r"t5_proj\.", r"opt_proj\.",                                   # BLIP-2's projection into its own LLM
    r"Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", r"Qformer\.bert\.embeddings\.position_ids$",
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",  # the text FFN (not *_query)
    r"Qformer\.cls\.",                                               # the LM head
    r"(vision_proj|text_proj|itm_head)\.", r"temp$",                # stage-1 contrastive / matching heads
    r"visual_encoder\.",                                             # the ViT comes from eva_vit_g.pth
]
SKIP_RE = re.compile("|".join(f"(?:{p})" for p in SKIP))


class SelfAttention(nn.Module):
    """BERT attention projections; keys/values from `kv` (the queries, or the image tokens)."""

    def __init__(self, cfg, kv_width):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.query = Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = Linear(kv_width, cfg.hidden_size)
        self.value = Linear(kv_width, cfg.hidden_size)

    def forward(self, x, kv):  # x (B, T, C), kv (B, S, Ckv)
        B, T, C = x.shape
        heads = lambda t: t.view(B, -1, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, L, D)
        y = attention(heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv)))   # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)


class Output(nn.Module):
    """dense -> (dropout) -> LayerNorm(+ residual): BERT's post-LN sublayer output."""

    def __init__(self, cfg, in_width):
        super().__init__()
        self.dense = Linear(in_width, cfg.hidden_size)
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h).float() + residual)


class Attention(nn.Module):
    def __init__(self, cfg, kv_width):
        super().__init__()
        self.self = SelfAttention(cfg, kv_width)
        self.output = Output(cfg, cfg.hidden_size)

    def forward(self, x, kv):
        return self.output(self.self(x, kv), x)


class Intermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact (erf) GELU


class Layer(nn.Module):
    def __init__(self, cfg, has_cross):
        super().__init__()
        self.attention = Attention(cfg, cfg.hidden_size)
        if has_cross:
            self.crossattention = Attention(cfg, cfg.encoder_width)
        self.intermediate_query = Intermediate(cfg)
        self.output_query = Output(cfg, cfg.intermediate_size)

    def forward(self, x, image):  # x (B, nq, C) fp32, image (B, N, W)
        x = self.attention(x, x)
        if hasattr(self, "crossattention"):
            x = self.crossattention(x, image)
        return self.output_query(self.intermediate_query(x), x)


class Embeddings(nn.Module):
    """With queries only, BERT's embedding layer is just a LayerNorm (dropout is off in eval)."""

    def __init__(self, cfg):
        super().__init__()
        self.LayerNorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)

    def forward(self, queries):
        return self.LayerNorm(queries)


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg, i in cfg.cross_attention_layers) for i in range(cfg.n_layers))


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.config = cfg
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.n_queries, cfg.hidden_size))
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, image_embeds):  # (B, N, W): ln_vision(ViT output)
        B = image_embeds.shape[0]
        layers = self.encoder.layer
        image_embeds = image_embeds.to(layers[0].attention.self.query.weight.dtype)  # once, not per layer
        x = self.embeddings(self.query_tokens.float().expand(B, -1, -1))  # (B, nq, C)
        for layer in layers:
            x = layer(x, image_embeds)
        return x                                                           # (B, nq, C) fp32

    @classmethod
    def from_pretrained(cls, path, config=None, dtype=torch.float32, device="cpu"):
        """Load a BLIP-2 checkpoint ({"model": {...}}) -> (qformer, ln_vision_state {"weight", "bias"}).
        Widths, layer count, query count and cross-attention layers always come from the keys and shapes;
        heads and eps from `config` (default QFormerConfig()). Keys matching SKIP are ignored; every other one is used."""
        sd = unwrap(read_checkpoint(path), path)
        try:
            cfg = infer_config(sd, config, path)
        except ValueError as e:  # a shape outside QFormerConfig's limits
            raise CheckpointError(f"{path}: {e}") from None
        with torch.device("meta"):
            model = cls(cfg)
        ln_vision = {}
        for key, t in sd.items():
            if SKIP_RE.match(key):
                continue
            if key in ("ln_vision.weight", "ln_vision.bias"):
                ln_vision[key.rpartition(".")[2]] = t.to(device=device, dtype=torch.float32)
                continue
            name = key[len(PREFIX):] if key.startswith(PREFIX) else key
            if name == key and key != "query_tokens":
                raise CheckpointError(f"{path}: unexpected key in checkpoint: {key}")
            try:
                assign(model, name, t, param_dtype(model, name, dtype), device)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e} (checkpoint key {key})") from None
        check_complete(model, str(path))
        if set(ln_vision) != {"weight", "bias"}:
            raise CheckpointError(f"{path}: missing ln_vision.weight / ln_vision.bias")
        return model.eval(), ln_vision


def infer_config(sd, config, path):
    """QFormerConfig from the checkpoint's keys and shapes (+ heads/eps from config)."""
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"{path}: missing key {key} (not a BLIP-2 Q-Former checkpoint?)")
        return tuple(sd[key].shape)

    layers = {int(m.group(1)) for k in sd if (m := re.match(re.escape(PREFIX) + r"encoder\.layer\.(\d+)\.", k))}
    cross = sorted({int(m.group(1)) for k in sd
                    if (m := re.match(re.escape(PREFIX) + r"encoder\.layer\.(\d+)\.crossattention\.", k))})
    _, n_queries, hidden = shape("query_tokens")
    found = dict(hidden_size=hidden, n_queries=n_queries, n_layers=max(layers) + 1 if layers else 0,
                 intermediate_size=shape(PREFIX + "encoder.layer.0.intermediate_query.dense.weight")[0],
                 encoder_width=shape(f"{PREFIX}encoder.layer.{cross[0]}.crossattention.self.key.weight")[1]
                 if cross else (config or QFormerConfig()).encoder_width,
                 cross_attention_layers=tuple(cross))
    return from_file(config or QFormerConfig(), found, path, log=config is not None)
