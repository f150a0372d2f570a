"""vit.py against transformers' Blip2VisionModel (independent implementation of the same EVA ViT), plus loading."""
import re

import pytest
import torch
import torch.nn as nn
from conftest import assert_close, load_reference

from checkpoint import CheckpointError
from model import folder_configs  # config.json `dims` -> our configs (shared with model.py)
from vit import ViTConfig, VisionTransformer


def hf_config(cfg):
    from transformers import Blip2VisionConfig
    c = Blip2VisionConfig(hidden_size=cfg.width, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.depth,
                          num_attention_heads=cfg.n_heads, image_size=cfg.img_size, patch_size=cfg.patch_size,
                          layer_norm_eps=cfg.norm_eps, hidden_act="gelu", qkv_bias=True)
    c._attn_implementation = "eager"
    return c


def to_hf(ours):
    """Our (= LAVIS) state dict -> Blip2VisionModel names; q_bias/v_bias -> one qkv bias with zeros for k."""
    out = {}
    for k, v in ours.state_dict().items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        k = k.replace("cls_token", "embeddings.class_embedding").replace("pos_embed", "embeddings.position_embedding")
        k = k.replace("patch_embed.proj", "embeddings.patch_embedding").replace("blocks.", "encoder.layers.")
        k = k.replace(".attn.proj.", ".self_attn.projection.").replace(".attn.qkv.", ".self_attn.qkv.")
        k = k.replace(".norm1.", ".layer_norm1.").replace(".norm2.", ".layer_norm2.")
        out[k] = v
    for i, b in enumerate(ours.blocks):
        out[f"encoder.layers.{i}.self_attn.qkv.bias"] = torch.cat(
            [b.attn.q_bias, torch.zeros_like(b.attn.q_bias), b.attn.v_bias])
    return out


def load_tiny(ref_dir, ref_config):
    return VisionTransformer.from_pretrained(ref_dir / "eva_vit_g.pth", folder_configs(ref_dir)[0])


@torch.no_grad()
def test_matches_transformers(ref_dir, ref_config):
    from transformers import Blip2VisionModel
    ours = load_tiny(ref_dir, ref_config)
    hf = Blip2VisionModel(hf_config(ours.config)).eval()
    hf.post_layernorm = nn.Identity()  # the EVA ViT has no final norm (BLIP-2's ln_vision is separate)
    hf.load_state_dict(to_hf(ours), strict=True)
    pixels = load_reference(ref_dir)[0]["pixel_values"]
    assert_close(ours(pixels), hf(pixels).last_hidden_state, "vit vs transformers at 224")
    # a larger input: both resize the 16x16 position grid bicubically, CLS position kept
    big = torch.nn.functional.interpolate(pixels, scale_factor=2, mode="bilinear")
    ref = hf(big, interpolate_pos_encoding=True).last_hidden_state
    assert ref.shape[1] == 1 + (big.shape[-1] // ours.config.patch_size) ** 2
    assert_close(ours(big), ref, "vit vs transformers at 2x size")


def test_position_interpolation(ref_dir, ref_config):
    vit = load_tiny(ref_dir, ref_config)
    g, C = vit.config.grid, vit.config.width
    assert vit.position_embedding(g, g) is vit.pos_embed  # 224: the stored table itself
    # the bicubic path at the stored size is an identity too
    same = torch.nn.functional.interpolate(vit.pos_embed[:, 1:].reshape(1, g, g, C).permute(0, 3, 1, 2),
                                           size=(g, g), mode="bicubic", align_corners=False)
    assert torch.equal(same.permute(0, 2, 3, 1).reshape(1, g * g, C), vit.pos_embed[:, 1:].detach())
    pos = vit.position_embedding(2 * g, 2 * g)
    assert pos.shape == (1, 1 + 4 * g * g, C)
    assert torch.equal(pos[:, 0], vit.pos_embed[:, 0])
    with torch.no_grad():
        out = vit(torch.randn(1, 3, 2 * vit.config.img_size, 2 * vit.config.img_size))
    assert out.shape == (1, 1 + 4 * g * g, C)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, vit.config.img_size + 1, vit.config.img_size))


def test_defaults_and_parameter_count_match_transformers():
    from transformers import Blip2VisionConfig, Blip2VisionModel
    cfg = ViTConfig()
    assert cfg == ViTConfig.from_name("eva-vit-g")
    d = Blip2VisionConfig()  # transformers' defaults are BLIP-2's EVA ViT-G too
    assert (cfg.width, cfg.mlp_hidden, cfg.depth, cfg.n_heads, cfg.img_size, cfg.patch_size, cfg.norm_eps) == (
        d.hidden_size, d.intermediate_size, d.num_hidden_layers, d.num_attention_heads, d.image_size,
        d.patch_size, d.layer_norm_eps)
    with torch.device("meta"):
        ours, hf = VisionTransformer(cfg), Blip2VisionModel(hf_config(cfg))
    n_hf = sum(p.numel() for p in hf.parameters())
    n_hf -= sum(p.numel() for p in hf.post_layernorm.parameters())  # no final norm in EVA ViT
    n_hf -= cfg.depth * cfg.width  # its qkv bias stores the always-zero k bias as a parameter; we don't
    assert sum(p.numel() for p in ours.parameters()) == n_hf


