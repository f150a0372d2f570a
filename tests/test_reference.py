"""Parity with what the ORIGINAL MiniGPT-4 code computed (tests/fixtures/reference/*/reference*.safetensors).

Sections:
  1. vision: EVA ViT -> ln_vision -> Q-Former (vit.py, qformer.py), from the PNG files and from the
     recorded pixel_values
  2. end to end (model.py, llama.py): appended below by its owner
Every dimension comes from the folder's config.json `dims` or the checkpoints.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, load_reference
from test_qformer import qformer_config
from test_vit import vit_config

from qformer import QFormer
from vit import VisionTransformer

# ---------------------------------------------------------------------------------------------------------
# 1. vision: ViT -> ln_vision -> Q-Former (vicuna0 reference)
# ---------------------------------------------------------------------------------------------------------
REFERENCE_PNGS = ["image0_rgba.png", "image1_palette.png"]  # batch order of reference.safetensors


def load_vision(ref_dir, ref_config):
    """(vit, qformer, ln_vision(x)) loaded from the folder's original-format checkpoints, fp32 CPU."""
    vit = VisionTransformer.from_pretrained(ref_dir / "eva_vit_g.pth", vit_config(ref_config))
    qformer, ln = QFormer.from_pretrained(ref_dir / "blip2_pretrained.pth", qformer_config(ref_config))
    eps = ref_config["dims"]["ln_vision"]["eps"]
    return vit, qformer, lambda x: F.layer_norm(x.float(), x.shape[-1:], ln["weight"], ln["bias"], eps)


@torch.no_grad()
def run_vision(ref_dir, ref_config, pixels):
    """Every intermediate the reference recorded, named as in reference.safetensors."""
    vit, qformer, ln_vision = load_vision(ref_dir, ref_config)
    out = {}
    hooks = [vit.blocks[0].register_forward_hook(lambda m, i, o: out.__setitem__("vit.block0", o)),
             qformer.embeddings.register_forward_hook(lambda m, i, o: out.__setitem__("qformer.embeddings", o)),
             qformer.encoder.layer[0].register_forward_hook(lambda m, i, o: out.__setitem__("qformer.layer0", o))]
    out["vit.out"] = vit(pixels)
    out["ln_vision.out"] = ln_vision(out["vit.out"])
    out["qformer.last_hidden_state"] = qformer(out["ln_vision.out"])
    for h in hooks:
        h.remove()
    return out


VISION_OUTPUTS = ["vit.block0", "vit.out", "ln_vision.out", "qformer.embeddings", "qformer.layer0",
                  "qformer.last_hidden_state"]


def test_vision_from_reference_pixels(ref_dir, ref_config):
    """ViT and Q-Former alone: the recorded pixel_values in, so a preprocessing bug cannot mask a model bug."""
    ref, _ = load_reference(ref_dir)
    ours = run_vision(ref_dir, ref_config, ref["pixel_values"])
    for name in VISION_OUTPUTS:
        assert_close(ours[name], ref[name], name)


def test_vision_from_png(ref_dir, ref_config):
    """The whole chain from the PNG files: data.preprocess -> ViT -> ln_vision -> Q-Former."""
    data = pytest.importorskip("data", reason="data.py (preprocess) not written yet")
    ref, _ = load_reference(ref_dir)
    pixels = torch.stack([data.preprocess(ref_dir / name) for name in REFERENCE_PNGS])
    assert_close(pixels, ref["pixel_values"], "pixel_values")
    ours = run_vision(ref_dir, ref_config, pixels)
    for name in VISION_OUTPUTS:
        assert_close(ours[name], ref[name], f"{name} (from the PNGs)")


# ---------------------------------------------------------------------------------------------------------
# 2. end to end: appended by the model.py owner
# ---------------------------------------------------------------------------------------------------------
