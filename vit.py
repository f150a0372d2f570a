"""
EVA ViT-G/14, the frozen image encoder of BLIP-2 and MiniGPT-4 (LAVIS `eva_vit.py`, `create_eva_vit_g`).

A plain pre-norm Vision Transformer: 14x14 patches -> [CLS] + 256 patch tokens, learned absolute
positions, 39 blocks of (LayerNorm -> attention -> residual, LayerNorm -> MLP with exact GELU -> residual),
and NO final norm (BLIP-2 applies its own `ln_vision` afterwards, see model.py).
Two EVA details: the qkv projection has no bias parameter, the bias used is cat(q_bias, 0, v_bias) (keys get
no bias); the MLP is 6144 wide (mlp_ratio 4.3637), not 4x.

Module names are exactly the keys of LAVIS' `eva_vit_g.pth`, so loading is an identity mapping.

Precision (mirrors the original, which keeps these in fp32 and runs under fp16 autocast):
  Linear/Conv weights and biases are stored in the `dtype` given to from_pretrained (bf16/fp16 on GPU);
  cls_token, pos_embed, q_bias/v_bias and every LayerNorm stay fp32; the residual stream is fp32 and each
  Linear casts its input to its weight dtype. forward therefore always returns fp32. On CPU use fp32.
"""
import math
import re
import sys
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import checks
from attention import attention
from checkpoint import CheckpointError, assign, check_complete, from_file, param_dtype, read_checkpoint, unwrap


@dataclass
class ViTConfig:
    img_size: int = 224        # the positions in pos_embed cover (img_size // patch_size)**2 patches
    patch_size: int = 14
    width: int = 1408
    depth: int = 39            # EVA-CLIP has 40 blocks; BLIP-2/MiniGPT-4 use the first 39
    n_heads: int = 16          # head dim 88
    mlp_hidden: int = 6144
    norm_eps: float = 1e-6

    LIMITS = dict(img_size=(1, 4096), patch_size=(1, 1024), width=(1, 16384), depth=(1, 256), n_heads=(1, 1024),
                  mlp_hidden=(1, 65536), norm_eps=(0, 1, "open"))

    def __post_init__(self):  # every field's type and range (checks.py)
        checks.check_fields(self, "ViTConfig", self.LIMITS)
        checks.divisible("ViTConfig", "width", self.width, "n_heads", self.n_heads)

    @classmethod
    def from_name(cls, name):
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @property
    def grid(self):
        return self.img_size // self.patch_size


PRESETS = {
    "eva-vit-g": dict(),
    "tiny": dict(width=64, depth=2, n_heads=4, mlp_hidden=279),  # the shapes of tests/fixtures/reference/tiny
    "shapes": dict(img_size=168, patch_size=56, width=192, depth=4, n_heads=4, mlp_hidden=768),  # 3 x 3: a patch a place
}
EVA_CLIP_DEPTH = 40  # a config-less load of a 40-block file keeps the first 39, as MiniGPT-4 does


