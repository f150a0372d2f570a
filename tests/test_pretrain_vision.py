"""pretrain_vision.py: the tower trains, and what it saves loads through model.py's own loading (the original
file formats, sizes from config.json) into the very same function of the image."""
import torch

import pretrain_vision as P
import shapes as S
from model import MiniGPT4Config, folder_configs
from qformer import QFormer
from vit import VisionTransformer


def test_labels_mark_each_place():
    s = {"background": "gray", "objects": [{"shape": "star", "colour": "blue", "size": "small", "place": "center",
                                            "jitter": (0, 0)}]}
    y = P.labels([s])
    assert y["shape"][0].tolist() == [0, 0, 0, 0, 1 + S.SHAPES.index("star"), 0, 0, 0, 0]
    assert y["colour"][0, 4] == 1 + list(S.COLOURS).index("blue") and y["count"].tolist() == [0]
    assert y["background"].tolist() == [list(S.BACKGROUNDS).index("gray")]


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    tower = P.Tower(MiniGPT4Config.from_name("shapes"))
    sc = [S.scene("train", i) for i in range(8)]
    x, y = P.pixels([S.render(s) for s in sc]), P.labels(sc)
    opt = torch.optim.AdamW(tower.parameters(), lr=1e-3)
    losses = []
    for _ in range(8):
        loss = P.loss_fn(tower(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_saved_tower_loads_as_the_same_function(tmp_path):
    metrics = P.pretrain(str(tmp_path), steps=2, batch_size=4, val=6, log_interval=1)
    assert set(metrics) >= {"colour", "shape", "place", "count"}
    vit_cfg, qf_cfg, eps = folder_configs(str(tmp_path))
    vit = VisionTransformer.from_pretrained(str(tmp_path / "eva_vit_g.pth"), vit_cfg)
    qf, ln = QFormer.from_pretrained(str(tmp_path / "blip2_pretrained.pth"), qf_cfg)
    assert (vit_cfg.width, qf_cfg.n_queries, qf_cfg.cross_attention_layers) == (192, 10, (0, 1, 2, 3))
    x = P.pixels([S.render(S.scene("val", 0))])
    loaded = qf(torch.nn.functional.layer_norm(vit(x), (192,), ln["weight"], ln["bias"], eps))
    # the Tower (pretraining's modules) holding the loaded weights: the same function of the image
    torch.manual_seed(0)
    ref = P.Tower(MiniGPT4Config.from_name("shapes"))
    missing = ref.load_state_dict({**{f"visual_encoder.{k}": v for k, v in vit.state_dict().items()},
                                   **{f"Qformer.{k}": v for k, v in qf.state_dict().items()},
                                   **{f"ln_vision.{k}": v for k, v in ln.items()}}, strict=False)
    assert not missing.unexpected_keys and all(k.startswith("heads.") for k in missing.missing_keys)
    with torch.no_grad():
        expect = ref.Qformer(ref.ln_vision(ref.visual_encoder(x)))
    torch.testing.assert_close(loaded, expect, rtol=1e-5, atol=1e-5)