@torch.no_grad()
def test_bf16_weights_fp32_norms(ref_dir, ref_config):
    vit = VisionTransformer.from_pretrained(ref_dir / "eva_vit_g.pth", folder_configs(ref_dir)[0], dtype=torch.bfloat16)
    for name, p in vit.named_parameters():
        want = torch.bfloat16 if re.search(r"(qkv|proj|fc\d)\.(weight|bias)$", name) else torch.float32
        assert p.dtype == want, name
    ref = load_reference(ref_dir)[0]
    out = vit(ref["pixel_values"])
    assert out.dtype == torch.float32
    assert (out - ref["vit.out"]).abs().max() < 0.05 * ref["vit.out"].abs().max()


def test_extra_block_dropped(ref_dir, ref_config, tmp_path, capsys):
    cfg = folder_configs(ref_dir)[0]
    sd = torch.load(ref_dir / "eva_vit_g.pth", weights_only=True)
    last = cfg.depth - 1
    sd.update({k.replace(f"blocks.{last}.", f"blocks.{cfg.depth}."): v.clone()
               for k, v in sd.items() if k.startswith(f"blocks.{last}.")})
    torch.save(sd, tmp_path / "eva.pth")
    vit = VisionTransformer.from_pretrained(tmp_path / "eva.pth", cfg)
    assert len(vit.blocks) == cfg.depth
    assert f"using the first {cfg.depth}" in capsys.readouterr().err
    with torch.no_grad():
        ref = load_reference(ref_dir)[0]
        assert_close(vit(ref["pixel_values"]), ref["vit.out"], "vit.out with an extra block in the file")


def test_eva_clip_40_blocks_without_config(tmp_path, capsys):
    cfg = ViTConfig(img_size=28, width=32, depth=40, mlp_hidden=8)  # EVA-CLIP's 40 blocks, tiny widths
    torch.save({k: v.half() for k, v in VisionTransformer(cfg).state_dict().items()}, tmp_path / "eva.pth")
    vit = VisionTransformer.from_pretrained(tmp_path / "eva.pth")
    assert len(vit.blocks) == 39 and vit.config.depth == 39
    assert (vit.config.width, vit.config.mlp_hidden, vit.config.img_size) == (32, 8, 28)
    assert "holds 40 blocks, using the first 39" in capsys.readouterr().err


def bad_files(ref_dir, cfg, tmp_path):
    """(name, path, expected substring) for each kind of broken checkpoint."""
    src = ref_dir / "eva_vit_g.pth"
    sd = torch.load(src, weights_only=True)
    cases = [("missing file", tmp_path / "nope.pth", "not found")]
    (tmp_path / "trunc.pth").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    cases.append(("truncated", tmp_path / "trunc.pth", "not a readable"))

    def variant(name, change, expect):
        d = dict(sd)
        change(d)
        torch.save(d, tmp_path / f"{name}.pth")
        cases.append((name, tmp_path / f"{name}.pth", expect))

    variant("unexpected", lambda d: d.update({"blocks.0.attn.rel_bias": sd["blocks.0.attn.q_bias"]}),
            "unexpected key in checkpoint: blocks.0.attn.rel_bias")
    last = f"blocks.{cfg.depth - 1}.mlp.fc1.weight"
    variant("shape", lambda d: d.update({last: sd[last][:-1]}), f"shape mismatch for {last}")
    variant("missing", lambda d: d.pop("blocks.0.norm2.bias"), "missing 1 key(s): blocks.0.norm2.bias")
    variant("no_pos", lambda d: d.pop("pos_embed"), "missing key pos_embed")
    variant("fewer_blocks", lambda d: [d.pop(k) for k in list(d) if k.startswith(f"blocks.{cfg.depth - 1}.")],
            f"blocks.{cfg.depth - 1}.")
    return cases


def test_bad_checkpoints(ref_dir, ref_config, tmp_path):
    cfg = folder_configs(ref_dir)[0]
    for name, path, expect in bad_files(ref_dir, cfg, tmp_path):
        with pytest.raises(CheckpointError) as e:
            VisionTransformer.from_pretrained(path, cfg)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg, f"{name}: {msg}"


def test_shapes_come_from_the_checkpoint(ref_dir, ref_config, capsys):
    """Config supplies heads, eps and depth; widths and sizes are the file's (a differing config value is logged)."""
    cfg = folder_configs(ref_dir)[0]
    vit = VisionTransformer.from_pretrained(ref_dir / "eva_vit_g.pth", ViTConfig(n_heads=cfg.n_heads, depth=cfg.depth,
                                                                                 norm_eps=cfg.norm_eps))
    assert vit.config == cfg
    assert "config values replaced by the checkpoint's" in capsys.readouterr().err
