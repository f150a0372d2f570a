"""qformer.py against transformers' Blip2QFormerModel (queries as `query_embeds`), plus loading."""
import re

import pytest
import torch
from conftest import assert_close

from checkpoint import CheckpointError
from model import folder_configs  # config.json `dims` -> our configs (shared with model.py)
from qformer import QFormer, QFormerConfig


def hf_config(cfg):
    from transformers import Blip2QFormerConfig
    c = Blip2QFormerConfig(hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                           intermediate_size=cfg.intermediate_size, layer_norm_eps=cfg.norm_eps, hidden_act="gelu",
                           encoder_hidden_size=cfg.encoder_width, cross_attention_frequency=cfg.cross_attention_freq,
                           use_qformer_text_input=False)
    c._attn_implementation = "eager"
    return c


def to_hf(ours):
    """Our (= LAVIS minus `Qformer.bert.`) names -> Blip2QFormerModel names."""
    out = {}
    for k, v in ours.state_dict().items():
        if k == "query_tokens":
            continue  # transformers keeps them outside the Q-Former (Blip2Model.query_tokens)
        k = k.replace("embeddings.LayerNorm.", "layernorm.").replace(".self.", ".attention.")
        out[k] = v
    return out


def load_tiny(ref_dir, ref_config):
    return QFormer.from_pretrained(ref_dir / "blip2_pretrained.pth", folder_configs(ref_dir)[1])


@torch.no_grad()
def test_matches_transformers(ref_dir, ref_config):
    from transformers import Blip2QFormerModel
    ours, _ = load_tiny(ref_dir, ref_config)
    cfg = ours.config
    hf = Blip2QFormerModel(hf_config(cfg)).eval()
    hf_cross = tuple(i for i, layer in enumerate(hf.encoder.layer) if layer.has_cross_attention)
    assert hf_cross == cfg.cross_attention_layers
    hf.load_state_dict(to_hf(ours), strict=True)
    torch.manual_seed(0)
    image = torch.randn(2, 1 + 256, cfg.encoder_width)
    ref = hf(query_embeds=ours.query_tokens.expand(2, -1, -1), encoder_hidden_states=image).last_hidden_state
    assert_close(ours(image), ref, "qformer vs transformers")


def test_defaults_and_parameter_count_match_transformers():
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2QFormerModel
    cfg = QFormerConfig()
    assert cfg == QFormerConfig.from_name("blip2") and cfg.cross_attention_layers == (0, 2, 4, 6, 8, 10)
    d = Blip2QFormerConfig()  # transformers' defaults are BLIP-2's Q-Former too
    assert (cfg.hidden_size, cfg.n_layers, cfg.n_heads, cfg.intermediate_size, cfg.norm_eps, cfg.encoder_width,
            cfg.cross_attention_freq, cfg.n_queries) == (
        d.hidden_size, d.num_hidden_layers, d.num_attention_heads, d.intermediate_size, d.layer_norm_eps,
        d.encoder_hidden_size, d.cross_attention_frequency, Blip2Config().num_query_tokens)
    with torch.device("meta"):
        ours, hf = QFormer(cfg), Blip2QFormerModel(hf_config(cfg))
    text_ffn = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.")  # only if use_qformer_text_input
    n_hf = sum(p.numel() for n, p in hf.named_parameters() if not text_ffn.match(n))
    n_hf += cfg.n_queries * cfg.hidden_size  # query_tokens: in Blip2Model, outside its Q-Former
    assert sum(p.numel() for p in ours.parameters()) == n_hf