class Linear(nn.Linear):
    """nn.Linear that casts its input to the weight dtype (the residual stream is fp32)."""

    def forward(self, x):
        return super().forward(x.to(self.weight.dtype))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (its parameters are kept in fp32); returns fp32."""

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = Linear(cfg.width, 3 * cfg.width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(cfg.width))
        self.v_bias = nn.Parameter(torch.zeros(cfg.width))
        self.proj = Linear(cfg.width, cfg.width)

    def forward(self, x):  # (B, N, C)
        B, N, C = x.shape
        w = self.qkv.weight
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias]).to(w.dtype)  # no k bias
        qkv = F.linear(x.to(w.dtype), w, bias)                                    # (B, N, 3C)
        q, k, v = qkv.view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, D)
        y = attention(q, k, v)                                                    # (B, H, N, D)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))                      # (B, N, C)


class Mlp(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = Linear(cfg.width, cfg.mlp_hidden)
        self.fc2 = Linear(cfg.mlp_hidden, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x):  # (B, N, C) fp32
        x = x + self.attn(self.norm1(x)).float()
        return x + self.mlp(self.norm2(x)).float()


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x):  # (B, 3, H, W) -> (B, gh * gw, C)
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.config = cfg
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, cfg.width))
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))

    def position_embedding(self, gh, gw):
        """pos_embed for a gh x gw patch grid: the stored one, or its patch part resized (bicubic, as LAVIS'
        `interpolate_pos_embed`) for other input sizes such as 448 (CLS position kept). (1, 1 + gh*gw, C)"""
        g = self.config.grid
        if (gh, gw) == (g, g):
            return self.pos_embed
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2)                       # (1, C, g, g)
        grid = F.interpolate(grid.float(), size=(gh, gw), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1)                   # (1, gh*gw, C)
        return torch.cat([cls_pos, grid.to(cls_pos.dtype)], dim=1)

    def forward(self, pixels):  # (B, 3, H, W), H and W multiples of the patch size
        B, _, H, W = pixels.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        x = self.patch_embed(pixels).float()                                      # (B, N, C)
        x = torch.cat([self.cls_token.float().expand(B, -1, -1), x], dim=1)       # (B, 1 + N, C)
        x = x + self.position_embedding(H // p, W // p).float()
        for block in self.blocks:
            x = block(x)
        return x                                                                  # (B, 1 + N, C) fp32

    @classmethod
    def from_pretrained(cls, path, config=None, dtype=torch.float32, device="cpu"):
        """Load LAVIS' `eva_vit_g.pth` (a plain state dict, usually fp16). Width, patch size, MLP width and
        image size always come from the shapes; heads and eps from `config` (default ViTConfig()). Depth:
        config's if given (the file must have at least that many blocks), else the file's block count (a
        40-block EVA-CLIP file keeps 39); extra blocks are dropped with a log line. Every other key must fit."""
        sd = unwrap(read_checkpoint(path), path)
        try:
            cfg, n_blocks = infer_config(sd, config, path)
        except ValueError as e:  # a shape outside ViTConfig's limits
            raise CheckpointError(f"{path}: {e}") from None
        if n_blocks > cfg.depth:
            print(f"vit: {path} holds {n_blocks} blocks, using the first {cfg.depth} "
                  f"(dropping blocks {cfg.depth}..{n_blocks - 1})", file=sys.stderr)
        with torch.device("meta"):
            model = cls(cfg)
        for key, t in sd.items():
            m = re.match(r"blocks\.(\d+)\.", key)
            if m and int(m.group(1)) >= cfg.depth:
                continue  # the dropped trailing block(s), announced above
            try:
                assign(model, key, t, param_dtype(model, key, dtype), device)
            except CheckpointError as e:
                raise CheckpointError(f"{path}: {e}") from None
        check_complete(model, str(path))
        return model.eval()


def infer_config(sd, config, path):
    """ViTConfig from the checkpoint shapes (+ heads/eps/depth from config) and the file's block count."""
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"{path}: missing key {key} (not an EVA ViT checkpoint?)")
        return tuple(sd[key].shape)

    if len(shape("patch_embed.proj.weight")) != 4 or len(shape("pos_embed")) != 3:
        raise CheckpointError(f"{path}: patch_embed.proj.weight must be 4-D and pos_embed 3-D")
    width, _, patch, _ = shape("patch_embed.proj.weight")
    n_pos = shape("pos_embed")[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise CheckpointError(f"{path}: pos_embed has {n_pos} patch positions, not a square grid")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    found = dict(width=width, patch_size=patch, img_size=grid * patch, mlp_hidden=shape("blocks.0.mlp.fc1.weight")[0])
    if config is None:
        return replace(ViTConfig(), depth=n_blocks - (n_blocks == EVA_CLIP_DEPTH), **found), n_blocks
    return from_file(config, found, path), n_blocks
