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

from model import folder_configs
from qformer import QFormer
from vit import VisionTransformer

# ---------------------------------------------------------------------------------------------------------
# 1. vision: ViT -> ln_vision -> Q-Former (vicuna0 reference)
# ---------------------------------------------------------------------------------------------------------
REFERENCE_PNGS = ["image0_rgba.png", "image1_palette.png"]  # batch order of reference.safetensors


def load_vision(ref_dir, ref_config):
    """(vit, qformer, ln_vision(x)) loaded from the folder's original-format checkpoints, fp32 CPU."""
    vit_cfg, qf_cfg, _ = folder_configs(ref_dir)
    vit = VisionTransformer.from_pretrained(ref_dir / "eva_vit_g.pth", vit_cfg)
    qformer, ln = QFormer.from_pretrained(ref_dir / "blip2_pretrained.pth", qf_cfg)
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
# MiniGPT4.from_pretrained on each fixture folder, both variants: image embeddings, the training batches
# (inputs_embeds, attention_mask, labels, loss, target logits, token NLL) and the chat (prompt ids, context,
# logits, greedy scores, output ids, answer text) with and without the recorded repetition penalty.
import functools  # noqa: E402

from model import MiniGPT4  # noqa: E402

VARIANTS = {"vicuna0": "vicuna-7b", "llama2": "llama2-7b"}


@functools.lru_cache(maxsize=None)
def e2e_model(ref_dir, variant):
    return MiniGPT4.from_pretrained(ref_dir, VARIANTS[variant])


@pytest.fixture(params=list(VARIANTS))
def e2e(request, ref_dir):
    ref, js = load_reference(ref_dir, request.param)
    return e2e_model(ref_dir, request.param), ref, js


def test_e2e_img_embeds(e2e, ref_dir):
    from data import preprocess
    model, ref, js = e2e
    pixels = torch.stack([preprocess(ref_dir / c["image"]) for c in js["chat"]])
    emb, atts = model.encode_img(pixels)
    assert_close(emb, ref["img_embeds"], "img_embeds")
    assert atts.shape == emb.shape[:2] and bool((atts == 1).all())
    if "llama_proj.in" in ref:  # llama2: the grouped patch tokens, (B, N/4, 4W)
        captured = {}
        h = model.llama_proj.register_forward_hook(lambda mod, inp, out: captured.update(x=inp[0]))
        model.encode_img(pixels)
        h.remove()
        assert_close(captured["x"], ref["llama_proj.in"], "llama_proj.in")
    for i, c in enumerate(js["chat"]):  # encoded alone, as Chat.upload_img does
        assert_close(model.encode_img(pixels[i:i + 1])[0], ref[f"chat{i}.img_embeds"], f"chat{i}.img_embeds")


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_e2e_training_batch(e2e, ref_config, stage):
    model, ref, js = e2e
    s = js[stage]
    prompts = None
    if s["prompt"] is not None:
        prompts = ref_config["stage2_instruction"]
        assert model.cfg.prompt_template.format(prompts) == s["prompt"]
    assert (s["end_sym"], s["max_txt_len"]) == (model.cfg.end_sym[prompts is not None],
                                                model.cfg.max_txt_len[prompts is not None])
    emb, mask, labels = model.build_inputs(ref["img_embeds"], js["captions"], prompts)
    assert_close(emb, ref[f"{stage}.inputs_embeds"], f"{stage}.inputs_embeds")
    assert mask.tolist() == ref[f"{stage}.attention_mask"].tolist() == s["attention_mask"]
    assert labels.tolist() == ref[f"{stage}.labels"].tolist() == s["labels"]
    loss, logits = model.lm_loss(emb, mask, labels)  # logits only at the target positions, row-major
    assert_close(loss, ref[f"{stage}.loss"], f"{stage}.loss")
    idx = ref[f"{stage}.target_index"]
    assert (labels[:, 1:] != -100).nonzero().tolist() == idx.tolist()  # the reference's row order
    assert_close(logits, ref[f"{stage}.target_logits"], f"{stage}.target_logits")
    nll = F.cross_entropy(logits, labels[idx[:, 0], idx[:, 1] + 1], reduction="none")
    assert_close(nll, ref[f"{stage}.token_nll"], f"{stage}.token_nll")


def test_e2e_forward_from_pixels(e2e, ref_dir, ref_config):
    model, ref, js = e2e
    pixels = load_reference(ref_dir, "vicuna0")[0]["pixel_values"]  # shared by both variants
    loss = model(pixels, js["captions"], ref_config["stage2_instruction"])
    assert_close(loss, ref["stage2.loss"], "forward loss")


def test_e2e_chat(e2e, ref_dir):
    from data import preprocess
    from sample import Chat
    model, ref, js = e2e
    for i, c in enumerate(js["chat"]):
        segs = c["prompt"].split("<ImageHere>")
        assert segs == c["prompt_segments"]
        assert [[ids] for ids in model.tokenize_segments(c["prompt"])] == c["prompt_segment_ids"]
        ctx = model.splice(c["prompt"], [ref[f"chat{i}.img_embeds"][0]])
        assert_close(ctx, ref[f"chat{i}.context_embeds"], f"chat{i}.context_embeds")
        assert ctx.shape[1] == c["embeds_len"]
        assert_close(model.llama_model(embeds=ctx), ref[f"chat{i}.logits"], f"chat{i}.logits")
        kw = c["generate_kwargs"]
        assert kw["repetition_penalty"] == model.cfg.repetition_penalty  # the variant's default
        g = model.generate(ctx, max_new_tokens=kw["max_new_tokens"], do_sample=False, stop=(), return_scores=True)
        assert [1] + g.ids[0].tolist() == c["generate_output_ids"] == ref[f"chat{i}.output_ids"].tolist()
        assert_close(g.scores[:, 0], ref[f"chat{i}.gen_scores"], f"chat{i}.gen_scores")
        assert model.clean_answer(g.ids[0]) == c["answer_text"]
        g1 = model.generate(ctx, max_new_tokens=kw["max_new_tokens"], do_sample=False, stop=(), repetition_penalty=1.0)
        expect = c.get("generate_output_ids_repetition_penalty_1", c["generate_output_ids"])
        assert [1] + g1.ids[0].tolist() == expect
        # the same through Chat, from the PNG (the image is encoded alone, the context spliced as the original)
        chat = Chat(model, max_new_tokens=kw["max_new_tokens"], do_sample=False, stop=())
        chat.upload_img(preprocess(ref_dir / c["image"]))
        chat.ask(js["question"])
        assert chat.answer() == c["answer_text"]
        assert_close(chat.context_embeds()[:, :c["embeds_len"]], ref[f"chat{i}.context_embeds"], "Chat context")