def test_ln_vision_and_text_keys_skipped(ref_dir, ref_config, tmp_path):
    """Keys of real BLIP-2 files that the query path never uses are skipped by name; the result is unchanged."""
    cfg = folder_configs(ref_dir)[1]
    ckpt = torch.load(ref_dir / "blip2_pretrained.pth", weights_only=True)
    sd, H = dict(ckpt["model"]), cfg.hidden_size
    extra = {"Qformer.bert.embeddings.word_embeddings.weight": torch.zeros(10, H),
             "Qformer.bert.embeddings.position_embeddings.weight": torch.zeros(512, H),
             "Qformer.bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(cfg.intermediate_size, H),
             "Qformer.bert.encoder.layer.0.output.LayerNorm.bias": torch.zeros(H),
             "Qformer.cls.predictions.bias": torch.zeros(10), "vision_proj.weight": torch.zeros(8, H),
             "text_proj.bias": torch.zeros(8), "itm_head.weight": torch.zeros(2, H), "temp": torch.ones(()),
             "opt_proj.weight": torch.zeros(8, H), "visual_encoder.cls_token": torch.zeros(1, 1, 8)}
    torch.save({"model": {**sd, **extra}, "epoch": 3}, tmp_path / "blip2.pth")
    ours, ln = QFormer.from_pretrained(tmp_path / "blip2.pth", cfg)
    assert set(ln) == {"weight", "bias"}
    assert torch.equal(ln["weight"], sd["ln_vision.weight"]) and torch.equal(ln["bias"], sd["ln_vision.bias"])
    ref, _ = load_tiny(ref_dir, ref_config)
    image = torch.randn(1, 5, cfg.encoder_width)
    with torch.no_grad():
        assert torch.equal(ours(image), ref(image))


def test_shapes_come_from_the_checkpoint(ref_dir, ref_config, capsys):
    """Config supplies heads and eps; widths, layers, queries, cross-attention layers are the file's."""
    cfg = folder_configs(ref_dir)[1]
    ours, _ = QFormer.from_pretrained(ref_dir / "blip2_pretrained.pth",
                                      QFormerConfig(n_heads=cfg.n_heads, norm_eps=cfg.norm_eps))
    assert ours.config == QFormerConfig(**{**vars(cfg), "cross_attention_freq": QFormerConfig().cross_attention_freq})
    assert "config values replaced by the checkpoint's" in capsys.readouterr().err


def test_bad_checkpoints(ref_dir, ref_config, tmp_path):
    cfg = folder_configs(ref_dir)[1]
    src = ref_dir / "blip2_pretrained.pth"
    sd = torch.load(src, weights_only=True)["model"]
    (tmp_path / "trunc.pth").write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    cases = [(tmp_path / "nope.pth", "not found"), (tmp_path / "trunc.pth", "not a readable")]

    def variant(name, change, expect):
        d = dict(sd)
        change(d)
        torch.save({"model": d}, tmp_path / f"{name}.pth")
        cases.append((tmp_path / f"{name}.pth", expect))

    q0 = "Qformer.bert.encoder.layer.0.attention.self.query.weight"
    variant("unexpected", lambda d: d.update({"Qformer.bert.pooler.dense.bias": sd["ln_vision.bias"]}),
            "unexpected key in checkpoint: pooler.dense.bias")
    variant("unexpected_outside", lambda d: d.update({"llama_proj.weight": sd[q0]}),
            "unexpected key in checkpoint: llama_proj.weight")
    variant("shape", lambda d: d.update({q0: sd[q0][:-1]}), "shape mismatch for encoder.layer.0.attention.self.query")
    k = f"Qformer.bert.encoder.layer.{cfg.n_layers - 1}.output_query.LayerNorm.weight"
    variant("missing", lambda d: d.pop(k), f"missing 1 key(s): {k[len('Qformer.bert.'):]}")
    variant("no_queries", lambda d: d.pop("query_tokens"), "missing key query_tokens")
    variant("no_ln_vision", lambda d: d.pop("ln_vision.bias"), "ln_vision")
    for path, expect in cases:
        with pytest.raises(CheckpointError) as e:
            QFormer.from_pretrained(path, cfg)
        msg = str(e.value)
        assert expect in msg and "\n" not in msg, f"{path.name}: {msg}"
